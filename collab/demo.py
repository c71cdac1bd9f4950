"""Run the two-stage protocol in-process on a few queries and print one JSON record per query.

python -m collab.demo                         # synthetic benchmark items, default config
python -m collab.demo --image photo.jpg --question "what is written on the sign?"
"""

from __future__ import annotations

import argparse
import json
import sys

from collab.backends import ModelLoadError, load_backend
from collab.config import POLICIES, ConfigError, load_config
from collab.paths import DEFAULT_CONFIG, REPO_ROOT
from collab.pipeline import ReferencePipeline


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m collab.demo",
        description="Run queries through edge and server in one process (the reference pipeline) "
        "and print each query's record: answers of both stages, uncertainty, gate decision, RoI box, "
        "uplink bytes per stage and time per stage.",
    )
    p.add_argument("--config", default=str(DEFAULT_CONFIG), help="YAML configuration (default: %(default)s)")
    p.add_argument("--model", help="override model.path (hub id already cached, or a local directory)")
    p.add_argument("--image", help="an image file; default: synthetic benchmark items")
    p.add_argument("--question", help="question about --image")
    p.add_argument("--n", type=int, default=4, help="synthetic items to run when no --image (default: %(default)s)")
    p.add_argument("--seed", type=int, default=2024, help="synthetic benchmark seed (default: %(default)s)")
    p.add_argument("--policy", choices=POLICIES, help="override gate.policy")
    p.add_argument("--threshold", type=float, help="override gate.threshold")
    p.add_argument("--compact", action="store_true", help="one line per record instead of indented JSON")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if (args.image is None) != (args.question is None):
        print("error: --image and --question go together", file=sys.stderr)
        return 2
    overrides = {"model": {"path": args.model}} if args.model else None
    try:
        config = load_config(args.config, overrides)
        backend = load_backend(config.model, search_roots=[REPO_ROOT])
    except (ConfigError, ModelLoadError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    pipeline = ReferencePipeline(backend, config)
    policy = pipeline.policy(name=args.policy, threshold=args.threshold)

    if args.image:
        queries = [(args.image, args.question, "cli-0", None)]
    else:
        from collab.data.synthetic import generate_items

        queries = [(it.image, it.question, it.question_id, it.answer) for it in generate_items(args.seed, args.n)]

    correct = 0
    for image, question, qid, truth in queries:
        record = pipeline.run(image, question, question_id=qid, policy=policy).to_dict()
        if truth is not None:
            record["ground_truth"] = truth
            correct += int(record["answer"] == truth)
        print(json.dumps(record, indent=None if args.compact else 2))
    if queries and queries[0][3] is not None:
        print(
            f"# {correct}/{len(queries)} correct, model {backend.info.model_name}, policy {policy.name}",
            file=sys.stderr,
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
