"""Healing toward the teacher: the chunked distillation loss, token weighting, document borders, the fidelity
gate, safe checkpoint rotation, and DeepSeek-V3 students."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))

from tiny import save_tiny  # noqa: E402

from mla_retrofit.errors import UserError  # noqa: E402
from mla_retrofit.heal import HealConfig, heal  # noqa: E402
from mla_retrofit.heal import models, state as heal_state  # noqa: E402
from mla_retrofit.heal.data import PackedStream, split_dev  # noqa: E402
from mla_retrofit.sources import load_tokenizer  # noqa: E402
from mla_retrofit.heal.losses import ce_targets, distill_sums, kl_per_token, residual_match_sum  # noqa: E402
from mla_retrofit.heal.state import latest_checkpoint, read_state  # noqa: E402


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    from mla_retrofit.convert.pipeline import ConvertConfig, convert

    root = tmp_path_factory.mktemp("kd")
    save_tiny("llama", root / "src")
    convert(ConvertConfig(model=str(root / "src"), output=str(root / "mla"), kv_ratio=0.5, calib_samples=4,
                          calib_seq_len=64))
    return root


def config(root: Path, out: Path, **kw) -> HealConfig:
    base = dict(model=str(root / "mla"), output=str(out), data="builtin-chat", steps=4, seq_len=32, batch_size=2,
                grad_accum=1, lr=1e-3, warmup_fraction=0.0, save_every=0, keep_last=True, dev_windows=2,
                refit=False)
    return HealConfig(**{**base, **kw})


def student_weights(directory: Path) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in models.load_student(str(directory)).state_dict().items()}


# -- the loss ----------------------------------------------------------------------------------------
def _heads(seed=0, B=2, T=7, d=8, V=11):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(B, T, d, generator=g, requires_grad=True)
    teacher_hidden = torch.randn(B, T, d, generator=g)
    head, teacher_head = torch.nn.Linear(d, V, bias=False), torch.nn.Linear(d, V, bias=False)
    with torch.no_grad():
        head.weight.copy_(torch.randn(V, d, generator=g))
        teacher_head.weight.copy_(torch.randn(V, d, generator=g))
    return hidden, teacher_hidden, head, teacher_head


@pytest.mark.parametrize("trainable_head", [False, True], ids=["fused", "checkpointed"])
def test_chunked_kl_equals_the_unchunked_reference_and_its_gradient(trainable_head):
    hidden, teacher_hidden, head, teacher_head = _heads()
    head.requires_grad_(trainable_head)
    mask = torch.ones(2, 7)
    ref = (kl_per_token(head(hidden), teacher_head(teacher_hidden)) * mask).sum()
    ref_grad = torch.autograd.grad(ref, hidden)[0]
    for chunk in (2, 5, 1000):  # slices of 1, 2 and all 7 positions
        sums = distill_sums(hidden, head, teacher_hidden, teacher_head, mask, chunk=chunk)
        grad = torch.autograd.grad(sums.kl, hidden)[0]
        torch.testing.assert_close(sums.kl, ref, rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(grad, ref_grad, rtol=1e-5, atol=1e-6)
    assert float(ref) > 0


def test_kl_is_asymmetric_with_a_known_value():
    p = torch.tensor([[0.9, 0.1]]).log()  # teacher
    q = torch.tensor([[0.5, 0.5]]).log()  # student
    expected = 0.9 * torch.log(torch.tensor(0.9 / 0.5)) + 0.1 * torch.log(torch.tensor(0.1 / 0.5))
    torch.testing.assert_close(kl_per_token(q, p), expected.view(1))
    assert not torch.allclose(kl_per_token(p, q), expected.view(1))  # KL(student || teacher) is another number


def test_the_fused_loss_gives_autograd_s_kl_and_next_token_gradients_with_biases():
    """The closed-form gradient (heads frozen, as heal has them) against autograd through the full logits."""
    hidden, teacher_hidden, head, teacher_head = _heads(seed=3)
    head.bias = torch.nn.Parameter(torch.randn(11))
    teacher_head.bias = torch.nn.Parameter(torch.randn(11))
    head.requires_grad_(False)
    kd, ce = torch.ones(2, 7), torch.ones(2, 7)
    kd[0, 1] = ce[1, 3] = ce[1, 6] = 0
    target = torch.randint(0, 11, (2, 7), generator=torch.Generator().manual_seed(1))
    logits, teacher_logits = head(hidden), teacher_head(teacher_hidden)
    ref_kl = (kl_per_token(logits, teacher_logits) * kd).sum()
    ref_ce = (torch.nn.functional.cross_entropy(logits.reshape(-1, 11), target.reshape(-1), reduction="none")
              * ce.reshape(-1)).sum()
    ref_grad = torch.autograd.grad(0.7 * ref_kl + 0.3 * ref_ce, hidden)[0]
    for chunk in (3, 14):
        sums = distill_sums(hidden, head, teacher_hidden, teacher_head, kd, target, ce, chunk=chunk)
        grad = torch.autograd.grad(0.7 * sums.kl + 0.3 * sums.ce, hidden)[0]
        torch.testing.assert_close(sums.kl, ref_kl, rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(sums.ce, ref_ce, rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(grad, ref_grad, rtol=1e-5, atol=1e-6)


def test_the_fused_loss_multiplies_in_the_autocast_dtype_like_the_checkpointed_one():
    """Under bf16 autocast both forms round the logits' matmul inputs alike; in float32 they are another number."""
    hidden, teacher_hidden, head, teacher_head = _heads(seed=5, d=64, V=50)
    head.requires_grad_(False)
    mask = torch.ones(2, 7)
    results = {}
    for fused in (True, False):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            sums = distill_sums(hidden, head, teacher_hidden, teacher_head, mask, chunk=4, fused=fused)
        results[fused] = (sums.kl.detach(), torch.autograd.grad(sums.kl, hidden)[0])
    torch.testing.assert_close(results[True][0], results[False][0], rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(results[True][1], results[False][1], rtol=2e-2, atol=2e-3)
    exact = distill_sums(hidden, head, teacher_hidden, teacher_head, mask, chunk=4).kl.detach()
    assert abs(float(exact - results[True][0])) > 1e-4  # bf16 rounding is visible: the test sees the dtype


@pytest.mark.parametrize("trainable_head", [False, True], ids=["fused", "checkpointed"])
def test_masked_positions_contribute_nothing(trainable_head):
    hidden, teacher_hidden, head, teacher_head = _heads()
    head.requires_grad_(trainable_head)
    mask = torch.ones(2, 7)
    mask[0, 2] = mask[1, 5] = 0
    target = torch.randint(0, 11, (2, 7))
    sums = distill_sums(hidden, head, teacher_hidden, teacher_head, mask, target, mask, chunk=4)
    grad = torch.autograd.grad(sums.kl + sums.ce, hidden)[0]
    assert grad[0, 2].abs().max() == 0 and grad[1, 5].abs().max() == 0 and grad[0, 3].abs().max() > 0
    assert float(sums.kl_count) == 12 and float(sums.ce_count) == 12
    changed = hidden.detach().clone()
    changed[0, 2] += 100.0
    again = distill_sums(changed, head, teacher_hidden, teacher_head, mask, target, mask, chunk=4)
    torch.testing.assert_close(again.kl, sums.kl.detach())
    torch.testing.assert_close(again.ce, sums.ce.detach())


def test_next_token_targets_stop_at_document_borders():
    ids = torch.tensor([[5, 6, 7, 8, 9]])
    positions = torch.tensor([[0, 1, 2, 0, 1]])
    target, keep = ce_targets(ids, torch.ones(1, 5, dtype=torch.bool), positions)
    assert target[0, :4].tolist() == [6, 7, 8, 9]
    assert keep[0].tolist() == [True, True, False, True, False]  # 7 does not predict the next document's 8


def test_micro_batches_with_different_target_counts_give_the_one_batch_gradient(setup, tmp_path, monkeypatch):
    """Plain SGD (update = lr x gradient) instead of AdamW, so the weights show the gradient itself."""
    monkeypatch.setattr(torch.optim, "AdamW", lambda params, lr, weight_decay, **_: torch.optim.SGD(params, lr=lr))
    # float32: the property is the token weighting, which bf16 rounding would blur at this tolerance
    common = dict(split=(0, 1, 0), steps=1, ce_weight=1.0, distill=1.0, max_grad_norm=0.0, lr=1.0, precision="fp32")
    heal(config(setup, tmp_path / "one", batch_size=2, grad_accum=1, **common))
    heal(config(setup, tmp_path / "two", batch_size=1, grad_accum=2, **common))
    stream = PackedStream(split_dev(__import__("mla_retrofit.data", fromlist=["x"]).builtin_chat(), 0.05, 0)[0],
                          load_tokenizer(str(setup / "mla")), 32, 0)
    _, pos, mask = stream.take(2)
    counts = [int(ce_targets(torch.zeros_like(pos), m[None], p[None])[1].sum()) for m, p in zip(mask, pos)]
    assert counts[0] != counts[1]  # the two micro-batches hold different numbers of targets
    before, one, two = (student_weights(d) for d in (setup / "mla", tmp_path / "one", tmp_path / "two"))
    moved = max(float((one[k] - before[k]).abs().max()) for k in before)
    assert moved > 1e-4
    for k in before:
        torch.testing.assert_close(two[k], one[k], rtol=1e-4, atol=1e-6)


def test_a_tokens_logits_do_not_depend_on_the_document_packed_before_it(setup):
    from mla_retrofit.sources import load_model

    student = models.load_student(str(setup / "mla")).eval()
    teacher = load_model(str(setup / "src"))
    g = torch.Generator().manual_seed(0)
    doc_a, other_a, doc_b = (torch.randint(1, 512, (10,), generator=g) for _ in range(3))
    positions = torch.cat([torch.arange(10), torch.arange(10)])[None]
    for model in (student, teacher):
        with torch.no_grad():
            first = model(input_ids=torch.cat([doc_a, doc_b])[None], position_ids=positions, use_cache=False).logits
            second = model(input_ids=torch.cat([other_a, doc_b])[None], position_ids=positions, use_cache=False).logits
            alone = model(input_ids=doc_b[None], use_cache=False).logits
            flat = model(input_ids=torch.cat([other_a, doc_b])[None], use_cache=False).logits
        torch.testing.assert_close(first[:, 10:], second[:, 10:], rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(first[:, 10:], alone, rtol=1e-5, atol=1e-5)
        assert not torch.allclose(flat[:, 10:], first[:, 10:], atol=1e-3)  # without the restart they would differ


def test_packed_windows_restart_positions_at_every_document():
    from tiny import tiny_tokenizer

    tok = tiny_tokenizer()
    texts = ["alpha beta gamma", "one two", "x y z"]
    ids, pos, mask = PackedStream(texts, tok, 16, seed=0).take(4)
    starts = (pos == 0).sum()
    assert pos[:, 0].eq(0).all() and starts > 4 and mask.all()
    for row in pos:  # positions count up by one inside a document
        diffs = row[1:] - row[:-1]
        assert ((diffs == 1) | (row[1:] == 0)).all()



def test_packing_trains_the_late_positions_of_a_window():
    """Documents a little longer than a window: each one's first window-length piece fills a window from
    position 0, so the last quarter of the window is trained about as often as the second (plain
    concatenation trains it a third as often, since most documents then start mid-window)."""
    from tiny import tiny_tokenizer

    tok = tiny_tokenizer()
    g = torch.Generator().manual_seed(0)
    words = ["alpha", "beta", "gamma", "delta", "one", "two", "x", "y"]
    texts = [" ".join(words[int(i)] for i in torch.randint(0, 8, (int(n),), generator=g))
             for n in torch.randint(14, 17, (24,), generator=g)]
    lengths = [len(tok(t)["input_ids"]) for t in texts]
    assert min(lengths) >= 32 and max(lengths) < 56  # a window or a bit longer
    _, pos, _ = PackedStream(texts, tok, 32, seed=0).take(24)
    per_quarter = torch.bincount(pos.flatten().long() // 8, minlength=4).float() / 24
    assert per_quarter[3] > 0.8 * per_quarter[1], per_quarter.tolist()
    assert (pos[:, -1] == 31).sum() >= 18  # most windows are one document's first 32 tokens

# -- the fidelity gate -------------------------------------------------------------------------------
def test_gate_drops_a_harmful_phase_and_keeps_the_input(setup, tmp_path):
    result = heal(config(setup, tmp_path / "out", split=(0, 1, 0), steps=3, lr=3.0, keep_last=False))
    phase = result.phases[0]
    assert not phase.kept and phase.dev_kl_after > phase.dev_kl_before
    before, after = student_weights(setup / "mla"), student_weights(tmp_path / "out")
    for k in before:
        assert torch.equal(before[k], after[k]), k
    record = json.loads((tmp_path / "out" / "conversion.json").read_text())["heal"]
    assert [e["after"] for e in record["dev"]] == ["input", "phase 2 (mla-only)"]
    kept = heal(config(setup, tmp_path / "kept", split=(0, 1, 0), steps=3, lr=3.0, keep_last=True))
    assert kept.phases[0].kept
    assert any(not torch.equal(before[k], v) for k, v in student_weights(tmp_path / "kept").items())


def test_gate_keeps_a_phase_that_helps(setup, tmp_path):
    result = heal(config(setup, tmp_path / "out", split=(1, 2, 0), steps=12, lr=1e-3, keep_last=False,
                         seq_len=64, dev_windows=4))
    evals = [e["kl"] for e in result.evals]
    assert result.phases[-1].kept and evals[-1] < evals[0]


# -- checkpoints -------------------------------------------------------------------------------------
def test_a_heal_killed_during_rotation_resumes_from_the_last_good_checkpoint(setup, tmp_path, monkeypatch):
    cfg = config(setup, tmp_path / "out", save_every=1, keep_checkpoints=1)
    heal(config(setup, tmp_path / "ref"))
    real, calls = heal_state._rotate, []

    def dying(root, keep, current):
        calls.append(current)
        if len(calls) == 3:  # the third save: killed after 'latest' moved, while old checkpoints go
            raise SystemExit("killed")
        real(root, keep, current)

    monkeypatch.setattr(heal_state, "_rotate", dying)
    with pytest.raises(SystemExit):
        heal(cfg)
    monkeypatch.setattr(heal_state, "_rotate", real)
    latest = latest_checkpoint(tmp_path / "out" / "checkpoints")
    assert latest.name == calls[-1]
    heal(cfg.model_copy(update=dict(resume=True)))
    ref, got = student_weights(tmp_path / "ref"), student_weights(tmp_path / "out")
    for k in ref:
        assert torch.equal(ref[k], got[k]), k


def test_resume_with_an_unreadable_checkpoint_is_an_error_not_a_restart(setup, tmp_path):
    cfg = config(setup, tmp_path / "out", save_every=1)
    with pytest.raises(KeyboardInterrupt):
        heal(cfg, progress=lambda p, s, t, m: (_ for _ in ()).throw(KeyboardInterrupt) if (p, s) == ("mla-only", 1)
             else None)
    latest = latest_checkpoint(tmp_path / "out" / "checkpoints")
    assert read_state(latest).phase == 2
    (latest / "weights.pt").write_bytes(b"truncated")
    with pytest.raises(UserError, match="cannot be read"):
        heal(cfg.model_copy(update=dict(resume=True)))
    (latest / "state.json").unlink()
    with pytest.raises(UserError, match="cannot resume"):
        heal(cfg.model_copy(update=dict(resume=True)))


# -- a DeepSeek-V3 student ---------------------------------------------------------------------------
def test_heal_of_a_deepseek_export_trains_and_writes_a_stock_checkpoint(converted, tiny_src, tmp_path):
    from transformers import DeepseekV3ForCausalLM

    from mla_retrofit.export import export_deepseek

    native = converted("llama", 0.5, rank_allocation="uniform", rope_layout="deepseek")
    export_deepseek(str(native), str(tmp_path / "engine"), biases=False, verify_tokens=16)
    out = tmp_path / "healed"
    result = heal(HealConfig(model=str(tmp_path / "engine"), output=str(out), teacher=str(tiny_src("llama")),
                             data="builtin-chat", steps=4, seq_len=32, batch_size=2, lr=1e-3, warmup_fraction=0.0,
                             save_every=0, keep_last=True, dev_windows=2))
    assert [p.name for p in result.phases] == ["imitate", "mla-only", "full"]
    config_json = json.loads((out / "config.json").read_text())
    assert config_json["model_type"] == "deepseek_v3" and "auto_map" not in config_json
    before = DeepseekV3ForCausalLM.from_pretrained(str(tmp_path / "engine"), dtype=torch.float32).state_dict()
    after = DeepseekV3ForCausalLM.from_pretrained(str(out), dtype=torch.float32).state_dict()
    assert before.keys() == after.keys() and not [k for k in after if k.endswith(".bias")]
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert any(".self_attn.kv_a_proj_with_mqa." in k for k in changed)
    assert not any("embed_tokens" in k or "lm_head" in k for k in changed)


# -- matching the residual stream -----------------------------------------------------------------------
def test_residual_match_is_each_positions_relative_error_averaged_over_layers():
    t = [torch.tensor([[[3.0, 4.0], [30.0, 40.0]]]), torch.tensor([[[1.0, 0.0], [0.0, 2.0]]])]
    h = [t[0] + torch.tensor([[[0.0, 5.0], [0.0, 5.0]]]), t[1] + torch.tensor([[[1.0, 0.0], [0.0, 0.0]]])]
    # layer 0: 25/25 and 25/2500 (the large position is not allowed to swamp the small one); layer 1: 1/1 and 0
    expected = ((1.0 + 0.01) + (1.0 + 0.0)) / 2
    torch.testing.assert_close(residual_match_sum(h, t, torch.ones(1, 2)), torch.tensor(expected))
    torch.testing.assert_close(residual_match_sum(h, t, torch.tensor([[0.0, 1.0]])), torch.tensor(0.01 / 2))


@pytest.mark.parametrize("family", ["llama", "qwen3"])
def test_layer_taps_line_up_layer_for_layer_so_an_exact_student_matches_at_zero(converted, tiny_src, family):
    from mla_retrofit.sources import load_model

    teacher = load_model(str(tiny_src(family)))
    ids = torch.randint(1, 500, (2, 24), generator=torch.Generator().manual_seed(0))
    pos = torch.arange(24).expand(2, 24)
    with torch.no_grad(), models.LayerTap(teacher.model) as t_tap:
        teacher.model(input_ids=ids, position_ids=pos, use_cache=False)
    for ratio, exact in ((1.0, True), (0.5, False)):
        student = models.load_student(str(converted(family, ratio))).eval()
        with torch.no_grad(), models.LayerTap(student.model) as s_tap:
            student.model(input_ids=ids, position_ids=pos, use_cache=False)
        assert len(s_tap.states) == len(t_tap.states) == teacher.config.num_hidden_layers
        err = float(residual_match_sum(s_tap.states, t_tap.states, torch.ones(2, 24))) / ids.numel()
        assert (err < 1e-8) if exact else (err > 1e-4), (ratio, err)


def test_a_heal_on_the_residual_match_alone_lowers_it(setup, tmp_path):
    from mla_retrofit.sources import load_model

    from mla_retrofit.data import heal_records

    teacher = load_model(str(setup / "src"))
    ids, pos, _ = PackedStream(heal_records("builtin-chat"), load_tokenizer(str(setup / "mla")), 32, seed=1).take(4)

    def mismatch(directory: Path) -> float:
        student = models.load_student(str(directory)).eval()
        with torch.no_grad(), models.LayerTap(teacher.model) as t, models.LayerTap(student.model) as s:
            teacher.model(input_ids=ids, position_ids=pos, use_cache=False)
            student.model(input_ids=ids, position_ids=pos, use_cache=False)
        return float(residual_match_sum(s.states, t.states, torch.ones(4, 32))) / ids.numel()

    out = tmp_path / "hidden"
    heal(config(setup, out, distill=0.0, hidden_weight=1.0, split=(0, 1, 0), steps=20))
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert len([r["hidden"] for r in rows if r.get("phase") == "mla-only"]) == 20
    before, after = mismatch(setup / "mla"), mismatch(out)
    assert after < 0.9 * before, (before, after)


# -- the closed-form refit ---------------------------------------------------------------------------
def test_refit_lands_each_layer_closer_to_the_teachers_residual_stream(setup, tmp_path):
    from mla_retrofit.heal.models import causal_mask
    from mla_retrofit.heal.refit import refit_output_projections, teacher_post_attention
    from mla_retrofit.sources import load_model

    teacher = load_model(str(setup / "src"))
    ids = torch.randint(1, 512, (4, 32), generator=torch.Generator().manual_seed(1))
    pos = torch.arange(32).expand(4, 32)
    targets = teacher_post_attention(teacher, ids, pos)

    def errors(student):
        rec, handles = [], []
        for layer in student.model.layers:  # residual after attention = layer input + attention output
            box = {}
            handles.append(layer.register_forward_pre_hook(lambda m, a, k, b=box: b.update(h=a[0] if a else k["hidden_states"]),
                                                           with_kwargs=True))
            handles.append(layer.self_attn.register_forward_hook(lambda m, a, o, b=box: b.update(a=o[0])))
            rec.append(box)
        with torch.no_grad():
            student(input_ids=ids, position_ids=pos, use_cache=False)
        for h in handles:
            h.remove()
        return [float((b["h"] + b["a"] - t).square().sum() / t.square().sum()) for b, t in zip(rec, targets)]

    student = models.load_student(str(setup / "mla")).eval()
    before = errors(student)
    mask = causal_mask(student.config, student.model.embed_tokens(ids), pos)
    refit_output_projections(student, teacher, ids, pos, mask, ridge=1e-3)
    after = errors(student)
    assert all(a < b for a, b in zip(after, before)), (before, after)
    result = heal(config(setup, tmp_path / "out", refit=True, steps=2, split=(0, 1, 0), keep_last=False))
    assert [p.name for p in result.phases] == ["refit", "mla-only"]
    assert result.phases[0].dev_kl_before == result.evals[0]["kl"]


# -- precision and the teacher-sample sampler ------------------------------------------------------------
def test_inverse_cdf_draw_follows_the_softmax():
    from mla_retrofit.sampling import draw

    torch.manual_seed(0)
    logits = torch.tensor([[0.0, 1.0, -1.0, 2.0, -30.0, 0.5]])
    p = logits.softmax(-1)[0]
    idx = draw(logits.expand(200_000, -1)).flatten()
    freq = torch.bincount(idx, minlength=6).double() / idx.numel()
    assert (freq - p.double()).abs().max() < 4e-3
    assert freq[4] == 0  # probability 1e-14: never drawn


def test_inverse_cdf_sampler_leaves_one_token_and_respects_top_p():
    from transformers import TopPLogitsWarper

    from mla_retrofit.sampling import InverseCdfSampler

    torch.manual_seed(1)
    scores = torch.tensor([[3.0, 2.0, 0.0, -1.0]]).expand(4000, -1)
    kept = TopPLogitsWarper(0.8)(None, scores.clone())  # the two likeliest tokens hold 0.9 of the mass
    out = InverseCdfSampler()(None, kept)
    assert torch.isfinite(out).sum(-1).eq(1).all()
    picked = out.argmax(-1)
    assert set(picked.tolist()) == {0, 1}


def test_teacher_samples_are_reproducible_and_continue_the_prompts(tmp_path):
    from mla_retrofit import sampling as samples

    src = tmp_path / "src"
    save_tiny("llama", src)
    teacher, tok = models.load_teacher(str(src)), load_tokenizer(str(src))
    a = samples.sample(teacher, tok, 3, 6, seed=5, batch_size=2)
    b = samples.sample(teacher, tok, 3, 6, seed=5, batch_size=2)
    c = samples.sample(teacher, tok, 3, 6, seed=6, batch_size=2)
    prompts = samples.prompts(tok)
    assert a == b and a != c
    assert all(text.startswith(prompts[i]) and len(text) > len(prompts[i]) for i, text in enumerate(a))



@pytest.mark.parametrize("family", ["llama", "llama3", "qwen2", "qwen3", "mistral"])
def test_the_cached_decoder_picks_the_tokens_generate_picks(tmp_path, family):
    """decode() (preallocated cache, grouped heads) against transformers' generate, same uniform draws: the
    same texts, left-padded prompts of different lengths included, and rows that end early."""
    from mla_retrofit import sampling as samples

    save_tiny(family, tmp_path / "src")
    teacher, tok = models.load_teacher(str(tmp_path / "src")), load_tokenizer(str(tmp_path / "src"))
    assert samples.decodable(teacher, 64) and len({len(tok(p)["input_ids"]) for p in samples.prompts(tok)[:6]}) > 1
    fast = samples.sample(teacher, tok, 6, 12, seed=3, batch_size=6, fast=True)
    assert fast == samples.sample(teacher, tok, 6, 12, seed=3, batch_size=6, fast=False)
    # end rows early: the token the first row draws fourth becomes the end-of-sequence token
    from transformers import LogitsProcessorList

    tok.padding_side = "left"
    enc = tok(samples.prompts(tok)[:6], return_tensors="pt", padding=True, add_special_tokens=False)
    torch.manual_seed(3 * 1000003)  # the draws sample() makes for its first batch
    new = samples.decode(teacher, enc["input_ids"], enc["attention_mask"], 12,
                         LogitsProcessorList([samples.InverseCdfSampler()]), -1)
    teacher.generation_config.eos_token_id = int(new[0, 3])
    ended = samples.sample(teacher, tok, 6, 12, seed=3, batch_size=6, fast=True)
    assert ended == samples.sample(teacher, tok, 6, 12, seed=3, batch_size=6, fast=False)
    assert ended[0] != fast[0]  # the first row ended early


@pytest.mark.parametrize("asked,cuda,amx,expected", [
    ("auto", True, False, "bf16"), ("auto", False, True, "bf16"), ("auto", False, False, "fp32"),
    ("fp32", True, True, "fp32"), ("bf16", False, False, "bf16")])
def test_precision_auto_means_bf16_only_where_the_hardware_has_it(monkeypatch, asked, cuda, amx, expected):
    from mla_retrofit import dtypes

    monkeypatch.setattr(dtypes, "cpu_has_bf16_matmul", lambda: amx)
    assert dtypes.resolve_precision(asked, cuda=cuda) == expected


@pytest.mark.parametrize("amx,flags,expected", [(True, set(), True), (False, {"avx512f", "avx512_bf16"}, True),
                                                (False, {"avx2", "avx512f"}, False)])
def test_bf16_matmul_is_native_with_amx_or_avx512_bf16(monkeypatch, amx, flags, expected):
    import torch

    from mla_retrofit import dtypes

    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: amx, raising=False)
    monkeypatch.setattr(dtypes, "cpu_flags", lambda: flags)
    assert dtypes.cpu_has_bf16_matmul() is expected


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_engine_autocasts_matmuls_only_in_bf16(precision):
    from mla_retrofit.heal.engine import Engine

    engine = Engine(precision)
    lin = torch.nn.Linear(8, 8)
    with engine.autocast():
        dtype = lin(torch.randn(2, 8)).dtype
    assert dtype == (torch.bfloat16 if precision == "bf16" else torch.float32)


def test_bad_precision_is_a_one_line_error(setup, tmp_path):
    with pytest.raises(UserError, match="--precision"):
        config(setup, tmp_path / "o", precision="fp16")


# -- phase 1 in the teacher's Fisher metric ----------------------------------------------------------
def test_the_fisher_metric_is_the_expected_fisher_of_the_teachers_output():
    """Phase 1's metric at a layer is ``E[g g^T]`` over labels the teacher draws: on one window drawn again and
    again it converges to the exact ``sum_t J_t^T (diag(p_t) - p_t p_t^T) J_t`` (``J_t``: the Jacobian of
    position ``t``'s logits with respect to the layer's attention output), through every later layer."""
    from tiny import tiny_model

    torch.manual_seed(0)
    teacher = tiny_model("llama", layers=3).double()
    for p in teacher.parameters():
        p.requires_grad_(False)
    teacher.lm_head.weight *= 4  # peaked next-token distributions, far from a uniform guess
    T, d, layer = 6, teacher.config.hidden_size, 0  # layer 0: its gradient runs through both later layers
    ids = torch.randint(1, teacher.config.vocab_size, (1, T))  # not the pad id: its embedding is zero
    pos = torch.arange(T)[None]
    factors = models.attention_fisher(teacher, ids.expand(1500, -1), pos.expand(1500, -1), ridge=1e-9, seed=0,
                                       batch=500)
    sampled = factors[layer].double() @ factors[layer].double().T

    def logits_of(delta):  # the logits with ``delta`` added to the layer's attention output
        handle = teacher.model.layers[layer].self_attn.register_forward_hook(
            lambda _m, _a, out: (out[0] + delta, *out[1:]))
        try:
            return teacher(input_ids=ids, position_ids=pos).logits[0]
        finally:
            handle.remove()

    zero = torch.zeros(1, T, d, dtype=torch.float64)
    jac = torch.autograd.functional.jacobian(logits_of, zero, vectorize=True)[:, :, 0]
    p = torch.softmax(logits_of(zero), -1).detach()
    exact = torch.zeros(d, d, dtype=torch.float64)
    for t in range(T):
        cov = torch.diag(p[t]) - torch.outer(p[t], p[t])
        for s in range(T):
            exact += jac[t, :, s].T @ cov @ jac[t, :, s]
    exact = exact / (exact.trace() / d)
    assert (sampled - exact).norm() / exact.norm() < 0.1
    off = exact - torch.diag(torch.diag(exact))
    assert off.norm() / exact.norm() > 0.3  # the metric is not diagonal: directions, not only dims, matter


def test_imitation_in_a_metric_is_plain_mse_with_the_identity_and_weighs_directions_otherwise():
    from mla_retrofit.heal.losses import imitation_loss

    g = torch.Generator().manual_seed(0)
    y, t = torch.randn(2, 5, 4, generator=g), torch.randn(2, 5, 4, generator=g)
    plain = imitation_loss([y], [t])
    assert torch.allclose(imitation_loss([y], [t], [torch.eye(4)]), plain)
    squash = torch.diag(torch.tensor([1.0, 1.0, 1.0, 1e-3]))  # the last direction does not matter
    off = t.clone()
    off[..., 3] += 10.0
    assert imitation_loss([off], [t], [squash]) < 1e-3 < imitation_loss([off], [t])
