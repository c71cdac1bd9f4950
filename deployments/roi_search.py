"""RoISearch: attention grid -> box in original pixels. CPU only, no model."""

from __future__ import annotations

import numpy as np
from ray import serve

from collab import stages
from deployments import metrics
from deployments.args import AppArgs
from deployments.common import load_collab_config


@serve.deployment  # options: serve_config.yaml `deployments:`
class RoISearch:
    def __init__(self, args: AppArgs):
        self.config = load_collab_config(args)

    def locate(
        self,
        attention: np.ndarray,
        original_size: tuple[int, int],
        global_size: tuple[int, int],
        local_size: tuple[int, int],
    ) -> stages.Located:
        timings: dict[str, float] = {}
        with metrics.timed("roi_search", timings):
            roi = stages.locate(
                attention,
                tuple(original_size),
                tuple(global_size),
                self.config.imaging.global_mode,
                self.config.roi,
                tuple(local_size),
            )
        metrics.roi().area.observe(roi.box.area / max(1, original_size[0] * original_size[1]))
        return stages.Located(roi, timings)
