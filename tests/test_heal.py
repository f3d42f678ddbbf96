"""Healing on tiny converted models: what each phase trains and runs, resume, errors, output."""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))

from tiny import save_tiny, tiny_tokenizer  # noqa: E402

from mla_retrofit.errors import UserError  # noqa: E402
from mla_retrofit.heal import HealConfig, heal  # noqa: E402
from mla_retrofit.heal import models, recipe  # noqa: E402
from mla_retrofit.heal.config import PRESETS  # noqa: E402
from mla_retrofit.heal.gate import DevScore  # noqa: E402
from mla_retrofit.heal.data import PackedStream, encode, mask_mode  # noqa: E402
from mla_retrofit.heal.plan import make_plan, split_steps  # noqa: E402
from mla_retrofit.heal.recipe import lr_lambda  # noqa: E402
from mla_retrofit.heal.state import latest_checkpoint, read_state  # noqa: E402


@pytest.fixture(scope="module")
def mla_dir(tmp_path_factory) -> Path:
    from mla_retrofit.convert.pipeline import ConvertConfig, convert

    root = tmp_path_factory.mktemp("heal")
    save_tiny("llama", root / "src")
    convert(ConvertConfig(model=str(root / "src"), output=str(root / "mla"), kv_ratio=0.5,
                          calib_samples=4, calib_seq_len=64))
    return root / "mla"


def config(mla_dir: Path, out: Path, **kw) -> HealConfig:
    base = dict(model=str(mla_dir), output=str(out), data="builtin-chat", steps=4, seq_len=32, batch_size=2,
                grad_accum=1, lr=1e-3, warmup_fraction=0.0, save_every=0, keep_last=True, dev_windows=2,
                refit=False)
    return HealConfig(**{**base, **kw})


def weights(directory: Path) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in models.load_student(str(directory)).state_dict().items()}


@pytest.fixture(scope="module")
def healed(mla_dir, tmp_path_factory) -> Path:
    """One uninterrupted 4-step heal over the three phases (1 + 2 + 1 steps)."""
    out = tmp_path_factory.mktemp("healed") / "out"
    heal(config(mla_dir, out))
    return out


class Recorder:
    """Counts forward calls of modules and optionally forbids some."""

    def __init__(self):
        self.calls: dict[str, int] = {}

    def watch(self, name: str, module: torch.nn.Module) -> None:
        def hook(*_):
            self.calls[name] = self.calls.get(name, 0) + 1

        module.register_forward_pre_hook(hook)

    def count(self, prefix: str) -> int:
        return sum(n for k, n in self.calls.items() if k.startswith(prefix))


def watch_models(monkeypatch, rec: Recorder, keep: dict) -> None:
    """Hook every student/teacher the recipe loads: full forwards, attentions, MLPs."""
    load_student, load_teacher = models.load_student, models.load_teacher

    def student(directory):
        m = load_student(directory)
        keep.setdefault("students", []).append(m)
        rec.watch("student.full", m)
        rec.watch("student.full", m.model)
        for i, layer in enumerate(m.model.layers):
            rec.watch(f"student.attn.{i}", layer.self_attn)
            rec.watch(f"student.mlp.{i}", layer.mlp)
        return m

    def teacher(name, *args):
        m = load_teacher(name, *args)
        keep["teacher"] = m
        keep["teacher_before"] = {k: v.clone() for k, v in m.state_dict().items()}
        rec.watch("teacher.full", m)
        for i, layer in enumerate(m.model.layers):
            rec.watch(f"teacher.attn.{i}", layer.self_attn)
        return m

    monkeypatch.setattr(models, "load_student", student)
    monkeypatch.setattr(models, "load_teacher", teacher)
    # the fidelity gate would run both models: these tests count what the *training* runs
    monkeypatch.setattr(recipe, "dev_score", lambda *a, **k: DevScore(kl=0.0, top1=1.0, tokens=1))


