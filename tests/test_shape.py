"""Code shape that keeps the CLI readable: no import circle among cli/ modules (commands import cli.common,
never the app that registers them)."""

import ast
from pathlib import Path

CLI = Path(__file__).resolve().parents[1] / "cli"


def local_imports(path: Path) -> set[str]:
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.level == 1:
            if node.module:
                out.add(node.module.split(".")[0])
            else:
                out.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom) and (node.module or "").startswith("cli."):
            out.add(node.module.split(".")[1])
    return out


def test_cli_has_no_import_circle():
    graph = {p.stem: local_imports(p) & {q.stem for q in CLI.glob("*.py")} for p in CLI.glob("*.py")}
    state: dict[str, int] = {}

    def visit(n, path):
        if state.get(n) == 1:
            raise AssertionError("import circle: " + " -> ".join(path + [n]))
        if state.get(n) == 2:
            return
        state[n] = 1
        for m in graph[n]:
            visit(m, path + [n])
        state[n] = 2

    for n in graph:
        visit(n, [])
    assert "main" not in set().union(*(graph[n] for n in graph if n not in ("__main__",)))
