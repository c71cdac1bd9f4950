import io

import numpy as np
import pytest
from PIL import Image

from collab.geometry import Box, CanvasGeometry
from collab.imaging import crop_local_image, decode_image, encode_image, load_image, make_global_image, to_rgb


def gradient(w, h):
    x = np.linspace(0, 255, w, dtype=np.uint8)[None, :].repeat(h, 0)
    y = np.linspace(0, 255, h, dtype=np.uint8)[:, None].repeat(w, 1)
    return Image.fromarray(np.stack([x, y, 255 - x], -1), "RGB")


@pytest.mark.parametrize("fmt", ["jpeg", "png"])
def test_payload_bytes_are_the_encoded_file(fmt):
    payload = encode_image(gradient(64, 48), fmt, quality=80)
    assert payload.nbytes == len(payload.data) > 0
    assert payload.data[:3] == (b"\xff\xd8\xff" if fmt == "jpeg" else b"\x89PN")
    assert decode_image(payload.data).size == (64, 48)


def test_jpeg_quality_changes_size_and_is_validated():
    img = gradient(128, 128)
    assert encode_image(img, "jpeg", 95).nbytes > encode_image(img, "jpeg", 20).nbytes
    with pytest.raises(ValueError):
        encode_image(img, "jpeg", 0)
    with pytest.raises(ValueError):
        encode_image(img, "gif")


@pytest.mark.parametrize("mode", ["RGBA", "P", "L", "CMYK", "LA", "1", "I;16", "I", "F"])
def test_modes_become_rgb(mode):
    if mode == "I;16":
        img = Image.fromarray(np.full((8, 8), 65535, dtype=np.uint16))
        assert img.mode == "I;16"
    elif mode == "I":
        img = Image.fromarray(np.full((8, 8), 65535, dtype=np.int32))
    elif mode == "F":
        img = Image.fromarray(np.full((8, 8), 1.0, dtype=np.float32))
    else:
        img = gradient(8, 8).convert(mode)
    out = to_rgb(img)
    assert out.mode == "RGB" and out.size == (8, 8)
    if mode in ("I;16", "I", "F"):
        assert np.asarray(out).min() == 255  # full-scale white, not clipped garbage


def test_transparent_pixels_composite_on_white():
    img = Image.new("RGBA", (4, 4), (255, 0, 0, 0))
    assert to_rgb(img).getpixel((0, 0)) == (255, 255, 255)


def test_exif_orientation_is_applied():
    img = gradient(40, 20)
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 CW when displayed
    buf = io.BytesIO()
    img.save(buf, format="JPEG", exif=exif)
    assert load_image(buf.getvalue()).size == (20, 40)


def test_multi_frame_takes_first_frame():
    frames = [Image.new("RGB", (10, 10), c) for c in ((255, 0, 0), (0, 255, 0))]
    buf = io.BytesIO()
    frames[0].save(buf, format="GIF", save_all=True, append_images=frames[1:])
    assert load_image(buf.getvalue()).getpixel((5, 5))[0] > 200


def test_global_resize_and_pad_geometry_round_trip():
    original = gradient(800, 400)
    resized, geo = make_global_image(original, (96, 96), "resize")
    assert resized.size == (96, 96) and geo.scale == (96 / 800, 96 / 400)
    padded, geo_pad = make_global_image(original, (96, 96), "pad", (7, 7, 7))
    assert padded.size == (96, 96) and geo_pad.content_size == (96, 48) and geo_pad.offset == (0, 24)
    assert padded.getpixel((50, 5)) == (7, 7, 7)  # padding
    for g in (geo, geo_pad):
        for x, y in [(0, 0), (800, 400), (123.5, 77.25), (799, 1)]:
            u, v = g.to_canvas(x, y)
            assert g.to_original(u, v) == pytest.approx((x, y))


def test_geometry_maps_the_pixels():
    """A red dot in the original lands where to_canvas says, in both modes."""
    original = Image.new("RGB", (900, 450), (0, 0, 0))
    original.paste((255, 0, 0), (600, 300, 630, 330))
    for mode in ("resize", "pad"):
        canvas, geo = make_global_image(original, (90, 90), mode)
        u, v = geo.to_canvas(615, 315)
        r, g, b = canvas.getpixel((int(u), int(v)))
        assert r > 150 and g < 80, mode


def test_local_crop_comes_from_the_original():
    original = Image.new("RGB", (1000, 800), (0, 0, 255))
    original.paste((0, 255, 0), (500, 400, 600, 500))
    local = crop_local_image(original, Box(500, 400, 600, 500), (64, 64))
    assert local.size == (64, 64)
    assert np.asarray(local)[..., 1].min() > 200  # all green: exactly the box
    with pytest.raises(ValueError):
        crop_local_image(original, Box(900, 700, 1100, 900), (64, 64))


def test_canvas_geometry_validates():
    with pytest.raises(ValueError):
        CanvasGeometry.create((0, 10), (96, 96), "resize")
    with pytest.raises(ValueError):
        CanvasGeometry.create((10, 10), (96, 96), "squash")


