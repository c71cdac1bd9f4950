"""One-off trial for issue 15's next step, not product code: `collab-vlm eval` with the per-head read
taken over several decoder layers at once (each (layer, head)'s sharpest relative row, geometric
mean over all of them), patched into collab.stages for this process only.

    python scripts/multilayer_read_trial.py --read-layers 0,1 -- --synthetic 1001:200 --model runs/e2e2 \
        --layers 0 --policies never,always --out runs/e2e2_L01
"""

import argparse
import sys

import numpy as np

import collab.stages as stages
from collab.eval.__main__ import main as eval_main


class StackedLayers:
    """A backend whose per-head rows at any one layer are those of `layers` stacked as more heads,
    so stages' own per-head read reduces them all together."""

    def __init__(self, backend, layers: list[int]):
        self.backend, self.layers = backend, layers

    def attention_rows_batch(self, requests, layers, query_rows, heads=None):
        rows = self.backend.attention_rows_batch(requests, self.layers, query_rows, heads)
        return [[np.concatenate(per_layer, 0)] * len(layers) for per_layer in rows]


def patch(read_layers: list[int]) -> None:
    per_head_maps_batch = stages._per_head_maps_batch
    stages._per_head_maps_batch = lambda backend, requests, cfg, layers: per_head_maps_batch(
        StackedLayers(backend, read_layers), requests, cfg, layers
    )


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--read-layers", required=True, help="comma-separated decoder layers read together")
    args, rest = p.parse_known_args()
    patch([int(x) for x in args.read_layers.split(",")])
    sys.exit(eval_main([a for a in rest if a != "--"]))