# -- what each phase trains --------------------------------------------------------------------------
@pytest.mark.parametrize("split,trained", [
    ((1, 0, 0), "attention"), ((0, 1, 0), "attention"), ((0, 0, 1), "all"),
])
def test_each_phase_updates_exactly_its_parameters(mla_dir, tmp_path, monkeypatch, split, trained):
    keep: dict = {}
    before = weights(mla_dir)
    watch_models(monkeypatch, Recorder(), keep)
    heal(config(mla_dir, tmp_path / "out", split=split, steps=2))
    trained_in_memory = keep["students"][1].state_dict()  # the instance the phase trained (0: the input score)
    for after in (weights(tmp_path / "out"), trained_in_memory):
        assert before.keys() == after.keys()
        for name in before:
            should_change = models.trains_in_full(name) if trained == "all" else models.is_attention(name)
            changed = not torch.equal(before[name], after[name])
            assert changed == should_change, f"{name}: changed={changed}, expected {should_change}"
    if "teacher" in keep:  # the teacher is never modified
        for k, v in keep["teacher"].state_dict().items():
            assert torch.equal(v, keep["teacher_before"][k]), k


def test_qwen3_normed_keys_phases_train_only_mla_parameters(tmp_path):
    from mla_retrofit.convert.pipeline import ConvertConfig, convert

    save_tiny("qwen3", tmp_path / "src")
    convert(ConvertConfig(model=str(tmp_path / "src"), output=str(tmp_path / "mla"), kv_ratio=0.5,
                          calib_samples=4, calib_seq_len=64))
    before = weights(tmp_path / "mla")
    heal(config(tmp_path / "mla", tmp_path / "out", split=(1, 1, 0), steps=2))
    after = weights(tmp_path / "out")
    assert any(".self_attn.k_proj." in k for k in before)  # the normed-keys latent input is an MLA parameter
    for name in before:
        assert torch.equal(before[name], after[name]) != models.is_attention(name), name


def test_gradient_checkpointing_recomputes_and_gives_the_same_result(mla_dir, tmp_path, monkeypatch):
    calls = {}
    for name, flag in (("plain", False), ("ckpt", True)):
        with monkeypatch.context() as m:
            rec = Recorder()
            watch_models(m, rec, {})
            heal(config(mla_dir, tmp_path / name, split=(1, 1, 1), steps=3, gradient_checkpointing=flag))
            calls[name] = rec.calls["student.attn.0"]
    assert calls["ckpt"] == 2 * calls["plain"]  # every attention ran again in the backward pass
    plain, ckpt = weights(tmp_path / "plain"), weights(tmp_path / "ckpt")
    for name in plain:
        torch.testing.assert_close(ckpt[name], plain[name], rtol=1e-6, atol=1e-6)


def test_phase1_runs_attention_only_never_the_mla_model(mla_dir, tmp_path, monkeypatch):
    rec = Recorder()
    watch_models(monkeypatch, rec, {})
    heal(config(mla_dir, tmp_path / "out", split=(1, 0, 0), steps=2))
    assert rec.count("student.full") == 0 and rec.count("student.mlp") == 0
    assert rec.calls["student.attn.0"] == rec.calls["student.attn.1"] == 2  # one micro-batch per step
    assert rec.calls["teacher.attn.0"] == 2  # the teacher ran to produce inputs and targets


def test_phase2_never_runs_the_original_attention(mla_dir, tmp_path, monkeypatch):
    rec = Recorder()
    watch_models(monkeypatch, rec, {})
    heal(config(mla_dir, tmp_path / "out", split=(0, 1, 0), steps=2, distill=0.0, ce_weight=1.0))
    assert rec.count("teacher") == 0  # next-token loss only: the teacher is not run
    assert rec.count("student.full") > 0


def test_phase2_distill_uses_only_the_teachers_full_forward(mla_dir, tmp_path, monkeypatch):
    rec, seen = Recorder(), []
    watch_models(monkeypatch, rec, {})
    heal(config(mla_dir, tmp_path / "out", split=(0, 1, 0), steps=2, distill=0.5, ce_weight=1.0),
         progress=lambda phase, step, total, metrics: seen.append(metrics) if phase == "mla-only" else None)
    assert rec.calls["teacher.attn.0"] == 2  # one teacher forward per step, for its logits
    assert len(seen) == 2
    assert all(m["kl"] > 0 and m["loss"] == pytest.approx(m["ce"] + 0.5 * m["kl"], rel=1e-5) for m in seen)


