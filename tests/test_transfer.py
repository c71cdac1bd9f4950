"""collab.eval.transfer: a calibrated threshold's refine rate on other splits, next to holding the rate."""

from dataclasses import dataclass

import numpy as np

from collab.eval.transfer import render, transfer_table
from collab.policies import PolicySpec


@dataclass
class Outcome:
    score: float
    first_acc: float
    refined_acc: float
    local_bytes: int = 2000
    global_bytes: int = 1000
    kind: str = "fine"

    def uncertainty(self, kind, length="all"):
        return self.score


def split(rng, n, shift):
    """Items whose refine helps exactly the unsure half; scores shifted by `shift` bits."""
    out = []
    for _ in range(n):
        unsure = rng.random() < 0.5
        score = (3.0 if unsure else 1.0) + rng.normal(0, 0.3) + shift
        out.append(Outcome(score, first_acc=0.0 if unsure else 1.0, refined_acc=1.0))
    return out


def test_a_score_shift_moves_the_static_refine_rate_and_holding_the_rate_does_not():
    rng = np.random.default_rng(0)
    calibration = split(rng, 400, 0.0)
    table = transfer_table(
        calibration, {"same": split(rng, 400, 0.0), "shifted": split(rng, 400, 1.0)}, PolicySpec(), 0.005
    )
    target = table["target_refine_rate"]
    assert 0.4 < target < 0.6 and 1.5 < table["threshold"] < 2.5
    same, shifted = table["splits"]["same"], table["splits"]["shifted"]
    assert abs(same["static"]["refine_rate"] - target) < 0.06
    assert shifted["static"]["refine_rate"] > target + 0.2  # scores rose: the static gate refines far more
    assert abs(shifted["rate_held"]["refine_rate"] - target) < 0.02  # the rate budget holds
    assert shifted["static"]["accuracy"] == 1.0 and shifted["always"]["accuracy"] == 1.0
    assert shifted["never"]["threshold"] is None and "calibration" in render(table)
