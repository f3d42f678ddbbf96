"""bench fidelity on logits whose KL is known in closed form (catches swapped or negated arguments)."""

import math

import pytest
import torch

from mla_retrofit.bench.fidelity import compare


class Fixed:
    """A 'model' that gives the same next-token distribution at every position."""

    def __init__(self, probs):
        self.logits = torch.tensor(probs).log()

    def __call__(self, ids, use_cache=False):
        out = type("Out", (), {})()
        out.logits = self.logits.expand(ids.shape[0], ids.shape[1], -1).clone()
        return out


def test_kl_direction_top1_and_perplexities_on_known_distributions():
    baseline, model = Fixed([0.3, 0.7]), Fixed([0.9, 0.1])
    ids = torch.tensor([[1, 1, 0, 1, 1]])  # targets after the first token: 1, 0, 1, 1
    f = compare(model, baseline, ids)
    kl_bm = 0.3 * math.log(0.3 / 0.9) + 0.7 * math.log(0.7 / 0.1)  # KL(baseline || model) = 1.0326
    kl_mb = 0.9 * math.log(0.9 / 0.3) + 0.1 * math.log(0.1 / 0.7)  # the other direction = 0.7942
    assert f.kl == pytest.approx(kl_bm, rel=1e-6) and abs(f.kl - kl_mb) > 0.2
    assert f.top1_agreement == 0.0 and f.tokens == 4
    assert f.ppl_model == pytest.approx(math.exp(-(3 * math.log(0.1) + math.log(0.9)) / 4), rel=1e-6)
    assert f.ppl_baseline == pytest.approx(math.exp(-(3 * math.log(0.7) + math.log(0.3)) / 4), rel=1e-6)
    same = compare(baseline, baseline, ids)
    assert same.kl == pytest.approx(0.0, abs=1e-7) and same.top1_agreement == 1.0


class LateDrift(Fixed):
    """Agrees with the baseline at the first half of the positions, then gives ``late`` instead."""

    def __init__(self, probs, late):
        super().__init__(probs)
        self.late = torch.tensor(late).log()

    def __call__(self, ids, use_cache=False):
        out = super().__call__(ids)
        out.logits[:, ids.shape[1] // 2 :] = self.late
        return out


def test_kl_by_position_locates_a_late_drift_and_averages_to_the_kl():
    baseline, model = Fixed([0.3, 0.7]), LateDrift([0.3, 0.7], [0.9, 0.1])
    ids = torch.ones(3, 9, dtype=torch.long)  # 8 scored positions per row: 4 agree, then 4 drift
    f = compare(model, baseline, ids, batch_size=2, buckets=2)
    kl_bm = 0.3 * math.log(0.3 / 0.9) + 0.7 * math.log(0.7 / 0.1)
    assert f.kl_by_position == pytest.approx([0.0, kl_bm], abs=1e-6)
    assert f.kl == pytest.approx(sum(f.kl_by_position) / 2, rel=1e-6)
    assert compare(model, baseline, ids).kl_by_position == []


def test_calibration_seed_draws_other_windows_reproducibly():
    from mla_retrofit import data
    from tests.tiny import tiny_tokenizer

    tok, texts = tiny_tokenizer(), data.texts("builtin")
    first = data.token_windows(texts, tok, 4, 64)
    assert torch.equal(first, data.token_windows(texts, tok, 4, 64, seed=0))  # 0: corpus order, as before
    other = data.token_windows(texts, tok, 4, 64, seed=1)
    assert torch.equal(other, data.token_windows(texts, tok, 4, 64, seed=1))
    assert not torch.equal(first, other)
