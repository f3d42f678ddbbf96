"""The real CLI, run in-process: chained runs, JSON output, exit codes, config files."""

import json

import pytest
from typer.testing import CliRunner

from mla_retrofit_cli.main import app

runner = CliRunner()
FAST = ["--calib-samples", "4", "--calib-seq-len", "64"]


@pytest.fixture()
def workdir(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    return tmp_path


def test_convert_then_bare_bench_picks_up_the_run(tiny_src, workdir):
    src = str(tiny_src("qwen2"))
    r = runner.invoke(app, ["-q", "convert", src, "out", "--kv-ratio", "0.5", *FAST])
    assert r.exit_code == 0, r.output
    r = runner.invoke(app, ["bench", "--kv-report", "--json", "bench.json", "--context", "1k,2k", "--batch", "1,4"])
    assert r.exit_code == 0, r.output
    assert "using the last run's output" in r.output and "equal" in r.output
    doc = json.loads((workdir / "bench.json").read_text())
    assert doc["schema"] == 1 and doc["baseline"] == src
    rep = doc["kv_report"]
    assert set(rep) >= {"dtype", "per_layer", "values_per_token", "bytes_per_token", "table", "fit", "measured"}
    assert rep["values_per_token"] == {"model": 64, "baseline": 128}
    assert [(t["context"], t["batch"]) for t in rep["table"]] == [(1024, 1), (1024, 4), (2048, 1), (2048, 4)]
    for g in rep["measured"].values():
        assert g["measured_bytes"] == g["analytic_bytes"] > 0
    assert "fidelity" not in doc and "speed" not in doc


def test_bench_fidelity_of_model_against_itself(tiny_src, workdir):
    src = str(tiny_src("llama"))
    r = runner.invoke(app, ["bench", src, "--baseline", src, "--fidelity", "--json", "f.json", "--eval-samples", "2",
                            "--eval-seq-len", "64"])
    assert r.exit_code == 0, r.output
    fid = json.loads((workdir / "f.json").read_text())["fidelity"]
    assert abs(fid["kl"]) < 1e-6 and fid["top1_agreement"] == 1.0 and abs(fid["ppl_ratio"] - 1) < 1e-6


def test_bench_speed_runs_and_reports_ratios(converted, workdir):
    r = runner.invoke(app, ["bench", str(converted("llama", 0.5)), "--speed", "--speed-context", "64",
                            "--decode-steps", "2", "--speed-cache", "dynamic,static", "--json", "s.json"])
    assert r.exit_code == 0, r.output
    rows = json.loads((workdir / "s.json").read_text())["speed"]
    assert [(sp["context"], sp["cache"], sp["compiled"]) for sp in rows] == [(64, "dynamic", False), (64, "static", False)]
    for sp in rows:  # the ratios are the ratios of the reported speeds, and speeds agree with step times
        m, b = sp["model"], sp["baseline"]
        assert sp["decode_ratio"] == pytest.approx(m["decode_tok_s"] / b["decode_tok_s"], rel=1e-9)
        assert sp["prefill_ratio"] == pytest.approx(m["prefill_tok_s"] / b["prefill_tok_s"], rel=1e-9)
        for p in (m, b):
            assert p["context"] == 64 and p["decode_tok_s"] == pytest.approx(p["batch"] * 1000 / p["decode_ms_per_step"])
    r = runner.invoke(app, ["bench", str(converted("llama", 0.5)), "--speed", "--speed-cache", "paged"])
    assert r.exit_code == 1 and "--speed-cache" in r.output and "Traceback" not in r.output


def test_user_errors_are_one_line_exit_1(tiny_src, workdir):
    r = runner.invoke(app, ["convert", str(tiny_src("llama")), "out", "--kv-ratio", "2"])
    assert r.exit_code == 1
    lines = [l for l in r.output.strip().splitlines() if l.strip()]
    assert len(lines) == 1 and lines[0].startswith("error:") and "--kv-ratio" in lines[0]
    assert "Traceback" not in r.output


def test_usage_errors_exit_2(workdir):
    r = runner.invoke(app, ["convert"])
    assert r.exit_code == 2


def test_bare_commands_without_a_previous_run_say_what_to_do(workdir):
    for cmd in (["heal"], ["bench", "--kv-report"]):
        r = runner.invoke(app, cmd)
        assert r.exit_code == 1 and "mla-retrofit convert" in r.output


def test_config_file_sets_options_and_flags_win(tiny_src, workdir):
    (workdir / "c.yaml").write_text("kv_ratio: 0.25\ncalib_samples: 4\ncalib_seq_len: 64\nmethod: rorope-pca\n")
    r = runner.invoke(app, ["-q", "convert", str(tiny_src("llama")), "out", "--config", "c.yaml", "--method", "mla",
                            "--json"])
    assert r.exit_code == 0, r.output
    rec = json.loads((workdir / "out" / "conversion.json").read_text())
    assert rec["config"]["kv_ratio"] == 0.25 and rec["config"]["method"] == "mla"
    (workdir / "bad.yaml").write_text("kv_ratoi: 0.5\n")
    r = runner.invoke(app, ["convert", str(tiny_src("llama")), "out2", "--config", "bad.yaml"])
    assert r.exit_code == 1 and "unknown key 'kv_ratoi'" in r.output


def test_inspect_reads_config_only(tiny_src, workdir):
    r = runner.invoke(app, ["inspect", str(tiny_src("qwen3")), "--kv-ratio", "0.5", "--json"])
    assert r.exit_code == 0, r.output
    p = json.loads(r.output)
    assert p["kv_values_per_token_now"] == 2 * 64 and p["kv_values_per_token_after"] == 64
    assert p["architecture"].startswith("qwen3")


def test_version_and_help(workdir):
    assert runner.invoke(app, ["--version"]).output.startswith("mla-retrofit ")
    for cmd in ("convert", "heal", "bench", "inspect"):
        r = runner.invoke(app, [cmd, "--help"])
        assert r.exit_code == 0 and "Examples" in r.output


def test_heal_cli_runs_from_flags_and_a_config_file_of_any_field(tiny_src, workdir):
    src = str(tiny_src("llama"))
    assert runner.invoke(app, ["-q", "convert", src, "mla", "--kv-ratio", "0.5", *FAST]).exit_code == 0
    (workdir / "heal.yaml").write_text("dev_windows: 2\nwarmup_fraction: 0.0\nloss_chunk: 16\nseq_len: 24\n")
    r = runner.invoke(app, ["heal", "--data", "builtin-chat", "--steps", "3", "--seq-len", "32", "--batch-size", "2",
                            "--config", "heal.yaml", "--keep-last"])
    assert r.exit_code == 0, r.output
    assert "dev split after input" in r.output and "dev split after phase 3 (full)" in r.output
    saved = json.loads((workdir / "mla-healed" / "heal_config.json").read_text())
    assert (saved["dev_windows"], saved["loss_chunk"], saved["seq_len"], saved["keep_last"]) == (2, 16, 32, True)
    (workdir / "bad.yaml").write_text("dev_window: 2\n")
    r = runner.invoke(app, ["heal", "mla", "other", "--config", "bad.yaml"])
    assert r.exit_code == 1 and "unknown key 'dev_window'" in r.output
    r = runner.invoke(app, ["heal", "mla", "other", "--split", "a,b"])
    assert r.exit_code == 1 and "--split must be 3 numbers" in r.output



def test_every_heal_config_field_has_a_flag():
    import typer

    from mla_retrofit.heal import HealConfig

    heal_cmd = typer.main.get_command(app).commands["heal"]
    flags = {p.name for p in heal_cmd.params}
    assert set(HealConfig.model_fields) - {"model", "output"} <= flags, set(HealConfig.model_fields) - flags

def _one_line_error(r, *needles):
    lines = [l for l in r.output.strip().splitlines() if l.strip()]
    assert r.exit_code == 1 and len(lines) == 1 and lines[0].startswith("error:"), r.output
    for n in needles:
        assert n in lines[0], r.output


@pytest.mark.parametrize("flag", ["--batch-size", "--calib-samples"])
def test_convert_non_positive_flags_are_one_line(tiny_src, workdir, flag):
    _one_line_error(runner.invoke(app, ["convert", str(tiny_src("llama")), "out", flag, "0"]), flag)


@pytest.mark.parametrize("flag", ["--batch-size", "--samples"])
def test_heal_non_positive_flags_are_one_line(converted, workdir, flag):
    _one_line_error(runner.invoke(app, ["heal", str(converted("llama", 0.5)), "healed", flag, "0"]), flag.lstrip("-"))


def test_convert_bad_dtype_is_one_line(tiny_src, workdir):
    _one_line_error(runner.invoke(app, ["convert", str(tiny_src("llama")), "out", "--dtype", "int4"]), "--dtype")


def test_internal_errors_are_not_called_user_errors(tiny_src, workdir, monkeypatch):
    """A bug (here a RuntimeError inside the converter) says so in one line; -v shows the traceback."""
    from mla_retrofit.convert import pipeline

    def broken(self):
        raise RuntimeError("boom")

    monkeypatch.setattr(pipeline.Converter, "run", broken)
    r = runner.invoke(app, ["-q", "convert", str(tiny_src("llama")), "out", *FAST])
    _one_line_error(r, "internal error (RuntimeError: boom)", "-v")
    r = runner.invoke(app, ["-v", "convert", str(tiny_src("llama")), "out", *FAST])
    assert r.exit_code == 1 and isinstance(r.exception, RuntimeError)


def test_disk_full_is_one_line_with_the_fix(tiny_src, workdir, monkeypatch):
    from mla_retrofit.convert import pipeline

    def full(self):
        raise OSError(28, "No space left on device", "out/model.safetensors")

    monkeypatch.setattr(pipeline.Converter, "run", full)
    _one_line_error(runner.invoke(app, ["-q", "convert", str(tiny_src("llama")), "out", *FAST]), "no space left", "--resume")


def test_a_model_that_fails_to_load_for_a_bug_keeps_its_traceback(tiny_src, monkeypatch):
    """Input problems become UserError; anything else from transformers is re-raised unchanged."""
    from mla_retrofit import sources
    from mla_retrofit.errors import UserError
    import transformers

    def bug(*a, **k):
        raise AttributeError("'NoneType' object has no attribute 'x'")

    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", bug)
    with pytest.raises(AttributeError):
        sources.load_model(str(tiny_src("llama")))

    def missing(*a, **k):
        raise OSError("no file named model.safetensors")

    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", missing)
    with pytest.raises(UserError, match="cannot load model"):
        sources.load_model(str(tiny_src("llama")))


@pytest.mark.parametrize("command", ["convert", "heal", "bench", "export"])
def test_commands_restate_no_default(command):
    """Every option that is a config field defaults to None: the typed config holds the only defaults."""
    import inspect as pyinspect

    from mla_retrofit.bench.config import BenchConfig
    from mla_retrofit.convert.config import ConvertConfig
    from mla_retrofit.export.config import ExportConfig
    from mla_retrofit.heal.config import HealConfig
    from mla_retrofit_cli import bench_cmd, convert_cmd, export_cmd, heal_cmd

    fn, cls = {"convert": (convert_cmd.convert, ConvertConfig), "heal": (heal_cmd.heal, HealConfig),
               "bench": (bench_cmd.bench, BenchConfig), "export": (export_cmd.export, ExportConfig)}[command]
    params = pyinspect.signature(fn).parameters
    shared = [n for n in cls.model_fields if n in params and n not in ("model", "output")]
    assert len(shared) >= 8
    assert [n for n in shared if params[n].default.default is not None] == []
    if command in ("convert", "export"):  # every field is a flag too
        assert set(cls.model_fields) - {"model", "output"} <= set(params)


@pytest.mark.parametrize("cls, base", [("ConvertConfig", dict(model="m", output="o")), ("HealConfig", dict(model="m", output="o")),
                                       ("BenchConfig", dict(model="m")), ("ExportConfig", dict(model="m", output="o"))])
def test_every_config_refuses_unknown_keys_and_wrong_types_in_one_line(cls, base):
    import importlib

    from mla_retrofit.errors import UserError

    module = {"ConvertConfig": "convert", "HealConfig": "heal", "BenchConfig": "bench", "ExportConfig": "export"}[cls]
    klass = getattr(importlib.import_module(f"mla_retrofit.{module}.config"), cls)
    with pytest.raises(UserError, match="unknown setting 'colour'"):
        klass(**base, colour="blue")
    field = next(n for n, f in klass.model_fields.items() if f.annotation is int)
    with pytest.raises(UserError, match=f"--{field.replace('_', '-')} must be a valid integer"):
        klass(**base, **{field: "many"})


def test_convert_config_file_reaches_fields_no_flag_is_typed_for(tiny_src, workdir):
    """Fields only a config file sets reach the conversion; the rest keep ConvertConfig's defaults."""
    from mla_retrofit.convert.config import ConvertConfig

    (workdir / "c.yaml").write_text("eval_samples: 1\natt_samples: 2\nmin_rank_fraction: 0.5\ncalib_seq_len: 48\n")
    r = runner.invoke(app, ["-q", "convert", str(tiny_src("llama")), "o", "--calib-samples", "4", "--config", "c.yaml"])
    assert r.exit_code == 0, r.output
    rec = json.loads((workdir / "o" / "conversion.json").read_text())["config"]
    assert (rec["eval_samples"], rec["att_samples"], rec["min_rank_fraction"], rec["calib_seq_len"]) == (1, 2, 0.5, 48)
    assert rec["batch_size"] == ConvertConfig.model_fields["batch_size"].default
    r = runner.invoke(app, ["convert", str(tiny_src("llama")), "o2", "--kv-ratio", "0.5", "--kv-dim", "40"])
    assert r.exit_code == 1 and "give only one of them" in r.output