# -- resume ------------------------------------------------------------------------------------------
def metrics_log(out: Path, evals: bool = False) -> list[dict]:
    """The training lines of metrics.jsonl (with ``evals``: the gate's lines too)."""
    lines = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return [m for m in lines if evals or "loss" in m]


def interrupt_at(phase: str, step: int, error: type[BaseException] = KeyboardInterrupt):
    def progress(p, s, total, metrics):
        if (p, s) == (phase, step):
            raise error

    return progress


@pytest.mark.parametrize("stop", [KeyboardInterrupt, RuntimeError])
def test_interrupt_and_resume_equals_uninterrupted(mla_dir, healed, tmp_path, stop):
    """Ctrl-C after phase-2 step 1 (saved on the way out), or a crash after step 2 (last save: step 1)."""
    out = tmp_path / "out"
    cfg = config(mla_dir, out, save_every=0 if stop is KeyboardInterrupt else 1)
    with pytest.raises(stop):
        heal(cfg, progress=interrupt_at("mla-only", 1 if stop is KeyboardInterrupt else 2, stop))
    ckpt = latest_checkpoint(out / "checkpoints")
    state = read_state(ckpt)
    assert (state.phase, state.step, state.phase_done) == (2, 1, False)
    assert (ckpt / "optimizer.pt").is_file() and not (out / "conversion.json").exists()
    assert len(metrics_log(out)) == (2 if stop is KeyboardInterrupt else 3)
    result = heal(cfg.model_copy(update=dict(resume=True)))
    assert result.resumed and [p.steps for p in result.phases] == [1, 2, 1]
    expected, got = weights(healed), weights(out)
    for name in expected:
        assert torch.equal(expected[name], got[name]), name
    got_log, expected_log = (metrics_log(d) for d in (out, healed))  # no duplicate lines after resuming
    assert [(m["phase"], m["step"], m["loss"]) for m in got_log] == [(m["phase"], m["step"], m["loss"]) for m in expected_log]


HEAL_KILLS = ("heal.checkpoint.part:3", "heal.checkpoint.written:1", "heal.checkpoint.rotate:3")


def test_heal_killed_inside_checkpointing_resumes_to_identical_weights(mla_dir, healed, tmp_path):
    """SIGKILL while a checkpoint is half written, between its rename and the 'latest' pointer (the first
    one: no pointer yet), and in the rotation; --resume must end where the uninterrupted run did."""
    import os
    import subprocess

    for n, point in enumerate(HEAL_KILLS):
        out = tmp_path / f"out{n}"
        script = (f"import sys, torch; torch.set_num_threads(2); sys.path.insert(0, {str(Path(__file__).parent)!r}); "
                  "from pathlib import Path; from test_heal import config; from mla_retrofit.heal import heal; "
                  f"heal(config(Path({str(mla_dir)!r}), Path({str(out)!r}), save_every=1, keep_checkpoints=1))")
        proc = subprocess.run([sys.executable, "-c", script], env={**os.environ, "MLA_RETROFIT_KILL_AT": point},
                              capture_output=True, timeout=300)
        assert proc.returncode == -9, (point, proc.stderr[-2000:])
        assert not out.exists() or not (out / "model.safetensors").exists(), point
        heal(config(mla_dir, out, save_every=1, keep_checkpoints=1, resume=True))
        expected, got = weights(healed), weights(out)
        for name in expected:
            assert torch.equal(expected[name], got[name]), (point, name)


def test_resume_with_other_settings_is_refused(mla_dir, tmp_path):
    cfg = config(mla_dir, tmp_path / "out")
    with pytest.raises(KeyboardInterrupt):
        heal(cfg, progress=interrupt_at("imitate", 1))
    with pytest.raises(UserError, match="lr"):
        heal(cfg.model_copy(update=dict(resume=True, lr=5e-4)))
    with pytest.raises(UserError, match="--resume"):
        heal(cfg)


