"""python -m collab.training: train the embedded model from a recipe file (see collab.training.train)."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

from collab.config import ConfigError, parse_sets
from collab.training.recipe import load_recipe
from collab.training.train import STAGES, check_from_part, starting_point, train


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m collab.training",
        description="Train the embedded tiny LLaVA from scratch on synthetic fine-detail VQA: stage 1 pre-trains the "
        "vision tower on scene labels, stage 2 trains the whole model on answers. Everything that decides the weights "
        "is in the recipe file; the result loads with from_pretrained (configs/default.yaml's model.path).",
    )
    p.add_argument(
        "--recipe",
        type=Path,
        default=Path("configs/training/embedded.yaml"),
        help="recipe YAML (default: %(default)s; the GPU variant: configs/training/embedded_gpu.yaml)",
    )
    p.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a recipe field, e.g. --set vlm.steps=200 --set runtime.workers=0 (YAML values)",
    )
    p.add_argument("--out", type=Path, required=True, help="output model directory")
    p.add_argument("--log", type=Path, help="JSONL metrics file (default: OUT/training_log.jsonl)")
    p.add_argument("--stages", default=",".join(STAGES), help="comma-separated subset of %(default)s")
    p.add_argument(
        "--init-tower",
        type=Path,
        help="with --stages vlm: the stage-1 tower (OUT/vision_tower_stage1.pt "
        "of an earlier run, or a saved model directory)",
    )
    p.add_argument(
        "--init-model",
        type=Path,
        help="warm start from a saved model directory (same sizes and tokenizer): "
        "with --stages vlm, a continuation of stage 2",
    )
    p.add_argument(
        "--from-part",
        type=int,
        default=None,
        metavar="N",
        help="resume the recipe at its continuation N (1: the first) from --init-model, the model its parts before "
        "N left, or from --init-tower where they trained the tower only (vlm.steps 0); e.g. the shipped model's "
        "stage 2 from the tower before it (default: 0, the whole recipe). Where none of --from-part, --init-tower and "
        "--init-model is given, the recipe's `start` gives them",
    )
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    stages = tuple(s.strip() for s in args.stages.split(",") if s.strip())
    try:
        recipe = load_recipe(args.recipe, parse_sets(args.set) or None)
        if set(stages) - set(STAGES) or not stages:
            raise ConfigError(f"--stages must be a subset of {','.join(STAGES)}")
        flags = args.from_part is not None or args.init_tower is not None or args.init_model is not None
        args.from_part, args.init_tower, args.init_model = starting_point(
            recipe, args.from_part, args.init_tower, args.init_model
        )
        if "tower" not in stages and "vlm" in stages and args.init_tower is None and args.init_model is None:
            raise ConfigError("--stages vlm needs --init-tower or --init-model")
        check_from_part(len(recipe.parts()), args.from_part, args.init_model, args.init_tower)
        for name in ("init_tower", "init_model"):
            path = getattr(args, name)
            if path is not None and not path.exists():
                key = "--" + name.replace("_", "-") if flags else f"start.{name[5:]}"
                raise ConfigError(f"{key}: {path} does not exist")
        from collab.training.loop import resolve_device

        resolve_device(recipe.runtime.device)
    except (ConfigError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    args.out.mkdir(parents=True, exist_ok=True)
    log = args.log or args.out / "training_log.jsonl"
    train(recipe, args.out, log, stages, args.init_tower, args.init_model, args.from_part)
    print(f"saved to {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
