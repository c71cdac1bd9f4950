"""Edge-side imaging: normalise the original, make the global and local images, encode payloads.

Bytes are the currency of the method, so every payload is the exact encoded file the edge sends
(`Payload.nbytes == len(Payload.data)`), and the server decodes the same bytes, JPEG artefacts
included.
"""

from __future__ import annotations

import io
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
from PIL import Image, ImageOps

from collab.geometry import Box, CanvasGeometry, GlobalMode

ImageFormat = Literal["jpeg", "png"]
RESAMPLE = Image.Resampling.BICUBIC


@dataclass(frozen=True)
class Payload:
    """An encoded image as it travels on the uplink."""

    data: bytes
    format: ImageFormat
    size: tuple[int, int]  # (width, height) of the encoded image

    @property
    def nbytes(self) -> int:
        return len(self.data)


def to_rgb(image: Image.Image) -> Image.Image:
    """Upright 8-bit RGB from any PIL mode: EXIF orientation applied, alpha composited on white,
    16/32-bit and float greyscale rescaled to 8 bits (a plain convert would clip them)."""
    image = ImageOps.exif_transpose(image)
    if image.mode == "RGB":
        return image
    if image.mode in ("I;16", "I;16B", "I;16L", "I;16N", "I", "F"):
        arr = np.asarray(image, dtype=np.float64)
        hi = 65535.0 if image.mode.startswith("I;16") or arr.max(initial=0) > 255 else 255.0
        if image.mode == "F" and arr.max(initial=0) <= 1.0:
            hi = 1.0
        arr8 = np.clip(arr / hi * 255.0 + 0.5, 0, 255).astype(np.uint8)
        return Image.fromarray(arr8, mode="L").convert("RGB")
    if image.mode == "P":
        image = image.convert("RGBA")
    if image.mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return image.convert("RGB")  # L, 1, CMYK, YCbCr, LAB, HSV


def load_image(source: str | Path | bytes | Image.Image) -> Image.Image:
    """Open a path, bytes or PIL image as upright RGB (first frame of a multi-frame file)."""
    if isinstance(source, Image.Image):
        return to_rgb(source)
    if isinstance(source, (bytes, bytearray, memoryview)):
        image = Image.open(io.BytesIO(bytes(source)))
    else:
        image = Image.open(Path(source))
    image.load()
    return to_rgb(image)


def make_global_image(
    original: Image.Image,
    canvas_size: tuple[int, int],
    mode: GlobalMode = "resize",
    pad_color: tuple[int, int, int] = (0, 0, 0),
) -> tuple[Image.Image, CanvasGeometry]:
    """The low-resolution global image the edge sends first, and its exact coordinate map."""
    geometry = CanvasGeometry.create(original.size, canvas_size, mode)
    resized = original.resize(geometry.content_size, RESAMPLE)
    if mode == "resize":
        return resized, geometry
    canvas = Image.new("RGB", geometry.canvas_size, tuple(pad_color))
    canvas.paste(resized, geometry.offset)
    return canvas, geometry


def crop_local_image(original: Image.Image, box: Box, canvas_size: tuple[int, int]) -> Image.Image:
    """Crop the RoI from the ORIGINAL image and resize it to the encoder resolution."""
    width, height = original.size
    clamped = box.clamp_to(width, height)
    if clamped != box:
        raise ValueError(f"box {box.as_list()} lies outside the {width}x{height} image")
    return original.crop((box.x0, box.y0, box.x1, box.y1)).resize(tuple(canvas_size), RESAMPLE)


def encode_image(image: Image.Image, fmt: ImageFormat = "jpeg", quality: int = 90) -> Payload:
    """Encode as the edge would; JPEG quality 1-100, PNG lossless."""
    buf = io.BytesIO()
    if fmt == "jpeg":
        if not 1 <= quality <= 100:
            raise ValueError(f"JPEG quality must be 1-100, got {quality}")
        image.convert("RGB").save(buf, format="JPEG", quality=quality)
    elif fmt == "png":
        image.save(buf, format="PNG")
    else:
        raise ValueError(f"unknown image format {fmt!r}; expected 'jpeg' or 'png'")
    return Payload(buf.getvalue(), fmt, image.size)


class InvalidUpload(ValueError):
    """Bytes a server must refuse. `reason`: "empty", "too_large" (bytes or pixels, checked before
    decoding), "not_image" (not a JPEG/PNG), "animated", "corrupt" (truncated or damaged), "size"
    (not the size the protocol asked for)."""

    def __init__(self, reason: str, message: str):
        super().__init__(message)
        self.reason = reason


UPLOAD_FORMATS = ("JPEG", "PNG")
MAGIC = (b"\xff\xd8\xff", b"\x89PNG\r\n\x1a\n")


