"""Strict UTF-8 for multipart text fields.

Starlette decodes a text field that is not UTF-8 as latin-1 instead of refusing it, so by the time
a handler sees the question the bytes are lost ("\\xff\\xfe" arrives as "ÿþ", indistinguishable from
a client that meant it). The gateway's guard checks the raw body first, with the same multipart
parser Starlette uses; file parts are skipped without being buffered.
"""

from __future__ import annotations

from python_multipart.multipart import MultipartParser, parse_options_header


def undecodable_text_field(body: bytes, content_type: str) -> str | None:
    """Name of the first non-file field of a multipart body whose bytes are not UTF-8, else None
    (also None for a body that is not multipart: the form parser answers that one)."""
    media, params = parse_options_header(content_type)
    if media != b"multipart/form-data" or not params.get(b"boundary"):
        return None
    part: dict = {}
    found: list[str] = []

    def begin() -> None:
        part.clear()
        part.update(headers={}, field=b"", value=b"", data=bytearray(), is_file=False, name="")

    def header_field(data: bytes, start: int, end: int) -> None:
        part["field"] += data[start:end]

    def header_value(data: bytes, start: int, end: int) -> None:
        part["value"] += data[start:end]

    def header_end() -> None:
        part["headers"][part["field"].lower()] = part["value"]
        part["field"], part["value"] = b"", b""

    def headers_finished() -> None:
        _, options = parse_options_header(part["headers"].get(b"content-disposition", b""))
        part["is_file"] = b"filename" in options
        part["name"] = options.get(b"name", b"").decode("utf-8", "replace")

    def data(chunk: bytes, start: int, end: int) -> None:
        if not part["is_file"]:
            part["data"] += chunk[start:end]

    def end() -> None:
        if not part["is_file"] and not found:
            try:
                bytes(part["data"]).decode("utf-8")
            except UnicodeDecodeError:
                found.append(part["name"])

    parser = MultipartParser(
        params[b"boundary"],
        {
            "on_part_begin": begin,
            "on_header_field": header_field,
            "on_header_value": header_value,
            "on_header_end": header_end,
            "on_headers_finished": headers_finished,
            "on_part_data": data,
            "on_part_end": end,
        },
    )
    try:
        parser.write(body)
        parser.finalize()
    except Exception:  # noqa: BLE001 - a malformed body: Starlette's own parse will refuse it with a 4xx
        pass
    return found[0] if found else None
