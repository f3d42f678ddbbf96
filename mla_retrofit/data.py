"""Text and chat data: Hub datasets, local JSONL/JSON/Parquet/text files, and offline built-in corpora.

Built-in corpora exist on every machine with Python, so the demo and the tests
need no download:

* ``builtin`` (calibration and healing): the docstrings of a fixed list of
  standard-library modules, in a fixed order.
* ``builtin-eval`` (held-out evaluation): the Python Language Reference
  sections shipped as ``pydoc_data.topics``; no calibration text comes from it.
* ``builtin-chat`` (healing): ``messages`` records built from the same
  docstrings (user asks what an API does, assistant answers with its docs).

These three are one domain (Python documentation). The healing default of the
CPU preset is therefore ``teacher-samples``: text sampled from the original
model itself (``heal.samples``), which leaks neither the calibration nor any
evaluation text.
"""

from __future__ import annotations

import importlib
import inspect
import warnings
from pathlib import Path

from .errors import UserError

BUILTIN_MODULES = (
    "argparse", "collections", "json", "logging", "pathlib", "subprocess", "threading", "typing",
    "unittest", "email.message", "http.client", "urllib.request", "shutil", "tarfile", "zipfile", "csv",
    "datetime", "decimal", "fractions", "functools", "itertools", "statistics", "textwrap", "string",
    "random", "heapq", "bisect", "socket", "ssl", "sqlite3", "tempfile", "os", "re", "io", "pickle",
    "configparser", "difflib", "inspect", "dataclasses", "enum", "contextlib", "abc", "calendar",
    "gettext", "locale", "mailbox", "smtplib", "imaplib", "ftplib", "xml.dom.minidom", "html.parser",
    "asyncio.events", "asyncio.tasks", "concurrent.futures", "multiprocessing.pool", "queue", "sched",
    "selectors", "signal", "weakref", "copy", "pprint", "reprlib", "operator", "numbers", "cmath",
)
TEXT_COLUMNS = ("text", "content")
SMOLTALK = "HuggingFaceTB/smoltalk"


def _docstrings() -> list[tuple[str, str]]:
    """(qualified name, docstring) for the built-in modules and their public members, in a fixed order."""
    out = []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for name in BUILTIN_MODULES:
            out.extend(_module_docs(name))
    return out


def _module_docs(name: str) -> list[tuple[str, str]]:
    out = []
    try:
        mod = importlib.import_module(name)
    except ImportError:
        return out
    doc = inspect.getdoc(mod)
    if doc:
        out.append((name, doc))
    for member_name, member in sorted(vars(mod).items()):
        if member_name.startswith("_") or getattr(member, "__module__", None) != mod.__name__:
            continue
        doc = inspect.getdoc(member)
        if doc and len(doc) > 80:
            out.append((f"{name}.{member_name}", doc))
    return out


def builtin_texts(split: str = "builtin") -> list[str]:
    if split == "builtin":
        return [doc for _, doc in _docstrings()]
    if split == "builtin-eval":
        from pydoc_data.topics import topics

        return [topics[k] for k in sorted(topics)]
    raise UserError(f"unknown built-in corpus '{split}'; use builtin or builtin-eval")


def builtin_chat() -> list[list[dict]]:
    records = []
    for name, doc in _docstrings():
        answer = doc.split("\n\n")[0].strip()
        if len(answer) < 40:
            continue
        records.append(
            [
                {"role": "user", "content": f"What does `{name}` do in Python?"},
                {"role": "assistant", "content": answer},
            ]
        )
    return records


def read_records(spec: str, split: str = "train", config: str | None = None, max_rows: int = 20000,
                 seed: int = 0) -> list[dict]:
    """Rows of a local JSONL/JSON/Parquet file or a Hub dataset; a ``.txt`` file gives one ``text`` row."""
    path = Path(spec).expanduser()
    if path.suffix in (".txt", ".md"):
        if not path.is_file():
            raise UserError(f"text file {path} does not exist")
        return [{"text": path.read_text(encoding="utf-8", errors="replace")}]
    if path.suffix in (".jsonl", ".json", ".parquet"):
        if not path.is_file():
            raise UserError(f"data file {path} does not exist")
        if path.stat().st_size == 0:
            return []
        return _local_records(path)
    if path.exists():
        raise UserError(f"{path}: unsupported data file type; use .jsonl, .json, .parquet or .txt")
    return _hub_records(spec, split, config, max_rows, seed)


def _local_records(path: Path) -> list[dict]:
    """Rows of a local JSON/JSONL/Parquet file, read by ``datasets`` (a JSON file may hold a list, or a mapping
    with the list under ``data``)."""
    import datasets

    builder = "parquet" if path.suffix == ".parquet" else "json"
    kwargs = {"field": "data"} if path.suffix == ".json" and _json_has_data_field(path) else {}
    try:
        ds = datasets.load_dataset(builder, data_files=str(path), split="train", **kwargs)
    except Exception as e:  # datasets wraps the parser's error in its own types
        raise UserError(f"{path} is not valid {'Parquet' if builder == 'parquet' else 'JSON/JSONL'} "
                        f"({type(e).__name__}: {str(e).splitlines()[0][:200]})") from e
    return ds.to_list()


def _json_has_data_field(path: Path) -> bool:
    with open(path, encoding="utf-8") as f:
        head = f.read(4096).lstrip()
    return head.startswith("{") and '"data"' in head


