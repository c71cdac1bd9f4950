"""Ask the running app about your own image, as an edge device would.

    collab-vlm ask photo.jpg "what is written on the sign?"
    collab-vlm ask photo.jpg "what number is on the door?" --url http://head-node:8000 --policy always

Makes the global image the server asks for (GET /v1/models), sends it with the question, and when
the server answers `need_roi` crops that box from the ORIGINAL and sends it. Prints the answer,
the gate's score, the box and the bytes each upload cost, and writes a picture of the image with
the box (default runs/ask/<image name>.png). Exit status 2 on a bad argument or a refused request.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from dataclasses import asdict
from pathlib import Path

import httpx

from collab.config import POLICIES

DEFAULT_URL = "http://127.0.0.1:8000"


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="collab-vlm ask",
        description=__doc__.split("\n\n")[0],
        epilog="Start the app first: `collab-vlm serve` (or `serve run serve_config.yaml`).",
    )
    p.add_argument("image", help="an image file (JPEG, PNG, ...): the ORIGINAL, at the resolution you have")
    p.add_argument("question", help="the question about it")
    p.add_argument(
        "--url",
        default=os.environ.get("COLLAB_URL", DEFAULT_URL),
        help="gateway URL (default: $COLLAB_URL or %(default)s)",
    )
    p.add_argument("--policy", choices=POLICIES, help="gate policy (default: the server's)")
    p.add_argument("--threshold", type=float, help="gate threshold in bits (default: the server's)")
    p.add_argument("--quality", type=int, default=90, help="JPEG quality of the uploads (default: %(default)s)")
    p.add_argument(
        "--out", help="PNG of the image with the box (default: runs/ask/<image name>.png); 'none' for no picture"
    )
    p.add_argument("--json", action="store_true", help="print the result as JSON")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from PIL import UnidentifiedImageError

    from collab.imaging import full_resolution_bytes, load_image
    from edge_agents.client import EdgeClient, EdgeImaging, ProtocolError
    from edge_agents.pictures import QueryView, query_png

    try:
        original = load_image(args.image)
    except (OSError, UnidentifiedImageError, ValueError) as exc:
        print(f"error: cannot read {args.image}: {exc}", file=sys.stderr)
        return 2
    imaging = EdgeImaging(jpeg_quality=args.quality)
    client = EdgeClient(args.url, client_id="collab-vlm-ask", imaging=imaging)
    try:
        result = client.ask(original, args.question, policy=args.policy, threshold=args.threshold)
        info = client.models()
    except ProtocolError as exc:
        print(f"error: the server refused the request: {exc}", file=sys.stderr)
        return 2
    except httpx.HTTPError as exc:
        print(
            f"error: cannot reach {args.url} ({type(exc).__name__}); start the app with `collab-vlm serve`",
            file=sys.stderr,
        )
        return 2
    finally:
        client.close()
    full = full_resolution_bytes(original, "jpeg", args.quality)
    picture = None
    if (args.out or "").lower() != "none":
        picture = query_png(
            QueryView(original, args.question, result),
            info,
            imaging,
            args.out or Path("runs/ask") / f"{Path(args.image).stem}.png",
        )
    if args.json:
        print(
            json.dumps({**asdict(result), "full_resolution_bytes": full, "picture": str(picture) if picture else None})
        )
        return 0
    print(
        f"answer:  {result.answer}  (stage "
        f"{result.stage}{', first pass: ' + str(result.first_answer) if result.stage == 2 else ''})"
    )
    score = "-" if result.score is None else f"{result.score:.3f} bits"
    print(
        f"gate:    policy {result.policy}, score {score}"
        + (", session expired: first-pass answer kept" if result.session_expired else "")
    )
    print(f"box:     {result.box if result.box else 'none (answered from the global image)'}")
    sent = result.global_bytes + result.local_bytes
    print(
        f"uplink:  {result.global_bytes:,} B global + {result.local_bytes:,} B crop = {sent:,} B "
        f"({100 * sent / full:.1f} % of the {full:,} B original)"
    )
    if picture:
        print(f"picture: {picture}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
