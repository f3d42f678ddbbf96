"""Task scores for ``bench --tasks``: executed, offline, paired (the model and its baseline on the same problems)."""

from __future__ import annotations

from .humaneval import humaneval_problems, run_humaneval
from .paired import compare

TASKS = ("humaneval",)


def run_tasks(names: list[str], model, baseline, tokenizer, *, limit: int | None, max_new_tokens: int,
              batch_size: int, timeout_s: float, say=None) -> dict:
    say = say or (lambda *_: None)
    out = {}
    for name in names:
        problems = humaneval_problems(limit)
        scored = {}
        for who, m in (("model", model), ("baseline", baseline)):
            if m is None:
                continue
            scored[who] = run_humaneval(m, tokenizer, problems, max_new_tokens, batch_size, timeout_s=timeout_s,
                                        progress=lambda done, n, who=who, name=name: say(f"{name}: {who} {done}/{n} problems"))
        entry = {"problems": [p.task_id for p in problems], **scored}
        if baseline is not None:
            entry["paired"] = compare([r["passed"] for r in scored["model"]["results"]],
                                      [r["passed"] for r in scored["baseline"]["results"]]).as_dict()
        out[name] = entry
    return out
