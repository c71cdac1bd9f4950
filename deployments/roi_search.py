"""RoISearch: attention grid -> box in original pixels. CPU only, no model."""

from __future__ import annotations

import time

import numpy as np
from ray import serve

from collab import stages
from deployments.args import AppArgs
from deployments import metrics
from deployments.common import load_collab_config


@serve.deployment(ray_actor_options={"num_cpus": 0.1}, max_ongoing_requests=32)
class RoISearch:
    def __init__(self, args: AppArgs):
        self.config = load_collab_config(args)

    def locate(self, attention: np.ndarray, original_size: tuple[int, int], encoder_size: tuple[int, int]) -> dict:
        start = time.perf_counter()
        roi = stages.locate(attention, tuple(original_size), tuple(encoder_size), self.config.imaging.global_mode, self.config.roi)
        elapsed = (time.perf_counter() - start) * 1000
        metrics.stage_latency().observe(elapsed, tags={"stage": "roi_search"})
        metrics.roi().area.observe(roi.box.area / max(1, original_size[0] * original_size[1]))
        return {"box": roi.box.as_list(), "ratio": roi.ratio, "timings_ms": {"roi_search": elapsed}}
