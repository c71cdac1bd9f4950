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
from collab.attention import combine_maps
from collab.eval.__main__ import main as eval_main


def patch(read_layers: list[int]) -> None:
    def per_head_maps_batch(backend, requests, cfg, layers):
        questions = stages._question_requests(requests, cfg)
        qs = backend.attention_rows_batch(questions, read_layers, cfg.query_rows, cfg.heads)
        gen = [stages.AttentionRequest(r.features, cfg.generic_prompt) for r in requests]
        gs = backend.attention_rows_batch(gen, read_layers, stages._generic_rows(cfg), cfg.heads)
        out = []
        for q_layers, g_layers in zip(qs, gs):
            q, g = np.concatenate(q_layers, 0), np.concatenate(g_layers, 0)  # (layers x heads, rows, h, w)
            flat = combine_maps(
                q.reshape(*q.shape[:2], -1), g.reshape(*g.shape[:2], -1), cfg.rows, cfg.head_reduce, cfg.epsilon
            )
            out.append([flat.reshape(q.shape[2:])] * len(layers))
        return out

    stages._per_head_maps_batch = per_head_maps_batch


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--read-layers", required=True, help="comma-separated decoder layers read together")
    args, rest = p.parse_known_args()
    patch([int(x) for x in args.read_layers.split(",")])
    sys.exit(eval_main([a for a in rest if a != "--"]))