def _hub_records(dataset_id: str, split: str, config: str | None, max_rows: int, seed: int) -> list[dict]:
    """``max_rows`` rows streamed from a Hub dataset, shuffled across it (a seeded buffer over shuffled shards)."""
    from .sources import hub_reachable

    if "/" not in dataset_id:
        raise UserError(f"'{dataset_id}' is neither a local file nor a Hub dataset id (owner/name)")
    if not hub_reachable():
        raise UserError(
            f"cannot reach the Hugging Face Hub to load dataset '{dataset_id}' (offline?); "
            "pass a local .jsonl/.parquet/.txt file (for heal: or --data teacher-samples, which needs no download)"
        )
    try:
        import datasets

        if config is None and dataset_id == SMOLTALK:
            config = "all"
        ds = datasets.load_dataset(dataset_id, config, split=split, streaming=True)
        return list(ds.shuffle(seed=seed, buffer_size=10_000).take(max_rows))
    except Exception as e:
        raise UserError(
            f"cannot load dataset '{dataset_id}' ({type(e).__name__}); offline? "
            "pass a local .jsonl/.parquet/.txt file (for heal: or --data teacher-samples)"
        ) from e


def texts(spec: str, tokenizer=None) -> list[str]:
    """Plain texts from a corpus spec; chat rows (``messages``) are rendered with the chat template."""
    if spec in ("builtin", "builtin-eval"):
        return builtin_texts(spec)
    if spec == "builtin-chat":
        rows = [{"messages": m} for m in builtin_chat()]
    else:
        rows = read_records(spec)
        if rows and rows[0].get("kind") == TEACHER_SAMPLES:  # sampled text a conversion or heal cached
            rows = rows[1:]
    if not rows:
        raise UserError(f"dataset '{spec}' is empty")
    out = []
    for row in rows:
        if "messages" in row:
            out.append(render_chat(row["messages"], tokenizer))
        else:
            col = next((c for c in TEXT_COLUMNS if c in row), None)
            if col is None:
                raise UserError(
                    f"dataset '{spec}' has columns {sorted(row)}; expected a 'text' column or a 'messages' column"
                )
            out.append(str(row[col]))
    out = [t for t in out if t.strip()]
    if not out:
        raise UserError(f"dataset '{spec}' holds no text")
    return out


def render_chat(messages, tokenizer) -> str:
    _check_messages(messages)
    if tokenizer is not None and getattr(tokenizer, "chat_template", None):
        return tokenizer.apply_chat_template(messages, tokenize=False)
    return "\n".join(f"{m['role']}: {m['content']}" for m in messages)


def _check_messages(messages) -> None:
    if not isinstance(messages, list) or not all(
        isinstance(m, dict) and "role" in m and "content" in m for m in messages
    ):
        raise UserError("column 'messages' must be a list of {role, content} objects (the SmolTalk schema)")


TEACHER_SAMPLES = "teacher-samples"  # healing data sampled from the teacher itself (see ``heal.samples``)


def heal_records(spec: str, max_rows: int = 20000, seed: int = 0) -> list:
    """Healing records: conversations (``messages`` lists) or plain texts (``str``), as the data holds them."""
    if spec == "builtin-chat":
        return builtin_chat()
    if spec in ("builtin", "builtin-eval"):
        return builtin_texts(spec)
    rows = read_records(spec, max_rows=max_rows, seed=seed)
    if rows and rows[0].get("kind") == TEACHER_SAMPLES:  # a heal's cached samples: drop the settings line
        rows = rows[1:]
    if not rows:
        raise UserError(f"dataset '{spec}' is empty")
    if "messages" in rows[0]:
        for r in rows[:50]:
            _check_messages(r.get("messages"))
        return [r["messages"] for r in rows]
    col = next((c for c in TEXT_COLUMNS if c in rows[0]), None)
    if col is None:
        raise UserError(f"dataset '{spec}' has columns {sorted(rows[0])}; expected a 'messages' (or 'text') column")
    texts_ = [str(r[col]) for r in rows if str(r[col]).strip()]
    if Path(spec).suffix in (".txt", ".md"):
        texts_ = [part for t in texts_ for part in sections(t)]
    return texts_


def sections(text: str, size: int = 8000) -> list[str]:
    """A long plain text cut at paragraph breaks into sections of about ``size`` characters (a dev split needs
    more than one document)."""
    out, current = [], []
    for para in text.split("\n\n"):
        current.append(para)
        if sum(len(p) for p in current) >= size:
            out.append("\n\n".join(current))
            current = []
    if current and "".join(current).strip():
        out.append("\n\n".join(current))
    return out


def token_windows(texts_: list[str], tokenizer, n: int, seq_len: int, eos: bool = True, seed: int = 0):
    """``n`` windows of ``seq_len`` tokens cut from the concatenated corpus (documents joined by EOS).

    ``seed`` 0 takes the documents in order; any other seed shuffles their order first (another draw
    of calibration text from the same corpus, e.g. to measure how much a result depends on it).
    """
    import random

    import torch

    if seed:
        texts_ = list(texts_)
        random.Random(seed).shuffle(texts_)
    ids: list[int] = []
    need = n * seq_len
    for text in texts_:
        ids.extend(tokenizer(text, add_special_tokens=False)["input_ids"])
        if eos and tokenizer.eos_token_id is not None:
            ids.append(tokenizer.eos_token_id)
        if len(ids) >= need:
            break
    if len(ids) < seq_len:
        raise UserError(f"the data holds only {len(ids)} tokens, fewer than one window of {seq_len}; give more text")
    n_avail = min(n, len(ids) // seq_len)
    return torch.tensor(ids[: n_avail * seq_len], dtype=torch.long).view(n_avail, seq_len)
