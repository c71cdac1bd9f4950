"""When to refine: the paper's entropy gate and the baselines, selectable per request. `adaptive`
is the entropy gate at a threshold the gateway picks per request (collab.adaptive).

Random decisions are a pure function of (seed, query key), not of call order, so the in-process
pipeline and any number of distributed replicas make the same choice for the same query.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, replace

from collab.config import POLICIES, GateConfig, PolicyName, ScoreKind


@dataclass(frozen=True)
class PolicySpec:
    """A fully specified gate."""

    name: PolicyName = "entropy"
    score: ScoreKind = "min_entropy"
    threshold: float = 0.5
    aggregation_length: int | None = None
    random_rate: float = 0.5
    seed: int = 0

    def __post_init__(self) -> None:
        if self.name not in POLICIES:
            raise ValueError(f"unknown policy {self.name!r}; expected one of {POLICIES}")
        if not 0.0 <= self.random_rate <= 1.0:
            raise ValueError(f"random_rate must be in [0, 1], got {self.random_rate}")
        if self.aggregation_length is not None and self.aggregation_length < 1:
            raise ValueError("aggregation_length must be >= 1")

    @classmethod
    def from_gate(cls, gate: GateConfig, **overrides) -> PolicySpec:
        """The configured gate, with per-request overrides (None values are ignored)."""
        spec = cls(gate.policy, gate.score, gate.threshold, gate.aggregation_length, gate.random_rate, gate.seed)
        return replace(spec, **{k: v for k, v in overrides.items() if v is not None})


def stable_uniform(seed: int, key: str) -> float:
    """A uniform number in [0, 1) determined by (seed, key) alone."""
    digest = hashlib.blake2b(f"{seed}:{key}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big") / 2.0**64


def should_refine(spec: PolicySpec, uncertainty: float, key: str) -> bool:
    """The gate: True means ask the edge for a crop. `uncertainty` is higher-is-more-unsure."""
    if spec.name == "never":
        return False
    if spec.name == "always":
        return True
    if spec.name == "random":
        return stable_uniform(spec.seed, key) < spec.random_rate
    return uncertainty >= spec.threshold  # entropy, and adaptive at the threshold its controller chose