def inspect_upload(
    data: bytes, *, max_bytes: int, max_pixels: int, expected_size: tuple[int, int] | None = None
) -> Image.Image:
    """Validate received image bytes and decode them as RGB, or raise InvalidUpload.

    Sizes are read from the header and capped BEFORE any pixel is decoded (a 100-byte PNG can
    claim 10^10 pixels), only JPEG and PNG are accepted (what the edge sends), animations are
    refused, and a truncated file is an error instead of a grey half image.
    """
    if not data:
        raise InvalidUpload("empty", "the image file is empty")
    if len(data) > max_bytes:
        raise InvalidUpload("too_large", f"the image is {len(data)} bytes; at most {max_bytes} are accepted")
    try:
        image = Image.open(io.BytesIO(data), formats=list(UPLOAD_FORMATS))
    except Image.DecompressionBombError as exc:
        raise InvalidUpload("too_large", f"the image has too many pixels: {exc}") from None
    except Exception:  # noqa: BLE001 - UnidentifiedImageError, and header parsers' own errors
        if data.startswith(MAGIC):
            raise InvalidUpload("corrupt", "the image is truncated or corrupt") from None
        raise InvalidUpload("not_image", "the file is not a JPEG or PNG image") from None
    width, height = image.size
    if width < 1 or height < 1 or width * height > max_pixels:
        raise InvalidUpload(
            "too_large", f"the image is {width}x{height} pixels; at most {max_pixels} pixels are accepted"
        )
    if getattr(image, "n_frames", 1) > 1:
        raise InvalidUpload("animated", "animated (multi-frame) images are not accepted")
    if expected_size is not None and (width, height) != tuple(expected_size):
        raise InvalidUpload(
            "size", f"the image is {width}x{height}; this request needs {expected_size[0]}x{expected_size[1]}"
        )
    try:
        image.load()
        # EXIF orientation and mode conversion read metadata that no header check has seen: a
        # damaged EXIF block fails here (struct.error, KeyError, TypeError, ... from PIL's parsers),
        # and anything that fails while decoding uploaded bytes is the bytes' fault, not the server's.
        return to_rgb(image)
    except Image.DecompressionBombError as exc:
        raise InvalidUpload("too_large", f"the image has too many pixels: {exc}") from None
    except Exception:  # noqa: BLE001 - see above
        raise InvalidUpload("corrupt", "the image is truncated or corrupt (pixels or metadata)") from None


def upload_cap(size: tuple[int, int], max_bytes: int) -> int:
    """Byte cap for an upload that must be exactly `size`: raw RGB plus room for metadata (EXIF,
    an ICC profile), so no file far larger than the pixels it carries is read."""
    return min(max_bytes, 3 * size[0] * size[1] + 256 * 1024)


def server_global(
    upload: Image.Image,
    encoder_size: tuple[int, int],
    declared_original: tuple[int | None, int | None],
    mode: GlobalMode,
    budget: GlobalBudget | None = None,
) -> tuple[Image.Image | None, tuple[int, int]]:
    """What a query's upload is: (None, original size) when it is already the global image, or
    (the global image the server makes, original size) when it is the original itself or a
    downscale of it (a plain client with a photo). Raises InvalidUpload("size") otherwise.

    The original's size defaults to the upload's; a declared original must have the upload's
    aspect ratio (within 1 %, what rounding a downscale leaves). The global image is at
    `encoder_size`, or at the budget's size for the original when the server has one."""
    width, height = upload.size
    ow, oh = declared_original
    ow, oh = ow or width, oh or height
    try:
        target = global_size(encoder_size, budget, (ow, oh))
    except ValueError as exc:  # e.g. an aspect ratio no token grid can hold
        raise InvalidUpload("size", f"no global image can be made for a {ow}x{oh} original: {exc}") from None
    if upload.size == target:
        return None, (ow, oh)
    expected = f"send the global image at {target[0]}x{target[1]} for a {ow}x{oh} original, or the original image"
    is_original = (width, height) == (ow, oh)  # the photo itself: made into the global image at any size
    if not is_original and (width < target[0] or height < target[1]):
        raise InvalidUpload("size", f"the image is {width}x{height}; {expected} (at least that size)")
    if abs(width / height - ow / oh) > 0.01 * (ow / oh):
        raise InvalidUpload(
            "size", f"the image is {width}x{height}, not the {ow}x{oh} original's aspect ratio; {expected}"
        )
    global_image, _ = make_global_image(upload, target, mode)
    return global_image, (ow, oh)


def decode_image(data: bytes) -> Image.Image:
    """Server side: the received bytes as RGB."""
    return load_image(data)


def round_trip(image: Image.Image, fmt: ImageFormat = "jpeg", quality: int = 90) -> Image.Image:
    """What the server sees of an image the edge sends: encoded as the edge would, then decoded."""
    return decode_image(encode_image(image, fmt, quality).data)