def test_server_global_from_an_uploaded_original():
    from collab.imaging import InvalidUpload, make_global_image, server_global, upload_cap

    photo = Image.new("RGB", (1600, 1200), (10, 200, 30))
    made, original = server_global(photo, (96, 96), (None, None), "resize")
    assert original == (1600, 1200) and made.size == (96, 96)
    assert np.array_equal(
        np.asarray(made), np.asarray(make_global_image(photo, (96, 96), "resize")[0])
    )  # as the edge would
    # a downscale of a declared original: the box maps to the declared original's pixels
    assert server_global(photo.resize((800, 600)), (96, 96), (1600, 1200), "pad")[1] == (1600, 1200)
    # already the global image: nothing to make; the original's size defaults to the upload's
    assert server_global(Image.new("RGB", (96, 96)), (96, 96), (400, 300), "resize") == (None, (400, 300))
    assert server_global(Image.new("RGB", (96, 96)), (96, 96), (None, None), "resize") == (None, (96, 96))
    for size, declared in (((64, 48), (400, 300)), ((800, 800), (400, 300))):
        with pytest.raises(InvalidUpload, match="96x96") as info:
            server_global(Image.new("RGB", size), (96, 96), declared, "resize")
        assert info.value.reason == "size"
    assert upload_cap((96, 96), 8 * 2**20) == 3 * 96 * 96 + 256 * 1024 and upload_cap((96, 96), 1000) == 1000


def test_budget_size_is_qwen_vls_own_resize():
    """collab.imaging.budget_size == transformers' smart_resize (which the Qwen-VL processor applies),
    on photo sizes from thumbnails to 48 MP and strong aspect ratios, at two budgets."""
    from hypothesis import given, settings
    from hypothesis import strategies as st
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import smart_resize

    from collab.imaging import budget_size

    @settings(max_examples=300, deadline=None, derandomize=True, database=None)
    @given(st.integers(8, 8000), st.integers(8, 8000), st.sampled_from([(28, 256), (32, 1024), (28, 1280)]))
    def check(width, height, budget):
        unit, tokens = budget
        if max(width, height) / min(width, height) > 200:
            return
        want_h, want_w = smart_resize(
            height, width, factor=unit, min_pixels=4 * unit * unit, max_pixels=tokens * unit * unit
        )
        w, h = budget_size((width, height), unit, tokens)
        assert (w, h) == (want_w, want_h)
        assert w % unit == 0 and h % unit == 0 and 4 <= (w // unit) * (h // unit) <= tokens

    check()


def test_global_image_at_a_token_budget_server_and_edge_agree():
    """API 1.1: with a budget the global image keeps the original's aspect ratio; the edge sizes it
    from /v1/models alone, and the server accepts exactly that size, or makes it from the original."""
    from collab.imaging import (
        GlobalBudget,
        InvalidUpload,
        describe_global_image,
        global_size_from,
        server_global,
    )

    budget = GlobalBudget(28, 256)
    described = describe_global_image((448, 448), budget)
    assert described == {"mode": "budget", "unit": 28, "max_tokens": 256, "min_tokens": 4}
    size = global_size_from({"global_image": described, "encoder_size": [448, 448]}, (1600, 1200))
    assert size == budget.size_for((1600, 1200)) == (504, 364)  # 18 x 13 tokens (smart_resize floors both sides)
    # an old (1.0) server: no global_image field, the global image is encoder_size
    assert global_size_from({"encoder_size": [336, 336]}, (1600, 1200)) == (336, 336)
    assert global_size_from({"global_image": describe_global_image((96, 96), None)}, (1600, 1200)) == (96, 96)

    edge_made = Image.new("RGB", size)
    assert server_global(edge_made, (448, 448), (1600, 1200), "resize", budget) == (None, (1600, 1200))
    made, original = server_global(Image.new("RGB", (1600, 1200)), (448, 448), (None, None), "resize", budget)
    assert made.size == size and original == (1600, 1200)
    with pytest.raises(InvalidUpload, match="504x364 for a 1600x1200 original") as info:
        server_global(Image.new("RGB", (448, 448)), (448, 448), (1600, 1200), "resize", budget)  # the square: refused
    assert info.value.reason == "size"
    with pytest.raises(ValueError):
        GlobalBudget(28, 2, 4)
    # the photo itself, smaller than its global image on one side (300 px -> 308): made, not refused
    made, original = server_global(Image.new("RGB", (400, 300)), (448, 448), (None, None), "resize", budget)
    assert made.size == (392, 308) and original == (400, 300)
    for upload, declared in (((2010, 10), (None, None)), ((448, 448), (65535, 1))):  # no token grid holds these
        with pytest.raises(InvalidUpload, match="no global image can be made") as info:
            server_global(Image.new("RGB", upload), (448, 448), declared, "resize", budget)
        assert info.value.reason == "size"