def test_rerunning_a_finished_heal_does_nothing(mla_dir, healed):
    stamp = (healed / "model.safetensors").stat().st_mtime_ns
    calls = []
    result = heal(config(mla_dir, healed), progress=lambda *a: calls.append(a))
    assert result.already_done and not calls
    assert (healed / "model.safetensors").stat().st_mtime_ns == stamp
    with pytest.raises(UserError, match="steps"):
        heal(config(mla_dir, healed, steps=5))


def test_nan_loss_stops_and_keeps_the_last_good_checkpoint(mla_dir, tmp_path, monkeypatch):
    from mla_retrofit.heal import objective

    real, calls = objective.distill_sums, []

    def flaky(*args):
        calls.append(1)
        sums = real(*args)
        if len(calls) == 3:
            sums.kl = sums.kl * float("nan")
        return sums

    monkeypatch.setattr(objective, "distill_sums", flaky)
    out = tmp_path / "out"
    with pytest.raises(UserError, match="loss is nan at phase 2 .* step 3"):
        heal(config(mla_dir, out, split=(0, 1, 0), steps=4, save_every=1))
    ckpt = latest_checkpoint(out / "checkpoints")
    assert read_state(ckpt).step == 2
    assert all(torch.isfinite(v).all() for v in torch.load(ckpt / "weights.pt").values())


# -- errors and the plan -----------------------------------------------------------------------------
def test_bad_dataset_schema_names_the_expected_column(mla_dir, tmp_path):
    data = tmp_path / "chats.jsonl"
    data.write_text("".join(json.dumps({"prompt": "hi", "response": "hello"}) + "\n" for _ in range(4)))
    with pytest.raises(UserError, match="'messages'"):
        heal(config(mla_dir, tmp_path / "out", data=str(data)))
    data.write_text(json.dumps({"messages": [{"from": "human", "value": "hi"}]}) + "\n")
    with pytest.raises(UserError, match="'messages'"):
        heal(config(mla_dir, tmp_path / "out", data=str(data)))
    assert not (tmp_path / "out").exists()


def test_missing_teacher_is_a_one_line_user_error(mla_dir, tmp_path):
    model = tmp_path / "mla"
    shutil.copytree(mla_dir, model)
    record = json.loads((model / "conversion.json").read_text())
    (model / "conversion.json").write_text(json.dumps({**record, "source_model": str(tmp_path / "gone")}))
    with pytest.raises(UserError) as err:
        heal(config(model, tmp_path / "out"))
    assert "--teacher" in str(err.value) and "\n" not in str(err.value)
    with pytest.raises(UserError, match="--teacher"):  # every phase and the fidelity gate need the teacher
        heal(config(model, tmp_path / "out", split=(0, 1, 1), dry_run=True))


def test_dry_run_plans_and_trains_nothing(mla_dir, tmp_path, monkeypatch):
    monkeypatch.setattr(models, "load_student", lambda *_: pytest.fail("dry run loaded the model"))
    result = heal(config(mla_dir, tmp_path / "out", steps=8, dry_run=True))
    assert result.dry_run and not (tmp_path / "out").exists()
    p = result.plan
    assert [x.steps for x in p.phases] == [2, 4, 2] and p.total_tokens == 8 * 2 * 32
    counts = models.param_counts(str(mla_dir))
    assert [x.trainable_params for x in p.phases] == [counts["attention"]] * 2 + [counts["full"]]
    assert 0 < counts["attention"] < counts["full"] < counts["total"]  # phase 3 keeps embeddings and head
    assert "phase 3 full" in p.describe()


