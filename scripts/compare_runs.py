"""Did two training runs of one recipe give the same model? (the recipe's determinism, checked)

    python scripts/compare_runs.py runs/A runs/B

Compares the runs' training logs record by record, leaving out what measures time (the keys that
end in _s: elapsed, data wait and evaluation seconds; the run's minutes) and the paths a run
started from (init_tower, init_model, the recipe's start), and the weights they saved tensor by tensor
(model.safetensors and the stage-1 tower checkpoint, where both runs have them). Prints the first
record that differs, how many agree, and for weights the largest absolute difference; exits 0 only
where everything both runs hold is identical. It also prints the library versions each log
records (`software`): runs made with different ones are not expected to agree.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

import torch
from safetensors.torch import load_file

PATHS = ("init_tower", "init_model")  # where a run read its start from: another checkout, another path


def _records(log: Path) -> list[dict]:
    out = []
    for line in log.read_text().splitlines():
        record = json.loads(line)
        kept = {k: v for k, v in record.items() if not (k.endswith("_s") or k in ("minutes", "software", *PATHS))}
        if isinstance(kept.get("recipe"), dict):
            kept["recipe"] = {k: v for k, v in kept["recipe"].items() if k != "start"}
        out.append(kept)
    return out


def _software(log: Path) -> dict | None:
    lines = log.read_text().splitlines()
    return json.loads(lines[0]).get("software") if lines else None


def software_difference(a: Path, b: Path) -> str:
    """A line on the library versions the two logs record (logs before 2026-12-06 record none)."""
    sa, sb = _software(a), _software(b)
    if sa is None or sb is None:
        return "software: not recorded in " + " and ".join(str(p) for p, s in ((a, sa), (b, sb)) if s is None)
    diff = [f"{k} {sa.get(k)} / {sb.get(k)}" for k in sorted(set(sa) | set(sb)) if sa.get(k) != sb.get(k)]
    if not diff:
        return "software: the same (" + ", ".join(f"{k} {v}" for k, v in sa.items()) + ")"
    return "software differs, so the weights may too: " + "; ".join(diff)


def _same(a, b) -> bool:
    if isinstance(a, float) and isinstance(b, float) and math.isnan(a) and math.isnan(b):
        return True
    return a == b


def compare_logs(a: Path, b: Path) -> tuple[int, int, str | None]:
    """(records compared, records equal, first difference or None); compared up to the shorter log."""
    ra, rb = _records(a), _records(b)
    n = min(len(ra), len(rb))
    for i in range(n):
        diff = [k for k in sorted(set(ra[i]) | set(rb[i])) if not _same(ra[i].get(k), rb[i].get(k))]
        if diff:
            return n, i, f"record {i} (step {ra[i].get('step')}): {', '.join(diff[:6])}"
    return n, n, None


def _tensors(path: Path) -> dict[str, torch.Tensor]:
    if path.suffix == ".safetensors":
        return load_file(str(path))
    state = torch.load(path, map_location="cpu", weights_only=True)
    return {k: v for k, v in state.items() if isinstance(v, torch.Tensor)}


def compare_weights(a: Path, b: Path) -> tuple[int, float]:
    """(tensors, largest absolute difference); a missing or reshaped tensor is an infinite one."""
    ta, tb = _tensors(a), _tensors(b)
    worst = 0.0 if set(ta) == set(tb) else math.inf
    for name in set(ta) & set(tb):
        if ta[name].shape != tb[name].shape:
            worst = math.inf
        else:
            worst = max(worst, (ta[name].double() - tb[name].double()).abs().max().item() if ta[name].numel() else 0.0)
    return len(ta), worst


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("run_a", type=Path)
    p.add_argument("run_b", type=Path)
    args = p.parse_args(argv)
    identical = True
    print(software_difference(args.run_a / "training_log.jsonl", args.run_b / "training_log.jsonl"))
    n, equal, first = compare_logs(args.run_a / "training_log.jsonl", args.run_b / "training_log.jsonl")
    print(
        f"training logs: {equal} of {n} records equal (timings left out)"
        + (f"; first difference: {first}" if first else "")
    )
    identical &= first is None
    missing = 0
    for name in ("vision_tower_stage1.pt", "model.safetensors"):
        a, b = args.run_a / name, args.run_b / name
        if a.exists() and b.exists():
            count, worst = compare_weights(a, b)
            print(f"{name}: {count} tensors, largest absolute difference {worst:.3g}")
            identical &= worst == 0.0
        else:
            print(f"{name}: not in both runs")
            missing += 1
    print("different" if not identical else "identical" if n and missing == 0 else "identical as far as both runs go")
    return 0 if identical else 1


if __name__ == "__main__":
    sys.exit(main())
