"""The package's shape: stages in order, imports pointing down the order, no import cycle, and
files and definitions of a readable size. Every import counts, inside functions too."""

import ast
from pathlib import Path

import tlcli

PACKAGE = Path(tlcli.__file__).parent

# The stages, lowest first: a module may import from its own stage and the stages before it.
# "tlcli" is the foundation: the modules at the top of the package.
STAGES = ["tlcli", "data", "model", "features", "bundle", "deploy", "insight", "training", "cli"]


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {_module_name(p): p for p in PACKAGE.rglob("*.py")}


def _resolve(name: str) -> str | None:
    """The module ``name`` is, or lies in (``tlcli.data.scanning.scan`` -> ``tlcli.data.scanning``)."""
    while name and name not in MODULES:
        name = name.rpartition(".")[0]
    return name or None


def _imports(path: Path) -> set[str]:
    """The tlcli modules ``path`` imports, at module level or inside functions. ``from tlcli.x
    import y`` is an import of ``tlcli.x.y`` when that is a module, else of ``tlcli.x``."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.level == 0 and (node.module or "").split(".")[0] == "tlcli":
            for alias in node.names:
                full = f"{node.module}.{alias.name}"
                found.add(full if full in MODULES else node.module)
        elif isinstance(node, ast.Import):
            found |= {a.name for a in node.names if a.name.split(".")[0] == "tlcli"}
    return {r for r in map(_resolve, found) if r}


def _stage(module: str) -> int:
    parts = module.split(".")
    return STAGES.index(parts[1]) if len(parts) > 2 or module.rpartition(".")[2] in STAGES[1:] else 0


def _graph() -> dict[str, set[str]]:
    return {m: _imports(p) - {m} for m, p in MODULES.items()}


def test_every_subpackage_is_a_stage():
    packages = {p.parent.name for p in PACKAGE.glob("*/__init__.py")}
    assert packages == set(STAGES[1:])


def test_no_module_imports_from_a_later_stage():
    upward = [f"{m} imports {d}" for m, deps in _graph().items() if m != "tlcli"
              for d in deps if _stage(d) > _stage(m)]
    assert upward == []


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan's algorithm)."""
    index, low, stack, on, out = {}, {}, [], set(), []

    def visit(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while (w := stack.pop()) != v:
                on.discard(w)
                component.append(w)
            on.discard(v)
            if component:
                out.append(sorted([v, *component]))

    for v in graph:
        if v not in index:
            visit(v)
    return out


def test_there_is_no_import_cycle():
    assert _cycles(_graph()) == []


def test_the_cycle_check_finds_a_cycle():
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


def test_the_check_sees_imports_inside_functions(tmp_path):
    probe = tmp_path / "probe.py"
    probe.write_text("def f():\n    from tlcli import training\n    import tlcli.cli\n"
                     "    from tlcli.data.scanning import scan\n")
    assert _imports(probe) == {"tlcli.training", "tlcli.cli", "tlcli.data.scanning"}


def test_the_package_keeps_a_small_top_and_small_rooms():
    top = list(PACKAGE.glob("*.py"))
    assert len(top) <= 12, sorted(p.name for p in top)
    rooms = {p.parent: len(list(p.parent.glob("*.py"))) - 1 for p in PACKAGE.glob("*/__init__.py")}
    assert len(rooms) >= 5
    assert max(rooms.values()) <= 10, rooms


def test_no_file_or_definition_is_too_long_to_read():
    long_files, long_defs = [], []
    for path in MODULES.values():
        text = path.read_text()
        if len(text.splitlines()) > 500:
            long_files.append(path.name)
        for node in ast.walk(ast.parse(text)):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
                if node.end_lineno - node.lineno + 1 > 80:
                    long_defs.append(f"{path.relative_to(PACKAGE)}:{node.lineno} {node.name}")
    assert long_files == [] and long_defs == []


def test_every_package_says_what_it_owns():
    for init in PACKAGE.glob("*/__init__.py"):
        doc = ast.get_docstring(ast.parse(init.read_text()))
        assert doc and len(doc) > 80, f"{init.parent.name}/__init__.py needs a paragraph saying what it owns"
