"""bench fidelity on logits whose KL is known in closed form (catches swapped or negated arguments)."""

import math

import pytest
import torch

from mla_retrofit.bench.fidelity import compare


class Fixed:
    """A 'model' that gives the same next-token distribution at every position (as a decoder and an output head:
    the final hidden state selects a row of logits)."""

    def __init__(self, probs):
        self.logits = torch.tensor(probs).log()
        self.rows = torch.stack([self.logits, self.logits])  # [2, V]: hidden [1, 0] -> row 0, [0, 1] -> row 1

    def hidden(self, ids):
        h = torch.zeros(ids.shape[0], ids.shape[1], 2)
        h[..., 0] = 1
        return h

    def get_decoder(self):
        return lambda input_ids, use_cache=False: type("Out", (), {"last_hidden_state": self.hidden(input_ids)})()

    def get_output_embeddings(self):
        return lambda h: h @ self.rows


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
        self.rows[1] = torch.tensor(late).log()

    def hidden(self, ids):
        h = super().hidden(ids)
        h[:, ids.shape[1] // 2 :] = torch.tensor([0.0, 1.0])
        return h


def test_kl_by_position_locates_a_late_drift_and_averages_to_the_kl():
    baseline, model = Fixed([0.3, 0.7]), LateDrift([0.3, 0.7], [0.9, 0.1])
    ids = torch.ones(3, 9, dtype=torch.long)  # 8 scored positions per row: 4 agree, then 4 drift
    f = compare(model, baseline, ids, batch_size=2, buckets=2)
    kl_bm = 0.3 * math.log(0.3 / 0.9) + 0.7 * math.log(0.7 / 0.1)
    assert f.kl_by_position == pytest.approx([0.0, kl_bm], abs=1e-6)
    assert f.kl == pytest.approx(sum(f.kl_by_position) / 2, rel=1e-6)
    assert compare(model, baseline, ids).kl_by_position == []


def test_log_probs_come_a_few_positions_at_a_time_and_add_up_the_same(monkeypatch, converted, tiny_src):
    """The head runs on slices of the hidden states (a 152k vocabulary never needs B x T x V float32 at once), and
    the statistics equal those of the full logits."""
    import torch.nn.functional as F

    from mla_retrofit.bench import fidelity
    from mla_retrofit.metrics import kl_from_log_probs
    from mla_retrofit.sources import load_model

    model, base = load_model(str(converted("qwen2", 0.5))).eval(), load_model(str(tiny_src("qwen2"))).eval()
    ids = torch.randint(0, 512, (3, 40), generator=torch.Generator().manual_seed(0))
    monkeypatch.setattr(fidelity, "CHUNK_TOKENS", 8)
    shapes = []
    real = F.log_softmax
    monkeypatch.setattr(fidelity.F, "log_softmax", lambda x, dim: shapes.append(x.shape) or real(x, dim=dim))
    f = compare(model, base, ids, batch_size=2, buckets=3)
    assert max(s[0] * s[1] for s in shapes) <= 8 and len(shapes) > 2 * 2
    with torch.no_grad():
        lm = real(model(ids).logits[:, :-1].float(), dim=-1)
        lb = real(base(ids).logits[:, :-1].float(), dim=-1)
    assert f.kl == pytest.approx(float(kl_from_log_probs(lm, lb).mean()), rel=1e-5)
    nll = float(-lm.gather(-1, ids[:, 1:, None]).mean())
    assert f.ppl_model == pytest.approx(math.exp(nll), rel=1e-5) and f.tokens == 3 * 39


def test_calibration_seed_draws_other_windows_reproducibly():
    from mla_retrofit import data
    from tests.tiny import tiny_tokenizer

    tok, texts = tiny_tokenizer(), data.texts("builtin")
    first = data.token_windows(texts, tok, 4, 64)
    assert torch.equal(first, data.token_windows(texts, tok, 4, 64, seed=0))  # 0: corpus order, as before
    other = data.token_windows(texts, tok, 4, 64, seed=1)
    assert torch.equal(other, data.token_windows(texts, tok, 4, 64, seed=1))
    assert not torch.equal(first, other)
