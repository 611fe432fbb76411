"""The house rules, checked from the source (no import runs): every module under 500 lines, no import circle, and
each package of tasks/ imports only from itself and the packages before it in pipeline order (docs/architecture.md).
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
# tasks/ packages in pipeline order: a module may import from its own package and from the packages before it.
LAYERS = ["core", "config", "store", "compute", "data", "api", "ingest", "models", "train", "demo", "candidates", "generate",
          "rating", "judge", "plan", "report", "export"]
MAX_LINES = 500


def modules() -> dict[str, Path]:
    """Every module of flows/ and tasks/ by its dotted name."""
    out = {}
    for top in ("flows", "tasks"):
        for p in sorted((ROOT / top).rglob("*.py")):
            parts = p.relative_to(ROOT).with_suffix("").parts
            out[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = p
    return out


def _skipped(node: ast.AST) -> bool:
    """An `if TYPE_CHECKING:` block (imports for annotations, never run) or an `if __name__ == "__main__":` block (the
    program's entry when run with `python -m`, which imports the module again under its own name)."""
    return isinstance(node, ast.If) and ("TYPE_CHECKING" in ast.unparse(node.test) or "__main__" in ast.unparse(node.test))


def imports(path: Path, known: set[str]) -> set[str]:
    """The project modules a module imports at run time (function-local imports included)."""
    found: set[str] = set()

    def visit(node: ast.AST) -> None:
        for child in ast.iter_child_nodes(node):
            if _skipped(child):
                continue
            if isinstance(child, ast.Import):
                found.update(a.name for a in child.names if a.name in known)
            elif isinstance(child, ast.ImportFrom) and child.module and child.level == 0:
                subs = {f"{child.module}.{a.name}" for a in child.names} & known
                found.update(subs or ({child.module} & known))
            visit(child)

    visit(ast.parse(path.read_text()))
    return found


def graph() -> dict[str, set[str]]:
    """module -> the project modules it imports."""
    mods = modules()
    return {m: imports(p, set(mods)) - {m} for m, p in mods.items()}


def layer(module: str) -> int | None:
    """The position of a tasks/ module's package in LAYERS (flows/ and tasks/__init__ have none)."""
    parts = module.split(".")
    return LAYERS.index(parts[1]) if parts[0] == "tasks" and len(parts) > 1 else None


def test_every_tasks_package_has_a_layer():
    packages = {p.name for p in (ROOT / "tasks").iterdir() if p.is_dir() and (p / "__init__.py").exists()}
    assert packages == set(LAYERS)


@pytest.mark.parametrize("module,path", sorted(modules().items()))
def test_module_is_under_500_lines(module, path):
    assert len(path.read_text().splitlines()) <= MAX_LINES, module


def test_no_import_circle():
    g = graph()
    state: dict[str, int] = {}  # 1: on the current path, 2: done

    def walk(m: str, path: list[str]) -> None:
        state[m] = 1
        for n in sorted(g[m]):
            if state.get(n) == 1:
                raise AssertionError("import circle: " + " -> ".join(path[path.index(n):] + [m, n]))
            if n not in state:
                walk(n, path + [m])
        state[m] = 2

    for m in sorted(g):
        if m not in state:
            walk(m, [])


def test_no_import_from_a_later_layer_or_from_flows():
    bad = []
    for m, deps in graph().items():
        if layer(m) is None:
            continue
        for d in deps:
            if d.startswith("flows") or (layer(d) is not None and layer(d) > layer(m)):
                bad.append(f"{m} imports {d}")
    assert not bad, "\n".join(sorted(bad))


def _store_folders() -> tuple[str, ...]:
    """The store's top-level folders, from the results module's layout (models/, adapters/, ..., runs/)."""
    from tasks.store.results import LAYOUT

    return tuple(dict.fromkeys(pattern.split("/")[0] + "/" for pattern, _ in LAYOUT))


def _literal_strings(tree: ast.AST) -> list[tuple[int, str]]:
    """(line, text) of every string literal and f-string's leading text, docstrings left out."""
    docstrings = {id(n.body[0].value) for n in ast.walk(tree)
                  if isinstance(n, (ast.Module, ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)) and n.body
                  and isinstance(n.body[0], ast.Expr) and isinstance(n.body[0].value, ast.Constant)}
    out = []
    for n in ast.walk(tree):
        if isinstance(n, ast.Constant) and isinstance(n.value, str) and id(n) not in docstrings:
            out.append((n.lineno, n.value))
        elif isinstance(n, ast.JoinedStr) and n.values and isinstance(n.values[0], ast.Constant):
            out.append((n.lineno, str(n.values[0].value)))
    return out


def test_store_paths_are_spelled_only_in_the_results_module_and_the_store():
    folders, allowed = _store_folders(), {"tasks.store.results", "tasks.store.store", "tasks.store.guards"}
    assert "adapters/" in folders and "runs/" in folders
    bad = [f"{m}:{line}: {text!r}" for m, p in modules().items() if m not in allowed
           for line, text in _literal_strings(ast.parse(p.read_text())) if text.startswith(folders)]
    assert not bad, "\n".join(bad)


def test_the_architecture_doc_shows_the_store_layout_of_the_results_module():
    from tasks.store.results import LAYOUT

    doc = (ROOT / "docs" / "architecture.md").read_text()
    block = doc.split("<!-- store-layout: checked by tests/test_layout.py against tasks/store/results.py -->", 1)[1]
    lines = block.split("```")[1].strip().splitlines()
    assert [tuple(line.split("  ", 1)) for line in lines] == [(p, what) for p, what in LAYOUT]
