"""bench --tasks: the sandbox contains what a generated program does, pass@1 is counted right, the paired
statistics are those computed by hand, and batched greedy completion equals one prompt at a time."""

from __future__ import annotations

import json
import time

import pytest

from mla_retrofit.bench.tasks.humaneval import Problem, complete, cut, execute
from mla_retrofit.bench.tasks.paired import compare, mcnemar_exact
from mla_retrofit.bench.tasks.sandbox import run_program

TEST = "def check(f):\n    assert f(2) == 4\n    assert f(-3) == 9\n"
PROMPT = "def square(x):\n    \"\"\"x squared\"\"\"\n"


def test_sandbox_stops_an_endless_loop_and_the_run_goes_on():
    t0 = time.perf_counter()
    out = run_program("while True:\n    pass\n", timeout_s=1.0)
    assert not out.passed and out.status == "timeout" and time.perf_counter() - t0 < 10
    assert run_program("print('ok')\n").passed  # the next program runs as usual


def test_sandbox_caps_memory():
    out = run_program("x = []\nwhile True:\n    x.append(bytearray(50 << 20))\n", timeout_s=20.0, memory_mb=256)
    assert not out.passed and out.status == "memory"


def test_sandbox_refuses_writes_outside_its_directory(tmp_path):
    target = tmp_path / "escaped.txt"
    for source in (f"open({str(target)!r}, 'w').write('x')\n",
                   f"import pathlib\npathlib.Path({str(target)!r}).write_text('x')\n",
                   f"try:\n    open({str(target)!r}, 'w')\nexcept Exception:\n    pass\n",  # caught: still stopped
                   "import os\nos.system('true')\n", "import subprocess\nsubprocess.run(['true'])\n"):
        out = run_program(source)
        assert not out.passed and out.status == "forbidden", source
    assert not target.exists()
    assert run_program("open('inside.txt', 'w').write('x')\nassert open('inside.txt').read() == 'x'\n").passed


def test_pass_at_1_on_a_hand_made_task():
    problems = [Problem(f"mini/{i}", PROMPT, TEST, "square") for i in range(5)]
    completions = [
        "    return x * x\n",  # right
        "    return x + x\n",  # wrong on -3
        "    while True:\n        pass\n",  # never returns
        "    raise ValueError\n",  # crashes
        "    return x ** 2\n\nprint(square(3))\n",  # right; the stray top-level line is cut before execution
    ]
    results = execute(problems, [cut(c) for c in completions], timeout_s=1.0)
    assert [r.passed for r in results] == [True, False, False, False, True]
    assert [r.status for r in results] == ["passed", "failed", "timeout", "failed", "passed"]


def test_paired_statistics_by_hand():
    # 10 problems: both pass 4, model only 1, baseline only 3, neither 2
    model = [True] * 4 + [True] + [False] * 3 + [False] * 2
    base = [True] * 4 + [False] + [True] * 3 + [False] * 2
    p = compare(model, base, draws=2000)
    assert (p.both, p.model_only, p.baseline_only, p.neither) == (4, 1, 3, 2)
    assert p.difference == pytest.approx((5 - 7) / 10)
    # exact McNemar: 2 * P(Binomial(4, 1/2) <= 1) = 2 * (1 + 4) / 16
    assert p.mcnemar_p == pytest.approx(10 / 16)
    assert mcnemar_exact(0, 6) == pytest.approx(2 / 64) and mcnemar_exact(0, 0) == 1.0
    lo, hi = p.ci95
    assert lo <= p.difference <= hi and -0.7 < lo < 0 < hi < 0.3


def test_batched_greedy_completion_equals_one_prompt_at_a_time(converted):
    from mla_retrofit.sources import load_model, load_tokenizer

    native = converted("llama", 0.5)
    model, tok = load_model(str(native)).eval(), load_tokenizer(str(native))
    prompts = ["def add(a, b):\n", "The json module parses a file and", "x", "class Stack:\n    def push(self, item):"]
    one = complete(model, tok, prompts, max_new_tokens=12, batch_size=1)
    batched = complete(model, tok, prompts, max_new_tokens=12, batch_size=4)
    assert batched == one and any(one)


def test_bench_cli_scores_humaneval_paired(converted, tmp_path):
    from typer.testing import CliRunner

    from cli.main import app

    native = converted("llama", 0.5)
    out = tmp_path / "b.json"
    res = CliRunner().invoke(app, ["bench", str(native), "--tasks", "humaneval", "--task-limit", "3",
                                   "--task-max-tokens", "8", "--json", str(out)])
    assert res.exit_code == 0, res.output
    t = json.loads(out.read_text())["tasks"]["humaneval"]
    assert t["problems"] == ["HumanEval/0", "HumanEval/1", "HumanEval/2"] and t["paired"]["problems"] == 3
    assert "kv_report" not in json.loads(out.read_text())  # --tasks alone runs only the tasks
    assert "the same 3 problems" in res.output
    bad = CliRunner().invoke(app, ["bench", str(native), "--tasks", "mmlu"])
    assert bad.exit_code != 0 and "unknown task 'mmlu'" in bad.output and "Traceback" not in bad.output


def test_humaneval_problems_ship_offline():
    from mla_retrofit.bench.tasks import humaneval_problems

    problems = humaneval_problems()
    assert len(problems) == 164 and problems[0].task_id == "HumanEval/0"
    assert all(p.entry_point in p.prompt for p in problems)
