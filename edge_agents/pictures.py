"""Pictures of what the edge and the server did for a query: the image with the requested box, the
global image as sent, the crop, and both answers. `collab-vlm ask` writes one per query;
`make demo` writes a sheet of several (runs/demo/queries.png)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from PIL import Image, ImageDraw, ImageFont

from collab.imaging import decode_image
from edge_agents.client import EdgeImaging, EdgeResult, global_upload, local_upload

BOX_COLOR = (255, 40, 200)


@dataclass
class QueryView:
    """One query, as the figures show it."""

    original: Image.Image
    question: str
    result: EdgeResult
    truth: str | None = None

    def caption(self) -> str:
        r = self.result
        verdict = "" if self.truth is None else (" (right)" if r.answer == self.truth else f" (wrong: {self.truth})")
        score = "-" if r.score is None else f"{r.score:.2f}"
        lines = [self.question, f"answer: {r.answer}{verdict}"]
        if r.stage == 2:
            lines.append(f"first pass: {r.first_answer}, score {score}: refined from the crop")
        else:
            lines.append(
                f"score {score}: answered from the global image" + (" (session expired)" if r.session_expired else "")
            )
        lines.append(f"uplink {r.global_bytes:,} + {r.local_bytes:,} bytes")
        return "\n".join(lines)


def with_box(original: Image.Image, box: list[int] | None, width: int | None = None) -> Image.Image:
    """The original (scaled to `width` if given) with the RoI box drawn on it."""
    image = original.convert("RGB")
    scale = 1.0
    if width and image.width != width:
        scale = width / image.width
        image = image.resize((width, max(1, round(image.height * scale))), Image.BILINEAR)
    if box:
        draw = ImageDraw.Draw(image)
        line = max(2, round(image.width / 160))
        draw.rectangle([round(v * scale) for v in box], outline=BOX_COLOR, width=line)
    return image


def sent_images(view: QueryView, info: dict, imaging: EdgeImaging) -> tuple[Image.Image, Image.Image | None]:
    """What the server saw: the decoded global upload, and the decoded crop if one was sent."""
    global_image = decode_image(global_upload(view.original, info, imaging).data)
    local = None
    if view.result.box:
        size = tuple(info.get("local_size") or info["encoder_size"])
        local = decode_image(local_upload(view.original, view.result.box, list(size), imaging).data)
    return global_image, local


def query_png(view: QueryView, info: dict, imaging: EdgeImaging, path: str | Path, width: int = 640) -> Path:
    """One query's picture: the image with the box, and beside it what was sent, under a caption."""
    boxed = with_box(view.original, view.result.box, width)
    global_image, local = sent_images(view, info, imaging)
    thumb = max(96, width // 4)
    side = [im.resize((thumb, thumb), Image.NEAREST) for im in (global_image, local) if im is not None]
    caption = view.caption().splitlines() + [
        "left: the original with the requested box; right: the global image"
        + (" and the crop" if local is not None else "")
        + " as sent"
    ]
    line_h = 16
    canvas = Image.new(
        "RGB",
        (boxed.width + thumb + 24, max(boxed.height, len(side) * (thumb + 8)) + line_h * len(caption) + 16),
        "white",
    )
    canvas.paste(boxed, (8, 8))
    for i, im in enumerate(side):
        canvas.paste(im, (boxed.width + 16, 8 + i * (thumb + 8)))
    draw = ImageDraw.Draw(canvas)
    font = ImageFont.load_default(size=13)  # Pillow's bundled TrueType font (its bitmap one squeezes spaces)
    y = max(boxed.height, len(side) * (thumb + 8)) + 12
    for text in caption:
        draw.text((8, y), text, fill=(0, 0, 0), font=font)
        y += line_h
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    canvas.save(path)
    return path


def queries_sheet(views: list[QueryView], info: dict, imaging: EdgeImaging, path: str | Path) -> Path:
    """Several queries, one row each: original with box | global image as sent | crop | answers."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(
        len(views), 4, figsize=(12, 2.9 * len(views)), squeeze=False, gridspec_kw={"width_ratios": [1.4, 1, 1, 1.8]}
    )
    for row, view in zip(axes, views):
        global_image, local = sent_images(view, info, imaging)
        panels = [
            (with_box(view.original, view.result.box, 448), "original, requested box"),
            (global_image, f"global image sent ({view.result.global_bytes:,} B)"),
            (local, f"crop sent ({view.result.local_bytes:,} B)" if local is not None else "no crop requested"),
        ]
        for ax, (image, title) in zip(row, panels):
            if image is not None:
                ax.imshow(image, interpolation="nearest")
            ax.set_title(title, fontsize=8)
            ax.axis("off")
        row[3].axis("off")
        row[3].text(0, 0.5, view.caption(), fontsize=8, va="center", family="monospace", wrap=True)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
