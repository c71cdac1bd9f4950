"""`collab-vlm`: one command for what users do with collab-vlm.

Each subcommand is a module's own command line (`python -m MODULE` keeps working); this only
dispatches, importing nothing heavy (and nothing from Ray) until a subcommand is chosen.
"""

from __future__ import annotations

import importlib
import sys

# name -> (module with main(argv), what it does)
COMMANDS: dict[str, tuple[str, str]] = {
    "serve": ("deployments.serve_cli", "run the Serve app (`serve run serve_config.yaml`, or another Serve config)"),
    "ask": (
        "edge_agents.ask",
        "ask the running app about your own image, as an edge would; writes a picture with the box",
    ),
    "demo": ("edge_agents.demo", "start the app, show a few queries (and a picture of them), then a short edge load"),
    "local": ("collab.demo", "run the two-stage protocol in one process, no Ray (prints each query's record)"),
    "eval": (
        "collab.eval.__main__",
        "evaluate the method: calibration, threshold sweep, bytes vs accuracy, RoI quality",
    ),
    "loadtest": ("edge_agents.loadtest", "load the app with simulated edge agents over simulated links"),
    "train": ("collab.training.__main__", "train the embedded model from a recipe file"),
    "probe": ("collab.eval.probe", "linear probes: what the visual tokens of objects and crops hold"),
    "heads": ("collab.eval.heads", "choose the (layer, head) pairs whose attention the RoI search reads"),
    "data": ("collab.data.synthetic", "write a synthetic benchmark split to disk"),
}


def usage() -> str:
    width = max(map(len, COMMANDS))
    lines = ["usage: collab-vlm COMMAND [ARGS...]   (collab-vlm COMMAND --help for its options)", "", "commands:"]
    lines += [f"  {name:<{width}}  {help_}" for name, (_, help_) in COMMANDS.items()]
    lines += ["", "Quick start: `collab-vlm demo`; then `collab-vlm serve` and `collab-vlm ask IMAGE QUESTION`."]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(usage())
        return 0
    name, rest = argv[0], argv[1:]
    if name not in COMMANDS:
        print(f"collab-vlm: unknown command {name!r}\n\n{usage()}", file=sys.stderr)
        return 2
    module = importlib.import_module(COMMANDS[name][0])
    sys.argv = [f"collab-vlm {name}", *rest]  # so each parser's usage line names the command
    return int(module.main(rest) or 0)


if __name__ == "__main__":
    sys.exit(main())
