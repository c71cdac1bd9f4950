"""How unsure is the model of its answer? Per-token scores, their aggregation, and separability.

Three per-token scores from the next-token distribution (all in float32 via log-softmax, so fp16
or bf16 logits neither overflow nor underflow):

- min-entropy  -log2 max_k p_k          (the paper's choice: best separates right from wrong)
- Shannon      -sum_k p_k log2 p_k
- margin       p_(1) - p_(2)            (high = confident)

The gate needs one direction for all of them, "higher = more unsure": `uncertainty()` returns the
entropies as they are and `1 - margin` for the margin.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch

SCORE_KINDS = ("min_entropy", "shannon", "margin")
_LOG2 = math.log(2.0)


@dataclass(frozen=True)
class TokenScores:
    """Per-token scores of one answer, each a float list of length T (generated steps)."""

    min_entropy: list[float]
    shannon: list[float]
    margin: list[float]

    def get(self, kind: str) -> list[float]:
        if kind not in SCORE_KINDS:
            raise ValueError(f"unknown score kind {kind!r}; expected one of {SCORE_KINDS}")
        return getattr(self, kind)


def token_scores(logits: torch.Tensor) -> TokenScores:
    """Scores for each row of `logits` (T, V): one row per generated step."""
    if logits.ndim != 2:
        raise ValueError(f"logits must be (steps, vocab), got shape {tuple(logits.shape)}")
    logp = torch.log_softmax(logits.detach().float(), dim=-1)
    top2 = logp.topk(k=min(2, logp.shape[-1]), dim=-1).values
    min_entropy = -top2[:, 0] / _LOG2
    p = logp.exp()
    # 0 * log 0 := 0 — masked so that -inf logits (e.g. banned tokens) give no NaN.
    shannon = -(torch.where(p > 0, p * logp, torch.zeros_like(p))).sum(-1) / _LOG2
    p_top = top2.exp()
    margin = p_top[:, 0] - (p_top[:, 1] if p_top.shape[1] > 1 else 0.0)
    return TokenScores(min_entropy.tolist(), shannon.tolist(), margin.tolist())


def answer_length(token_ids: list[int], eos_token_ids: set[int] | frozenset[int]) -> int:
    """Number of answer tokens before the first EOS (EOS itself excluded)."""
    for i, tok in enumerate(token_ids):
        if tok in eos_token_ids:
            return i
    return len(token_ids)


def aggregate(values: list[float], n_answer_tokens: int, length: int | None = None) -> float:
    """Mean of the first L answer-token scores (L=None: all answer tokens).

    EOS is excluded; an answer that is only EOS falls back to the EOS step's score, so an empty
    answer still gets a score rather than NaN.
    """
    if not values:
        raise ValueError("no generated steps to score")
    n = n_answer_tokens if n_answer_tokens > 0 else 1
    if length is not None:
        if length < 1:
            raise ValueError("aggregation length must be >= 1")
        n = min(n, length)
    return float(np.mean(values[:n]))


def uncertainty(kind: str, value: float) -> float:
    """Map a score onto 'higher = more unsure' so one threshold rule fits every kind."""
    if kind == "margin":
        return 1.0 - value
    if kind in SCORE_KINDS:
        return value
    raise ValueError(f"unknown score kind {kind!r}; expected one of {SCORE_KINDS}")


def answer_uncertainties(scores: TokenScores, n_answer_tokens: int, length: int | None = None) -> dict[str, float]:
    """All three aggregated uncertainties (higher = more unsure) of one answer."""
    return {kind: uncertainty(kind, aggregate(scores.get(kind), n_answer_tokens, length)) for kind in SCORE_KINDS}


# --------------------------------------------------------------------------- separability


@dataclass(frozen=True)
class Separability:
    """How well a score separates incorrect (positives) from correct answers."""

    overlap: float  # histogram overlap coefficient, sum_i min(p_i, q_i): 0 = disjoint, 1 = identical
    bhattacharyya: float  # -ln sum_i sqrt(p_i q_i): 0 = identical, larger = better separated
    auc: float  # P(score_incorrect > score_correct) + 0.5 P(tie)
    bins: int

    def as_dict(self) -> dict[str, float]:
        return {"overlap": self.overlap, "bhattacharyya": self.bhattacharyya, "auc": self.auc, "bins": self.bins}


def shared_histograms(a: np.ndarray, b: np.ndarray, bins: int = 20) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Normalised histograms of two samples on the SAME equal-width bins spanning both samples.

    Binning: `bins` equal-width bins from min(a ∪ b) to max(a ∪ b) (numpy's rule, right edge
    closed). Both overlap and Bhattacharyya depend on the binning, so it is fixed and reported.
    """
    a = np.asarray(a, dtype=np.float64)
    b = np.asarray(b, dtype=np.float64)
    if a.size == 0 or b.size == 0:
        raise ValueError("both samples must be non-empty")
    lo = float(min(a.min(), b.min()))
    hi = float(max(a.max(), b.max()))
    if hi <= lo:
        hi = lo + 1e-12
    edges = np.linspace(lo, hi, bins + 1)
    pa, _ = np.histogram(a, bins=edges)
    pb, _ = np.histogram(b, bins=edges)
    return pa / pa.sum(), pb / pb.sum(), edges


def overlap_coefficient(p: np.ndarray, q: np.ndarray) -> float:
    return float(np.minimum(p, q).sum())


def bhattacharyya_distance(p: np.ndarray, q: np.ndarray) -> float:
    bc = float(np.sqrt(p * q).sum())
    return float(-math.log(bc)) if bc > 0 else math.inf


def roc_auc(positives: np.ndarray, negatives: np.ndarray) -> float:
    """Mann-Whitney AUC: probability that a positive scores above a negative (ties count half)."""
    pos = np.asarray(positives, dtype=np.float64)
    neg = np.sort(np.asarray(negatives, dtype=np.float64))
    if pos.size == 0 or neg.size == 0:
        raise ValueError("both samples must be non-empty")
    below = np.searchsorted(neg, pos, side="left")
    ties = np.searchsorted(neg, pos, side="right") - below
    return float((below + 0.5 * ties).sum() / (pos.size * neg.size))


def separability(incorrect: np.ndarray, correct: np.ndarray, bins: int = 20) -> Separability:
    """Compare uncertainty of incorrect answers (should be high) with correct ones (low)."""
    p, q, _ = shared_histograms(incorrect, correct, bins)
    return Separability(
        overlap=overlap_coefficient(p, q),
        bhattacharyya=bhattacharyya_distance(p, q),
        auc=roc_auc(incorrect, correct),
        bins=bins,
    )
