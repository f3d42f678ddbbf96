"""Code shape that keeps the project readable (docs/tour.md): no import circle inside any package, no stage
package importing another stage, no library or CLI file over 400 lines, no ``locals()`` in the CLI, and
docs/cli.md the CLI's own --help."""

import ast
import importlib.util
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
CLI = ROOT / "cli"
LIB = ROOT / "mla_retrofit"
PACKAGES = [CLI, LIB, *sorted(p.parent for p in LIB.rglob("__init__.py") if p.parent != LIB)]
STAGES = ("convert", "heal", "bench", "export")  # each imports modeling/ and the shared top-level modules only


def sibling_imports(path: Path) -> set[str]:
    """Modules of ``path``'s own package that it imports (at module level or inside a function)."""
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.level == 1:
            if node.module:
                out.add(node.module.split(".")[0])
            else:
                out.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom) and path.parent == CLI and (node.module or "").startswith("cli."):
            out.add(node.module.split(".")[1])
    return out


def circle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}

    def visit(n, path):
        if state.get(n) == 1:
            return path + [n]
        if state.get(n) == 2:
            return None
        state[n] = 1
        for m in sorted(graph[n]):
            found = visit(m, path + [n])
            if found:
                return found
        state[n] = 2
        return None

    for n in sorted(graph):
        found = visit(n, [])
        if found:
            return found
    return None


@pytest.mark.parametrize("package", PACKAGES, ids=lambda p: str(p.relative_to(ROOT)))
def test_no_import_circle_inside_a_package(package):
    modules = {p.stem for p in package.glob("*.py")}
    graph = {p.stem: (sibling_imports(p) & modules) - {p.stem} for p in package.glob("*.py")}
    found = circle(graph)
    assert found is None, f"import circle in {package.relative_to(ROOT)}: " + " -> ".join(found)


def test_cli_commands_never_import_the_app_that_registers_them():
    importers = {p.stem for p in CLI.glob("*.py") if "main" in sibling_imports(p) and p.stem != "__main__"}
    assert not importers, f"{sorted(importers)} import cli/main.py"


def stage_imports(path: Path) -> set[str]:
    """The stage packages (other than its own) a module of mla_retrofit/ imports."""
    rel = path.relative_to(LIB).parts
    here = list(rel[:-1])
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if not isinstance(node, ast.ImportFrom):
            continue
        if node.level == 0:
            parts = (node.module or "").split(".")
            parts = parts[1:] if parts[0] == "mla_retrofit" else None
        else:
            parts = here[: len(here) - (node.level - 1)] + ((node.module or "").split(".") if node.module else [])
        if parts is None:
            continue
        targets = {parts[0]} if parts else {a.name for a in node.names}
        out |= {t for t in targets if t in STAGES}
    return out - ({rel[0]} if len(rel) > 1 else set())


@pytest.mark.parametrize("stage", STAGES)
def test_a_stage_imports_no_other_stage(stage):
    bad = {str(p.relative_to(ROOT)): sorted(stage_imports(p)) for p in (LIB / stage).rglob("*.py") if stage_imports(p)}
    assert not bad, f"{stage}/ imports another stage (move the shared piece below both): {bad}"


def test_shared_modules_import_no_stage():
    # inspection (the planner behind `inspect`) reads convert's budget maths; every other shared module is below
    bad = {p.name: sorted(stage_imports(p)) for p in LIB.glob("*.py") if stage_imports(p) and p.stem != "inspection"}
    assert not bad, f"shared modules of mla_retrofit/ import a stage: {bad}"


def test_no_library_or_cli_file_over_400_lines():
    long = {str(p.relative_to(ROOT)): n for p in [*LIB.rglob("*.py"), *CLI.glob("*.py")]
            if (n := len(p.read_text().splitlines())) > 400}
    assert not long, f"split these files: {long}"


def test_cli_never_reads_locals():
    found = [f"{p.name}:{node.lineno}" for p in CLI.glob("*.py") for node in ast.walk(ast.parse(p.read_text()))
             if isinstance(node, ast.Call) and getattr(node.func, "id", None) == "locals"]
    assert not found, f"locals() in cli/: {found}"


def test_cli_reference_page_is_the_generated_help():
    spec = importlib.util.spec_from_file_location("cli_docs", ROOT / "scripts" / "cli_docs.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    assert (ROOT / "docs" / "cli.md").read_text() == module.render(), \
        "docs/cli.md differs from the CLI's --help: run python scripts/cli_docs.py"