def budget_size(original_size: tuple[int, int], unit: int, max_tokens: int, min_tokens: int = 4) -> tuple[int, int]:
    """(width, height) of an image at a visual-token budget, as Qwen-VL's processor sizes it
    (transformers' `smart_resize`): both sides multiples of `unit` (patch x merge), the aspect ratio
    kept as closely as that allows, between min_tokens and max_tokens units of unit x unit pixels.
    Pure arithmetic, so an edge computes the size the server expects without the model."""
    width, height = (int(v) for v in original_size)
    if width < 1 or height < 1 or unit < 1 or not 1 <= min_tokens <= max_tokens:
        raise ValueError(f"bad budget: size {original_size}, unit {unit}, tokens {min_tokens}..{max_tokens}")
    if max(width, height) / min(width, height) > 200:
        raise ValueError(f"aspect ratio over 200: {width}x{height}")
    max_pixels, min_pixels = max_tokens * unit * unit, min_tokens * unit * unit
    h, w = round(height / unit) * unit, round(width / unit) * unit
    if h * w > max_pixels:
        beta = math.sqrt(height * width / max_pixels)
        h, w = max(unit, math.floor(height / beta / unit) * unit), max(unit, math.floor(width / beta / unit) * unit)
    elif h * w < min_pixels:
        beta = math.sqrt(min_pixels / (height * width))
        h, w = math.ceil(height * beta / unit) * unit, math.ceil(width * beta / unit) * unit
    return w, h


@dataclass(frozen=True)
class GlobalBudget:
    """The global image at a visual-token budget, the original's aspect ratio kept (Qwen-VL's
    native resolution) instead of stretched onto the encoder's square: what `budget_size` makes."""

    unit: int  # patch x merge: pixels per visual token along each side
    max_tokens: int
    min_tokens: int = 4

    def __post_init__(self) -> None:
        if self.unit < 1 or not 1 <= self.min_tokens <= self.max_tokens:
            raise ValueError(f"bad global budget: unit {self.unit}, tokens {self.min_tokens}..{self.max_tokens}")

    def size_for(self, original_size: tuple[int, int]) -> tuple[int, int]:
        return budget_size(original_size, self.unit, self.max_tokens, self.min_tokens)


def global_size(
    encoder_size: tuple[int, int], budget: GlobalBudget | None, original_size: tuple[int, int]
) -> tuple[int, int]:
    """(width, height) of the global image for an original: the encoder's size, or the budget's."""
    return budget.size_for(original_size) if budget else (int(encoder_size[0]), int(encoder_size[1]))


def describe_global_image(encoder_size: tuple[int, int], budget: GlobalBudget | None) -> dict:
    """How `/v1/models` tells the edge to size the global image (read back by `global_size_from`)."""
    if budget is None:
        return {"mode": "fixed", "size": [int(encoder_size[0]), int(encoder_size[1])]}
    return {"mode": "budget", "unit": budget.unit, "max_tokens": budget.max_tokens, "min_tokens": budget.min_tokens}


def global_size_from(models: dict, original_size: tuple[int, int]) -> tuple[int, int]:
    """The edge's side: the global image's size for an original, from a `/v1/models` reply (a
    server before API 1.1 has no `global_image` field: its global image is `encoder_size`)."""
    described = models.get("global_image") or {"mode": "fixed", "size": models["encoder_size"]}
    if described["mode"] == "budget":
        budget = GlobalBudget(int(described["unit"]), int(described["max_tokens"]), int(described["min_tokens"]))
        return budget.size_for(original_size)
    return (int(described["size"][0]), int(described["size"][1]))


def global_payload(
    original: Image.Image,
    encoder_size: tuple[int, int],
    mode: GlobalMode = "resize",
    fmt: ImageFormat = "jpeg",
    quality: int = 90,
    pad_color: tuple[int, int, int] = (0, 0, 0),
) -> Payload:
    """What the edge uploads first: the global image at `encoder_size` (the size `global_size`
    gives for this original), encoded. The one implementation for the pipeline, the evaluation and
    the HTTP edge client."""
    return encode_image(make_global_image(original, encoder_size, mode, pad_color)[0], fmt, quality)


def local_payload(
    original: Image.Image, box: Box, local_size: tuple[int, int], fmt: ImageFormat = "jpeg", quality: int = 90
) -> Payload:
    """What the edge uploads on `need_roi`: the crop of the ORIGINAL at the box, at `local_size`, encoded."""
    return encode_image(crop_local_image(original, box, local_size), fmt, quality)


def full_resolution_bytes(original: Image.Image, fmt: ImageFormat = "jpeg", quality: int = 90) -> int:
    """Bytes of sending the whole original: the high-resolution reference cost."""
    return encode_image(original, fmt, quality).nbytes