def test_healed_output_loads_and_differs_from_unhealed(mla_dir, healed):
    from mla_retrofit.sources import load_model

    ids = torch.randint(0, 512, (1, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        new = load_model(str(healed))(ids).logits
        old = load_model(str(mla_dir))(ids).logits
    assert torch.isfinite(new).all() and not torch.allclose(new, old, atol=1e-4)
    record = json.loads((healed / "conversion.json").read_text())
    assert record["source_model"] and [p["name"] for p in record["heal"]["phases"]] == ["imitate", "mla-only", "full"]
    assert not (healed / "checkpoints").exists() and (healed / "metrics.jsonl").is_file()


def test_config_validation_and_presets(mla_dir, tmp_path):
    with pytest.raises(UserError, match="not both"):
        config(mla_dir, tmp_path, steps=4, tokens=100).resolved()
    with pytest.raises(UserError, match="split"):
        config(mla_dir, tmp_path, split=(0, 0, 0)).resolved()
    with pytest.raises(UserError, match="preset"):
        config(mla_dir, tmp_path, preset="huge").resolved()
    demo = HealConfig(model="m", output="o", preset="cpu-demo").resolved()
    assert demo.steps == PRESETS["cpu-demo"]["steps"] and demo.seq_len == PRESETS["cpu-demo"]["seq_len"] == 512
    assert HealConfig(model="m", output="o", preset="cpu-demo", seq_len=64).resolved().seq_len == 64
    assert demo.split == tuple(PRESETS["cpu-demo"]["split"]) != (0.25, 0.5, 0.25)  # the preset sets the split
    assert HealConfig(model="m", output="o", preset="cpu-demo", split=(0, 1, 0)).resolved().split == (0, 1, 0)
    assert HealConfig(model="m", output="o").resolved().split == (0.25, 0.5, 0.25)
    big = HealConfig(model="m", output="o", preset="gpu-7b").resolved()
    assert big.steps is None and big.tokens == PRESETS["gpu-7b"]["tokens"]


def test_token_budget_and_split():
    cfg = HealConfig(model="m", output="o", tokens=10_000, seq_len=100, batch_size=2, grad_accum=5,
                     split=(0.25, 0.5, 0.25)).resolved()
    plan = make_plan(cfg, 2, {"attention": 1, "total": 2}, "t")
    assert plan.total_steps == 5 and [p.steps for p in plan.phases] == [1, 3, 1]
    assert plan.phases[1].first_sequence == plan.phases[0].sequences == 20
    assert split_steps(10, (0, 1, 0)) == [0, 10, 0] and split_steps(2, (1, 1, 1)) == [1, 1, 1]


def test_each_phase_runs_at_its_own_peak_learning_rate():
    cfg = HealConfig(model="m", output="o", steps=30, lr=1e-4, imitate_lr_scale=3.0, full_lr_scale=0.2).resolved()
    lrs = [p.lr for p in make_plan(cfg, 1, {"attention": 1, "total": 2}, "t").phases]
    assert lrs == pytest.approx([3e-4, 1e-4, 2e-5])
    assert HealConfig(model="m", output="o").resolved().imitate_lr_scale == 1.0
    demo = HealConfig(model="m", output="o", preset="cpu-demo").resolved()
    assert demo.imitate_lr_scale == PRESETS["cpu-demo"]["imitate_lr_scale"]
    with pytest.raises(UserError, match="imitate-lr-scale"):
        HealConfig(model="m", output="o", imitate_lr_scale=0)


def test_lr_schedule_warms_up_then_decays():
    f = lr_lambda(2, 10)
    assert [f(0), f(1), f(2)] == [0.5, 1.0, 1.0]
    values = [f(s) for s in range(2, 10)]
    assert values == sorted(values, reverse=True) and 0 < values[-1] < 0.05


# -- data --------------------------------------------------------------------------------------------
CHAT = [{"role": "user", "content": "What is a list?"}, {"role": "assistant", "content": "A sequence."},
        {"role": "user", "content": "And a dict?"}, {"role": "assistant", "content": "A mapping."}]


def test_assistant_mask_with_generation_markers():
    tok = tiny_tokenizer()
    assert mask_mode(tok) == "generation"
    ids, mask = encode(CHAT, tok, "generation")
    answers = tok.decode([i for i, m in zip(ids, mask) if m])
    assert answers == "A sequence.<|im_end|>A mapping.<|im_end|>"


def test_assistant_mask_fallback_masks_all_but_the_last_answer():
    tok = tiny_tokenizer()
    ids, mask = encode(CHAT, tok, "last-turn")
    assert tok.decode([i for i, m in zip(ids, mask) if m]).strip() == "A mapping.<|im_end|>"
    assert mask == sorted(mask)  # one contiguous suffix
    ids, mask = encode(CHAT, tok, "plain")
    assert tok.decode([i for i, m in zip(ids, mask) if m]) == "A mapping.<|endoftext|>"
    assert encode([{"role": "user", "content": "hi"}], tok, "generation") == ([], [])


def test_packed_stream_is_deterministic_and_exact_length():
    tok = tiny_tokenizer()
    records = [CHAT, CHAT[:2], [{"role": "assistant", "content": "plain text " * 30}]]
    a_ids, _, a_mask = PackedStream(records, tok, 16, seed=1).take(9)
    b_ids, _, b_mask = PackedStream(records, tok, 16, seed=1).take(9)
    assert a_ids.shape == (9, 16) and torch.equal(a_ids, b_ids) and torch.equal(a_mask, b_mask)
    assert a_mask.any() and not a_mask.all()
    with pytest.raises(UserError, match="assistant"):
        PackedStream([[{"role": "user", "content": "hi"}]], tok, 16, seed=0).take(1)


# -- multi-process -------------------------------------------------------------------------------------
DDP_SCRIPT = """
import sys
from mla_retrofit.heal import HealConfig, heal
heal(HealConfig(model=sys.argv[1], output=sys.argv[2], data="builtin-chat", steps=3, seq_len=32, batch_size=2,
                grad_accum=2, lr=1e-3, warmup_fraction=0.0, save_every=1))
"""


@pytest.mark.slow
def test_two_process_data_parallel_heal_on_cpu(mla_dir, tmp_path):
    """``torchrun`` with 2 CPU processes (gloo): Accelerate's DDP path end to end (about 30 s)."""
    import os
    import socket
    import subprocess

    script = tmp_path / "ddp.py"
    script.write_text(DDP_SCRIPT)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).parent.parent), "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(port),
           str(script), str(mla_dir), str(tmp_path / "out")]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    record = json.loads((tmp_path / "out" / "conversion.json").read_text())["heal"]
    assert record["world_size"] == 2 and record["tokens"] == 3 * 2 * 2 * 2 * 32
    assert len(metrics_log(tmp_path / "out")) == 3


