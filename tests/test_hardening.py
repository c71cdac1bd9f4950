"""Hardening: bad input is a clear 4xx JSON error (never a 5xx, never a dead replica), state stays
bounded, auth and body limits hold, and with replicas killed during an edge load every query is
still answered."""

from __future__ import annotations

import io
import threading
import time

import httpx
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image
from serve_helpers import APP, wait_for

from collab.data.synthetic import generate_items
from collab.imaging import InvalidUpload, encode_image, inspect_upload
from deployments.sessions import SessionTable
from edge_agents.client import EdgeClient

CAPS = {"max_bytes": 2**20, "max_pixels": 2**20}


def jpeg(size=(32, 32), color=(200, 30, 30)) -> bytes:
    return encode_image(Image.new("RGB", size, color), "jpeg", 90).data


def png(image: Image.Image, **kw) -> bytes:
    buf = io.BytesIO()
    image.save(buf, "PNG", **kw)
    return buf.getvalue()


def animated_png() -> bytes:
    frames = [Image.new("RGB", (32, 32), c) for c in ((255, 0, 0), (0, 255, 0))]
    return png(frames[0], save_all=True, append_images=frames[1:])


def bomb_png() -> bytes:
    """A few KB that claim 400 megapixels: must be refused from the header, before decoding."""
    return png(Image.new("1", (20_000, 20_000)))


# ------------------------------------------------------------------------------------ uploads


