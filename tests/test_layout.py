"""The package layout stays true: stages import only leftward, no import circles, no function-local
imports of the library, no other module's private names (docs/architecture.md)."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "engram_cli"

#: the pipeline, left to right: a package may import its own modules and those of packages to its left
ORDER = {"core": 0, "vocab": 1, "corpus": 2, "tables": 3, "model": 4, "train": 5, "gates": 6, "eval": 6, "inspect_tables": 6,
         "sweep": 7, "commands": 8, "cli": 9, "__main__": 10}

#: third-party packages whose import is slow enough to keep inside the functions that need them
HEAVY = {"torch", "matplotlib", "pyarrow", "datasets", "huggingface_hub", "tomllib", "tomli", "ray"}


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def stage(module: str) -> str | None:
    """The stage package of ``engram_cli.X...`` (None for the root package itself)."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else None


MODULES = {module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def resolve(name: str) -> str:
    """The module an imported dotted name lives in (``engram_cli.tables.plan.TablePlan`` -> its module)."""
    while name not in MODULES and "." in name:
        name = name.rsplit(".", 1)[0]
    return name


def imports(path: Path) -> list[tuple[ast.stmt, str, list[str], bool]]:
    """(node, imported engram module, imported names, at module level) of every engram_cli import."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    top_level = {id(n) for n in tree.body}
    for node in tree.body:  # imports in a top-level `if`/`try` (e.g. TYPE_CHECKING) count as module level
        if isinstance(node, (ast.If, ast.Try)):
            top_level |= {id(n) for n in ast.walk(node)}
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("engram_cli"):
            names = [a.name for a in node.names]
            targets = [resolve(f"{node.module}.{n}") for n in names]
            for target in dict.fromkeys(targets):
                out.append((node, target, [n for n, t in zip(names, targets) if t == target], id(node) in top_level))
        elif isinstance(node, ast.Import):
            for a in node.names:
                if a.name.startswith("engram_cli"):
                    out.append((node, resolve(a.name), [], id(node) in top_level))
    return out


def graph() -> dict[str, set[str]]:
    return {m: {t for _, t, _, _ in imports(p) if t != m} for m, p in MODULES.items()}


def test_every_module_is_in_a_stage_package():
    loose = [m for m in MODULES if m.count(".") == 1 and stage(m) not in ORDER]
    assert loose == [], f"modules outside the stage packages: {loose}"


def test_stages_import_only_leftward():
    wrong = []
    for m, p in MODULES.items():
        here = stage(m)
        for _, target, _, _ in imports(p):
            there = stage(target)
            if here is None or there is None or here == there:
                continue
            if ORDER[there] >= ORDER[here]:
                wrong.append(f"{m} imports {target}")
    assert wrong == [], "imports against the pipeline order:\n" + "\n".join(wrong)


def test_no_import_circles():
    g = graph()
    index, low, on_stack, stack, cycles = {}, {}, set(), [], []

    def visit(v: str) -> None:  # Tarjan's strongly connected components
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in g.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                cycles.append(sorted(comp))

    for v in g:
        if v not in index:
            visit(v)
    assert cycles == [], f"import circles: {cycles}"


def test_library_imports_at_module_level():
    """Inside the library (all but the command layer, which imports lazily to keep --help fast), engram
    modules are imported at the top; heavy third-party packages may stay inside functions."""
    local = []
    for m, p in MODULES.items():
        if stage(m) in ("commands", "cli", "__main__"):
            continue
        for node, target, _, top in imports(p):
            if not top:
                local.append(f"{m}:{node.lineno} imports {target} inside a function")
        tree = ast.parse(p.read_text(encoding="utf-8"))
        for fn in ast.walk(tree):
            if not isinstance(fn, (ast.FunctionDef, ast.AsyncFunctionDef)):
                continue
            for node in ast.walk(fn):
                if isinstance(node, (ast.Import, ast.ImportFrom)):
                    root = (node.module if isinstance(node, ast.ImportFrom) else node.names[0].name) or ""
                    if root.split(".")[0] not in HEAVY and not root.startswith("engram_cli"):
                        local.append(f"{m}:{node.lineno} imports {root} inside a function")
    assert local == [], "\n".join(local)


def test_lazy_heavy_imports_say_why():
    """Every heavy import kept inside a function carries a one-line comment saying why."""
    bare = []
    for m, p in MODULES.items():
        if stage(m) in ("commands", "cli", "__main__"):
            continue
        lines = p.read_text(encoding="utf-8").splitlines()
        for fn in ast.walk(ast.parse("\n".join(lines))):
            if isinstance(fn, (ast.FunctionDef, ast.AsyncFunctionDef)):
                for node in ast.walk(fn):
                    if isinstance(node, (ast.Import, ast.ImportFrom)) and "#" not in lines[node.lineno - 1]:
                        bare.append(f"{m}:{node.lineno}")
    assert bare == [], f"lazy imports without a comment: {bare}"


def test_no_imports_of_private_names():
    private = []
    for m, p in MODULES.items():
        for _node, target, names, _ in imports(p):
            if target != m:
                private += [f"{m} imports {target}.{n}" for n in names if n.startswith("_") and n != "__version__"]
    assert private == [], "\n".join(private)


@pytest.mark.parametrize("package", [k for k in ORDER if (PACKAGE / k / "__init__.py").exists()])
def test_packages_say_what_they_own(package):
    doc = ast.get_docstring(ast.parse((PACKAGE / package / "__init__.py").read_text(encoding="utf-8")))
    assert doc and "import" in doc.lower(), f"engram_cli/{package}/__init__.py needs a docstring: owns, imports, names"