@pytest.fixture(scope="module")
def healed8(mla_dir, tmp_path_factory) -> Path:
    """An uninterrupted 8-step heal: 2 + 4 + 2 steps, so phases 1 and 3 have a middle."""
    out = tmp_path_factory.mktemp("healed8") / "out"
    heal(config(mla_dir, out, steps=8))
    return out


@pytest.mark.parametrize("phase, index", [("imitate", 1), ("full", 3)])
def test_resume_mid_phase_1_and_mid_phase_3(mla_dir, healed8, tmp_path, phase, index):
    out = tmp_path / "out"
    cfg = config(mla_dir, out, steps=8, save_every=1)
    with pytest.raises(KeyboardInterrupt):
        heal(cfg, progress=interrupt_at(phase, 1))
    state = read_state(latest_checkpoint(out / "checkpoints"))
    assert (state.phase, state.step, state.phase_done) == (index, 1, False)
    heal(cfg.model_copy(update=dict(resume=True)))
    expected, got = weights(healed8), weights(out)
    for name in expected:
        assert torch.equal(expected[name], got[name]), name


def test_phase_one_puts_the_whole_student_on_the_engine_device(mla_dir, tmp_path):
    """Phase 1 hands the engine only the attention stack; the student's embeddings, MLPs and head must be on
    the engine's device too, for the phase's evaluation (on CUDA a student left half on the CPU failed)."""
    from types import SimpleNamespace

    rec = recipe.HealRecipe(config(mla_dir, tmp_path / "o"))
    rec.plan = rec.make_plan(1)
    rec.engine = SimpleNamespace(device=torch.device("meta"))  # any device the CPU default is not
    rec._teacher = SimpleNamespace(model=SimpleNamespace(layers=[None] * 2))
    student = models.load_student(str(mla_dir))
    rec.phase_module(SimpleNamespace(name="imitate"), student)
    assert {p.device.type for p in student.parameters()} == {"meta"}