@pytest.mark.parametrize(
    "data, reason",
    [
        (b"", "empty"),
        (b"hello, not an image", "not_image"),
        (jpeg()[:40], "corrupt"),
        (jpeg()[: len(jpeg()) // 2], "corrupt"),
        (png(Image.new("RGB", (32, 32)))[:60], "corrupt"),
        (b"\x00" * 5000, "not_image"),
        (bomb_png(), "too_large"),
        (animated_png(), "animated"),
        (jpeg((16, 16)), "size"),
    ],
)
def test_inspect_upload_refuses(data, reason):
    with pytest.raises(InvalidUpload) as info:
        inspect_upload(data, expected_size=(32, 32), **CAPS)
    assert info.value.reason == reason, str(info.value)


def test_inspect_upload_caps_bytes_and_accepts_unusual_modes():
    with pytest.raises(InvalidUpload, match="bytes"):
        inspect_upload(jpeg(), max_bytes=100, max_pixels=2**20)
    gif = io.BytesIO()
    Image.new("RGB", (32, 32)).save(gif, "GIF")
    with pytest.raises(InvalidUpload) as info:
        inspect_upload(gif.getvalue(), **CAPS)
    assert info.value.reason == "not_image"
    for mode in ("L", "RGBA", "P", "I;16", "1", "LA"):
        image = inspect_upload(png(Image.new(mode, (32, 32))), expected_size=(32, 32), **CAPS)
        assert image.mode == "RGB" and image.size == (32, 32)
    cmyk = io.BytesIO()
    Image.new("CMYK", (32, 32), (0, 255, 0, 0)).save(cmyk, "JPEG")
    assert inspect_upload(cmyk.getvalue(), **CAPS).mode == "RGB"


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.binary(max_size=4096), st.integers(0, 3000), st.integers(0, 255))
def test_inspect_upload_never_raises_anything_else(noise, position, value):
    """Random bytes and single-byte corruptions of a valid JPEG: decoded RGB or InvalidUpload."""
    for data in (noise, _corrupt(jpeg(), position, value)):
        try:
            image = inspect_upload(data, **CAPS)
        except InvalidUpload:
            continue
        assert image.mode == "RGB"


def exif_jpeg(size=(96, 96), orientation=6, description="a description") -> bytes:
    exif = Image.Exif()
    exif[0x0112] = orientation
    exif[0x010E] = description
    buf = io.BytesIO()
    Image.new("RGB", size, (200, 30, 30)).save(buf, "JPEG", exif=exif)
    return buf.getvalue()


def test_a_damaged_exif_block_is_a_corrupt_upload_not_a_crash():
    """The case that gave a 500: EXIF orientation is applied after the pixels load, and a damaged
    EXIF block fails there (PIL raises struct.error)."""
    data = exif_jpeg()
    damaged = data[:41] + b"\x00" + data[42:]
    with pytest.raises(InvalidUpload) as info:
        inspect_upload(damaged, expected_size=(96, 96), **CAPS)
    assert info.value.reason == "corrupt"
    assert inspect_upload(data, expected_size=(96, 96), **CAPS).size == (96, 96)  # intact: rotated 96x96


@st.composite
def metadata_images(draw, size=(32, 32), flips=(0, 1, 2)):
    """Valid-size images with random EXIF (always an orientation: transposing is what reads it),
    ICC and text metadata, then up to two bytes of the EXIF block flipped."""
    fmt = draw(st.sampled_from(["JPEG", "PNG"]))
    image = Image.new(draw(st.sampled_from(["RGB", "L", "RGBA", "P"])), tuple(size), draw(st.integers(0, 255)))
    exif = Image.Exif()
    exif[0x0112] = draw(st.integers(0, 9))
    for tag in draw(st.lists(st.sampled_from([0x010E, 0x010F, 0x0110, 0x0131]), max_size=3)):
        exif[tag] = draw(st.text(max_size=40))
    kwargs = {"exif": exif}
    if draw(st.booleans()):
        kwargs["icc_profile"] = draw(st.binary(min_size=1, max_size=300))
    if fmt == "JPEG" and image.mode in ("RGBA", "P"):
        image = image.convert("RGB")
    buf = io.BytesIO()
    image.save(buf, fmt, **kwargs)
    data = buf.getvalue()
    start = max(data.find(b"Exif" if fmt == "JPEG" else b"eXIf"), 0)
    for _ in range(draw(st.sampled_from(flips))):
        position = draw(st.integers(start, min(start + 120, len(data) - 1)))
        data = data[:position] + bytes([draw(st.integers(0, 255))]) + data[position + 1 :]
    return data


@pytest.mark.filterwarnings("ignore::UserWarning")  # PIL warns about the damaged EXIF it skips
@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(metadata_images())
def test_random_metadata_is_decoded_or_refused(data):
    try:
        image = inspect_upload(data, expected_size=(32, 32), **CAPS)
    except InvalidUpload:
        return
    assert image.mode == "RGB" and image.size in ((32, 32),)


def _corrupt(data: bytes, position: int, value: int) -> bytes:
    position %= len(data)
    return data[:position] + bytes([value]) + data[position + 1 :]


# ------------------------------------------------------------------------------------ state


def test_ten_thousand_abandoned_sessions_stay_within_the_caps():
    import torch

    features = torch.zeros(144, 128)  # 72 KiB each: 10,000 would be 703 MiB unbounded
    cap = 64 * 2**20
    clock = [0.0]
    table = SessionTable(ttl_s=60, max_sessions=5_000, max_bytes=cap, clock=lambda: clock[0])
    peak = 0
    for i in range(10_000):
        table.create(features, {"question": "q", "i": i})
        clock[0] += 0.001
        peak = max(peak, table.nbytes)
        assert len(table.sessions) <= 5_000 and len(table.gone) <= 5_000
    assert peak <= cap
    assert table.counters["evicted"] == 10_000 - len(table.sessions)
    clock[0] += 61  # all abandoned: after the TTL nothing is held
    assert table.stats()["sessions"] == 0 and table.nbytes == 0
    status, _ = table.lookup(next(reversed(table.gone)))
    assert status == "expired"


# ------------------------------------------------------------------------------------ auth, limits (no cluster)


@pytest.fixture()
def guarded_app(monkeypatch):
    """The gateway's FastAPI app with auth and a body limit, without Serve (the guard runs first)."""
    from fastapi.testclient import TestClient

    from deployments import gateway, limits

    monkeypatch.setattr(limits, "CURRENT", limits.Limits("s3cret-token", 1000))
    monkeypatch.setattr(gateway.metrics, "gateway", lambda: _NullMetrics())
    return TestClient(gateway.app, raise_server_exceptions=False)


class _NullMetrics:
    class _C:
        def inc(self, *a, **k):
            pass

    requests = _C()


def test_bearer_token_and_body_limit(guarded_app):
    r = guarded_app.post("/v1/query", data={"question": "q"})
    assert r.status_code == 401 and r.headers["www-authenticate"] == "Bearer" and r.json()["status"] == 401
    r = guarded_app.get("/v1/models", headers={"Authorization": "Bearer wrong"})
    assert r.status_code == 401
    r = guarded_app.get("/v1/models", headers={"Authorization": "bearer s3cret-token"})  # scheme is case-exact here
    assert r.status_code == 401
    ok = {"Authorization": "Bearer s3cret-token"}
    r = guarded_app.post("/v1/query", headers=ok, files={"image": ("g.jpg", b"x" * 5000, "image/jpeg")})
    assert r.status_code == 413 and "larger than 1000" in r.json()["error"]


# ------------------------------------------------------------------------------------ live HTTP


def _post(url, path, data, files):
    return httpx.post(f"{url}{path}", data=data, files=files, timeout=60)


def test_bad_input_table_over_http(served):
    """Each case: a 4xx with the JSON error format, and the app still answers afterwards."""
    good = jpeg()
    base = {"question": "what colour is the circle?", "original_width": "400", "original_height": "300"}
    img = lambda data, name="g.jpg", ctype="image/jpeg": {"image": (name, data, ctype)}  # noqa: E731
    cases = [
        ("zero-byte image", "/v1/query", base, img(b""), 400),
        ("non-image bytes", "/v1/query", base, img(b"%PDF-1.4 not an image"), 415),
        ("truncated JPEG", "/v1/query", base, img(good[: len(good) // 2]), 422),
        ("decompression bomb", "/v1/query", base, img(bomb_png(), "g.png", "image/png"), 413),
        ("animated PNG", "/v1/query", base, img(animated_png(), "g.png", "image/png"), 422),
        ("wrong global size", "/v1/query", base, img(jpeg((24, 18))), 422),
        ("original of another aspect", "/v1/query", base, img(jpeg((64, 64))), 422),
        (
            "one original size only",
            "/v1/query",
            {k: v for k, v in base.items() if k != "original_height"},
            img(good),
            422,
        ),
        ("missing question", "/v1/query", {k: v for k, v in base.items() if k != "question"}, img(good), 422),
        ("missing image", "/v1/query", base, None, 422),
        ("extra field", "/v1/query", {**base, "debug": "1"}, img(good), 422),
        ("empty question", "/v1/query", {**base, "question": "  "}, img(good), 422),
        ("overlong question", "/v1/query", {**base, "question": "why " * 600}, img(good), 422),
        ("NaN width", "/v1/query", {**base, "original_width": "NaN"}, img(good), 422),
        ("negative height", "/v1/query", {**base, "original_height": "-5"}, img(good), 422),
        ("absurd width", "/v1/query", {**base, "original_width": str(10**9)}, img(good), 422),
        ("NaN threshold", "/v1/query", {**base, "threshold": "nan"}, img(good), 422),
        ("unknown policy", "/v1/query", {**base, "policy": "sometimes"}, img(good), 422),
        ("unknown session", "/v1/refine", {"session_id": "0" * 32}, img(good), 404),
        ("refine without session id", "/v1/refine", {}, img(good), 422),
    ]
    failures = []
    for name, path, data, files, status in cases:
        r = _post(served, path, data, files)
        body = r.json() if r.headers.get("content-type", "").startswith("application/json") else {}
        if r.status_code != status or body.get("status") != status or not body.get("error"):
            failures.append(f"{name}: {r.status_code} {r.text[:160]}")
    # wrong content types: JSON and non-UTF-8 form bodies
    r = httpx.post(f"{served}/v1/query", json=base, timeout=30)
    if r.status_code != 422:
        failures.append(f"JSON body: {r.status_code} {r.text[:160]}")
    r = httpx.post(
        f"{served}/v1/query",
        content=b"question=\xff\xfe&original_width=1",
        timeout=30,
        headers={"content-type": "application/x-www-form-urlencoded"},
    )
    if not 400 <= r.status_code < 500:
        failures.append(f"non-UTF-8 form: {r.status_code} {r.text[:160]}")
    r = httpx.post(
        f"{served}/v1/query",
        content=b"x" * (9 * 2**20),
        timeout=60,
        headers={"content-type": "multipart/form-data; boundary=x"},
    )
    if r.status_code != 413:
        failures.append(f"oversize body: {r.status_code} {r.text[:160]}")
    assert not failures, "\n".join(failures)
    item = next(generate_items(11, 1))
    client = EdgeClient(served, client_id="after-bad-input")
    assert client.ask(item.image, item.question, policy="always").stage == 2  # nothing crashed
    client.close()


def test_session_ids_replay_and_ownership_over_http(served):
    item = next(generate_items(12, 1))
    owner = EdgeClient(served, client_id="owner")
    first = owner._json(
        owner.http.post(
            "/v1/query",
            data={
                "question": item.question,
                "original_width": str(item.image.width),
                "original_height": str(item.image.height),
                "policy": "always",
                "client_id": "owner",
            },
            files={"image": ("g.jpg", encode_image(item.image.resize((32, 32)), "jpeg", 90).data, "image/jpeg")},
        )
    )
    local = jpeg(tuple(first["local_size"]))
    thief = _post(
        served,
        "/v1/refine",
        {"session_id": first["session_id"], "client_id": "someone-else"},
        {"image": ("l.jpg", local, "image/jpeg")},
    )
    assert thief.status_code == 403 and thief.json()["status"] == 403
    wrong_size = _post(
        served,
        "/v1/refine",
        {"session_id": first["session_id"], "client_id": "owner"},
        {"image": ("l.jpg", jpeg((8, 8)), "image/jpeg")},
    )
    assert wrong_size.status_code == 422
    done = _post(
        served,
        "/v1/refine",
        {"session_id": first["session_id"], "client_id": "owner"},
        {"image": ("l.jpg", local, "image/jpeg")},
    )
    again = _post(
        served,
        "/v1/refine",
        {"session_id": first["session_id"], "client_id": "owner"},
        {"image": ("l.jpg", local, "image/jpeg")},
    )
    assert (
        done.status_code == again.status_code == 200
        and again.json()["replayed"]
        and again.json()["answer"] == done.json()["answer"]
    )
    other = _post(
        served,
        "/v1/refine",
        {"session_id": first["session_id"], "client_id": "owner"},
        {"image": ("l.jpg", jpeg(tuple(first["local_size"]), (0, 0, 255)), "image/jpeg")},
    )
    assert other.status_code == 409
    owner.close()


@settings(
    max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow]
)
@given(
    question=st.text(max_size=1200),
    width=st.one_of(st.integers(-10, 10**6).map(str), st.sampled_from(["", "nan", "1e3", "0x10", "ten"])),
    threshold=st.one_of(st.none(), st.floats(allow_nan=True, allow_infinity=True).map(str), st.text(max_size=5)),
    policy=st.one_of(st.none(), st.sampled_from(["never", "always", "random", "entropy", "", "ALWAYS"])),
    image=st.one_of(st.binary(max_size=64), st.just(jpeg())),
)
def test_query_fuzz_never_5xx(served, question, width, threshold, policy, image):
    data = {"question": question, "original_width": width, "original_height": "300"}
    if threshold is not None:
        data["threshold"] = threshold
    if policy is not None:
        data["policy"] = policy
    r = _post(served, "/v1/query", data, {"image": ("g.jpg", image, "image/jpeg")})
    assert r.status_code < 500, r.text
    body = r.json()
    if r.status_code >= 400:
        assert body["status"] == r.status_code and body["error"]
    else:
        assert body["status"] in ("answered", "need_roi")


QUESTION_TEXT = st.one_of(
    # full Unicode (controls, RTL, combining marks, emoji), weighted 3 of 5 so that most examples are
    # valid questions that reach the decoders
    st.text(min_size=1, max_size=300),
    st.text(min_size=1, max_size=40),
    st.text(min_size=1, max_size=300),
    st.builds(lambda a, b: f"{a} <image> {b}", st.text(max_size=20), st.text(max_size=20)),
    st.sampled_from(
        [
            "what number is in the red circle?",
            "</s> what?",
            "<s><s>",
            "\u202eevil\u202c?",
            "e\u0301" * 50,
            "\U0001f600" * 40,
            "x" * 999,
            "why " * 300,
            "\x00\x01\x1b[2J",
            "\ufeffbom",
        ]
    ),
)


def _fuzz_queries(url: str, max_examples: int) -> dict:
    """Queries whose image is valid (the encoder's size, random metadata, sometimes a flipped
    metadata byte) and whose question is any Unicode: every reply < 500, and counts of what
    reached the model."""
    size = tuple(httpx.get(f"{url}/v1/models", timeout=30).json()["encoder_size"])
    counts = {"examples": 0, "answered": 0, "need_roi": 0, "refused": 0, "reasons": {}}

    @settings(
        max_examples=max_examples,
        deadline=None,
        database=None,
        derandomize=True,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
    )
    @given(
        question=QUESTION_TEXT,
        image=metadata_images(size, flips=(0, 0, 0, 1, 2)),
        policy=st.sampled_from(["never", "always", "entropy", "random"]),
        threshold=st.one_of(st.none(), st.floats(-10, 10)),
        flip=st.booleans(),
    )
    def one(question, image, policy, threshold, flip):
        data = {"question": question, "original_width": "480", "original_height": "360", "policy": policy}
        if threshold is not None:
            data["threshold"] = repr(threshold)
        r = _post(url, "/v1/query", data, {"image": ("g.jpg", image, "image/jpeg")})
        assert r.status_code < 500, (r.status_code, r.text[:200], question)
        body = r.json()
        counts["examples"] += 1
        if r.status_code >= 400:
            assert body["status"] == r.status_code and body["error"]
            counts["refused"] += 1
            reason = f"{r.status_code} {body['error'][:40]}"
            counts["reasons"][reason] = counts["reasons"].get(reason, 0) + 1
            return
        counts[body["status"]] += 1
        if body["status"] == "need_roi" and flip:  # the refine path too, with the crop the server asked for
            local = jpeg(tuple(body["local_size"]))
            refined = _post(
                url, "/v1/refine", {"session_id": body["session_id"]}, {"image": ("l.jpg", local, "image/jpeg")}
            )
            assert refined.status_code == 200, refined.text[:200]

    one()
    assert httpx.get(f"{url}/healthz", timeout=10).status_code == 200
    return counts


def test_fuzz_that_reaches_the_model_never_gets_a_5xx(served):
    counts = _fuzz_queries(served, 200)
    print("fuzz counts:", counts)
    reached = counts["answered"] + counts["need_roi"]
    assert counts["examples"] >= 150 and reached >= counts["examples"] // 2, counts  # most reach the decoders


@pytest.mark.slow
def test_fuzz_that_reaches_the_model_never_gets_a_5xx_long(served):
    counts = _fuzz_queries(served, 3000)
    print("fuzz counts:", counts)
    assert counts["answered"] + counts["need_roi"] >= counts["examples"] // 2, counts


def test_questions_that_would_change_the_prompt_are_refused(served):
    """The placeholder, control tokens, too many tokens, and bytes that are not UTF-8: 422."""
    size = tuple(httpx.get(f"{served}/v1/models", timeout=30).json()["encoder_size"])
    image = {"image": ("g.jpg", jpeg(size), "image/jpeg")}
    base = {"original_width": "400", "original_height": "300", "policy": "never"}
    for question, needle in [
        ("what is <image> here?", "image token"),
        ("what </s> is it?", "control token"),
        ("a " * 300, "tokens"),
    ]:
        r = _post(served, "/v1/query", {**base, "question": question}, image)
        assert r.status_code == 422 and needle in r.json()["error"], (question[:20], r.status_code, r.text[:200])
        # the decoder's message, not Ray's wrapper around it (remote traceback, pid, paths)
        assert r.json()["error"].startswith("the question") and "pid=" not in r.text and "File " not in r.text
    body = (
        b'--b\r\nContent-Disposition: form-data; name="question"\r\n\r\nwhat \xff\xfe is it?\r\n'
        b'--b\r\nContent-Disposition: form-data; name="original_width"\r\n\r\n400\r\n'
        b'--b\r\nContent-Disposition: form-data; name="original_height"\r\n\r\n300\r\n'
        b'--b\r\nContent-Disposition: form-data; name="image"; filename="g.jpg"\r\nContent-Type: image/jpeg\r\n\r\n'
        + jpeg(size)
        + b"\r\n--b--\r\n"
    )
    r = httpx.post(
        f"{served}/v1/query", content=body, headers={"content-type": "multipart/form-data; boundary=b"}, timeout=30
    )
    assert r.status_code == 422 and "UTF-8" in r.json()["error"], r.text[:200]
    r = _post(served, "/v1/query", {**base, "question": "what colour is the circle?"}, image)
    assert r.status_code == 200


def test_a_plain_client_can_send_its_photo(served):
    """curl -F question=... -F image=@photo.jpg: no sizes, the original uploaded; the server makes
    the global image as the edge would, says so, and counts the bytes that arrived."""
    item = next(generate_items(15, 1))
    photo = encode_image(item.image, "jpeg", 90).data
    r = _post(
        served,
        "/v1/query",
        {"question": item.question, "policy": "always"},
        {"image": ("photo.jpg", photo, "image/jpeg")},
    )
    assert r.status_code == 200, r.text[:200]
    body = r.json()
    assert body["status"] == "need_roi" and body["global_made_by"] == "server" and body["bytes_received"] == len(photo)
    x0, y0, x1, y1 = body["box"]
    assert 0 <= x0 < x1 <= item.image.width and 0 <= y0 < y1 <= item.image.height  # in the photo's own pixels
    # the same global bytes, so the same answer, as an edge that made it from the same photo
    client = EdgeClient(served, client_id=None)
    edge = client.ask(photo, item.question, policy="never")
    client.close()
    plain = _post(
        served,
        "/v1/query",
        {"question": item.question, "policy": "never"},
        {"image": ("photo.jpg", photo, "image/jpeg")},
    )
    assert plain.json()["global_made_by"] == "server"
    assert plain.json()["answer"] == edge.first_answer


def test_concurrent_refines_of_one_session(served):
    """16 concurrent refines of one session: the same bytes all get the one reply; then, on a
    second session, different bytes: exactly one 200 and 409 for the rest."""
    from concurrent.futures import ThreadPoolExecutor

    size = tuple(httpx.get(f"{served}/v1/models", timeout=30).json()["encoder_size"])

    def session() -> tuple[str, tuple[int, int]]:
        r = _post(
            served,
            "/v1/query",
            {
                "question": "what number is in the red circle?",
                "original_width": "400",
                "original_height": "300",
                "policy": "always",
            },
            {"image": ("g.jpg", jpeg(size), "image/jpeg")},
        )
        assert r.status_code == 200 and r.json()["status"] == "need_roi", r.text[:200]
        return r.json()["session_id"], tuple(r.json()["local_size"])

    def refine(sid, data):
        return _post(served, "/v1/refine", {"session_id": sid}, {"image": ("l.jpg", data, "image/jpeg")})

    sid, local = session()
    same = jpeg(local)
    with ThreadPoolExecutor(16) as pool:
        replies = list(pool.map(lambda _: refine(sid, same), range(16)))
    assert [r.status_code for r in replies] == [200] * 16, [r.text[:100] for r in replies if r.status_code != 200]
    assert len({r.json()["answer"] for r in replies}) == 1
    assert sum(not r.json()["replayed"] for r in replies) == 1  # refined once, replayed 15 times

    sid, local = session()
    images = [jpeg(local, (i * 15, 255 - i * 15, 128)) for i in range(16)]
    assert len(set(images)) == 16
    with ThreadPoolExecutor(16) as pool:
        replies = list(pool.map(lambda data: refine(sid, data), images))
    codes = sorted(r.status_code for r in replies)
    assert codes == [200] + [409] * 15, codes


# ------------------------------------------------------------------------------------ faults


def test_killed_replicas_lose_no_query(served):
    """An edge load (agents with idempotent retries) while one replica of each deployment is
    killed in turn: every query ends answered, none failed, and the retries are counted."""
    import ray

    from edge_agents.config import LoadTestConfig
    from edge_agents.loadtest import run_load

    cfg = LoadTestConfig.model_validate(
        {
            "url": served,
            "agents": 4,
            "agents_per_actor": 4,
            "policy": "always",
            "workload": {"mode": "closed", "think_time_s": 0.05, "duration_s": 40, "ramp_up_s": 1, "drain_s": 120},
            "source": {"synthetic": "61:16"},
            "retry": {"max_attempts": 30, "backoff_s": 0.2, "backoff_max_s": 2.0, "request_timeout_s": 60},
            "profiles": [{"name": "cam", "rtt_ms": 5, "jitter_ms": 0}],
        }
    )
    result: dict = {}
    runner = threading.Thread(target=lambda: result.update(run_load(cfg, progress=False)), daemon=True)
    runner.start()
    killed = []
    for deployment in ("VisionEncoder", "FirstPassDecoder", "RefinedDecoder", "SessionStore", "RoISearch", "Gateway"):
        time.sleep(5)
        actors = [
            a
            for a in ray.util.list_named_actors(all_namespaces=True)
            if f"{APP}#{deployment}#" in a["name"] or (deployment in a["name"] and "SERVE_REPLICA" in a["name"])
        ]
        if actors:
            ray.kill(ray.get_actor(actors[0]["name"], namespace=actors[0]["namespace"]), no_restart=True)
            killed.append(deployment)
    runner.join(timeout=400)
    assert not runner.is_alive(), "the load did not finish"
    assert len(killed) == 6, killed
    rows = result["rows"]
    assert rows and not result["failures"]
    failed = [r["error"] for r in rows if r["error"]]
    assert not failed, failed[:5]
    assert all(r["answer"] is not None for r in rows)
    assert sum(r["retries"] for r in rows) > 0  # the kills were felt, and retried
    item = next(generate_items(13, 1))
    client = EdgeClient(served, client_id="after-kills")
    assert wait_for(lambda: _answers(client, item), timeout=120, interval=2)
    client.close()


def _answers(client, item) -> bool:
    try:
        return client.ask(item.image, item.question, policy="always").stage == 2
    except Exception:
        return False


def test_bearer_token_live(served, tiny_config, tmp_path):
    """A second app whose Gateway has COLLAB_API_TOKEN in its environment, under a route prefix."""
    from ray import serve
    from serve_helpers import write_collab_config

    from deployments.app import compose
    from deployments.args import AppArgs

    cfg = write_collab_config(tiny_config, tmp_path / "collab.yaml")
    small = {"ray_actor_options": {"num_cpus": 0.01}}
    options = {
        name: small for name in ("VisionEncoder", "FirstPassDecoder", "RoISearch", "RefinedDecoder", "SessionStore")
    }
    options["Gateway"] = {
        "ray_actor_options": {"num_cpus": 0.01, "runtime_env": {"env_vars": {"COLLAB_API_TOKEN": "tok-123"}}}
    }
    serve.run(compose(AppArgs(config=str(cfg)), options), name="authapp", route_prefix="/auth")
    url = served + "/auth"
    try:
        assert wait_for(lambda: httpx.get(f"{url}/healthz", timeout=5).status_code == 200, timeout=120)
        assert httpx.get(f"{url}/healthz").status_code == 200  # health checks need no token
        assert httpx.get(f"{url}/v1/models").status_code == 401
        assert httpx.get(f"{url}/v1/models", headers={"Authorization": "Bearer nope"}).status_code == 401
        assert httpx.get(f"{url}/v1/models", headers={"Authorization": "Bearer tok-123"}).status_code == 200
        item = next(generate_items(14, 1))
        r = EdgeClient(url, client_id="authed", token="tok-123").ask(item.image, item.question, policy="always")
        assert r.stage == 2
        assert httpx.get(f"{served}/v1/models").status_code == 200  # the other app has no token set
    finally:
        serve.delete("authapp")
