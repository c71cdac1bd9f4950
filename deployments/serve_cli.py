"""`collab-vlm serve`: `serve run` on this app's Serve config, with the environment it expects.

collab-vlm serve                            # serve_config.yaml: the embedded model, 2 CPUs, 127.0.0.1:8000
collab-vlm serve configs/serve_gpu.yaml     # a GPU cluster (run on the head node, or pass --address)
collab-vlm serve -- --address ray://head:10001   # anything after -- goes to `serve run`
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from collab.paths import REPO_ROOT


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    extra: list[str] = []
    if "--" in argv:
        at = argv.index("--")
        argv, extra = argv[:at], argv[at + 1 :]
    p = argparse.ArgumentParser(
        prog="collab-vlm serve",
        description=__doc__.split("\n\n")[0],
        epilog="Stop with Ctrl-C. Options of `serve run` itself go after `--` (serve run --help).",
    )
    p.add_argument(
        "config",
        nargs="?",
        default=str(REPO_ROOT / "serve_config.yaml"),
        help="Serve config file (default: the repository's serve_config.yaml)",
    )
    args = p.parse_args(argv)
    config = Path(args.config).resolve()  # before the chdir below: relative to where the user is
    if not config.is_file():
        print(f"error: Serve config not found: {config}", file=sys.stderr)
        return 2
    # Offline by design: nothing may download weights; Ray's usage stats stay off unless asked for.
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    os.chdir(REPO_ROOT)  # the config's import_path and relative paths are the repository's
    from ray.serve.scripts import cli

    return (
        cli.main(args=["run", str(config.resolve()), *extra], prog_name="collab-vlm serve", standalone_mode=True) or 0
    )


if __name__ == "__main__":
    sys.exit(main())
