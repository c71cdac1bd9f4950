import math

import numpy as np
import pytest
import torch

from collab.uncertainty import (
    aggregate,
    answer_length,
    answer_uncertainties,
    bhattacharyya_distance,
    overlap_coefficient,
    roc_auc,
    separability,
    shared_histograms,
    token_scores,
    uncertainty,
)


def logits_for(probs):
    return torch.log(torch.tensor([probs], dtype=torch.float64))


def test_hand_computed_scores():
    s = token_scores(logits_for([0.7, 0.2, 0.1]))
    assert s.min_entropy[0] == pytest.approx(-math.log2(0.7), abs=1e-6)
    assert s.min_entropy[0] == pytest.approx(0.515, abs=5e-4)
    assert s.shannon[0] == pytest.approx(1.157, abs=5e-4)
    assert s.margin[0] == pytest.approx(0.5, abs=1e-6)


def test_uniform_and_certain_extremes():
    s = token_scores(torch.zeros(1, 8))
    assert s.min_entropy[0] == pytest.approx(3.0)
    assert s.shannon[0] == pytest.approx(3.0)
    assert s.margin[0] == pytest.approx(0.0)
    certain = token_scores(torch.tensor([[0.0, -float("inf"), -float("inf")]]))
    assert certain.min_entropy[0] == pytest.approx(0.0)
    assert certain.shannon[0] == pytest.approx(0.0)  # no NaN from 0 * log 0
    assert certain.margin[0] == pytest.approx(1.0)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_low_precision_logits_are_safe(dtype):
    logits = torch.tensor([[60000.0, 59990.0, -60000.0, 0.0]]).to(dtype)
    s = token_scores(logits)
    assert all(math.isfinite(v) for v in s.min_entropy + s.shannon + s.margin)
    ref = token_scores(logits.float())
    assert s.min_entropy[0] == pytest.approx(ref.min_entropy[0])


def test_aggregation_first_l_tokens_excludes_eos():
    values = [1.0, 2.0, 3.0, 9.0]  # last step is EOS
    assert aggregate(values, n_answer_tokens=3) == pytest.approx(2.0)
    assert aggregate(values, n_answer_tokens=3, length=1) == pytest.approx(1.0)
    assert aggregate(values, n_answer_tokens=3, length=2) == pytest.approx(1.5)
    assert aggregate(values, n_answer_tokens=3, length=10) == pytest.approx(2.0)
    assert aggregate([4.0], n_answer_tokens=0) == pytest.approx(4.0)  # EOS-only answer
    with pytest.raises(ValueError):
        aggregate([], 0)
    assert answer_length([5, 6, 2, 7], {2}) == 2
    assert answer_length([5, 6], {2}) == 2


def test_margin_oriented_as_uncertainty():
    s = token_scores(logits_for([0.7, 0.2, 0.1]))
    u = answer_uncertainties(s, 1)
    assert u["margin"] == pytest.approx(0.5)
    assert u["min_entropy"] == pytest.approx(0.5146, abs=1e-3)
    assert uncertainty("margin", 0.9) == pytest.approx(0.1)
    with pytest.raises(ValueError):
        uncertainty("bogus", 1.0)


def test_overlap_and_bhattacharyya_known_distributions():
    p = np.array([0.5, 0.5, 0.0])
    q = np.array([0.0, 0.5, 0.5])
    assert overlap_coefficient(p, q) == pytest.approx(0.5)
    assert bhattacharyya_distance(p, q) == pytest.approx(-math.log(0.5))
    assert overlap_coefficient(p, p) == pytest.approx(1.0)
    assert bhattacharyya_distance(p, p) == pytest.approx(0.0, abs=1e-12)
    assert bhattacharyya_distance(np.array([1.0, 0.0]), np.array([0.0, 1.0])) == math.inf


def test_shared_histograms_use_common_bins():
    pa, pb, edges = shared_histograms([0.0, 0.0, 1.0], [1.0, 1.0], bins=2)
    assert edges.tolist() == [0.0, 0.5, 1.0]
    assert pa.tolist() == pytest.approx([2 / 3, 1 / 3])
    assert pb.tolist() == pytest.approx([0.0, 1.0])


def test_auc_matches_pairwise_definition():
    rng = np.random.default_rng(0)
    pos = rng.integers(0, 5, 40).astype(float)
    neg = rng.integers(0, 5, 30).astype(float)
    pairs = [(1.0 if a > b else 0.5 if a == b else 0.0) for a in pos for b in neg]
    assert roc_auc(pos, neg) == pytest.approx(np.mean(pairs))
    assert roc_auc([2, 3], [0, 1]) == 1.0
    assert roc_auc([0, 1], [2, 3]) == 0.0


def test_separability_of_disjoint_and_identical_samples():
    far = separability(np.array([5.0, 6.0, 7.0]), np.array([0.0, 1.0, 2.0]), bins=10)
    assert far.overlap == 0.0 and far.auc == 1.0 and far.bhattacharyya == math.inf
    same = separability(np.array([1.0, 2.0]), np.array([1.0, 2.0]), bins=4)
    assert same.overlap == pytest.approx(1.0) and same.auc == pytest.approx(0.5)
