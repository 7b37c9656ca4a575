"""The package's layering: a module imports only from its own layer or the layers below it."""

import ast
from pathlib import Path

import tlcli

PACKAGE = Path(tlcli.__file__).parent

# Lowest first. A module may import from its own layer and any layer before it.
LAYERS = [
    {"errors", "strict_json", "quiet", "presets", "metrics", "progress", "server_page"},  # plain values, no TF
    {"config", "files", "_tf", "head", "neighbours", "store"},     # options, writing, the numpy head, the store
    {"images", "schema", "bundle", "graphcheck", "backbone", "model", "strategy",
     "html_report", "cluster", "precision"},                                 # one concern each
    {"data", "serving", "summaries", "plots", "run_state"},
    {"features", "finetuning", "inference", "distributed", "litert_backbone", "prelude"},  # the steps
    {"audit"},                                                               # training runs its cheap part
    {"training", "export", "evaluation", "models", "server"},                # the commands, as functions
    {"render"},
    {"cli"},
    {"__init__"},
]


def _imports(path: Path) -> set[str]:
    """The tlcli modules ``path`` imports, at module level or inside functions."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module == "tlcli":
            found |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and (node.module or "").startswith("tlcli."):
            found.add(node.module.split(".")[1])
        elif isinstance(node, ast.Import):
            found |= {a.name.split(".")[1] for a in node.names if a.name.startswith("tlcli.")}
    return found


def test_every_module_has_a_layer():
    modules = {p.stem for p in PACKAGE.glob("*.py")}
    placed = set().union(*LAYERS)
    assert modules - placed == set(), "add the new module to LAYERS"
    assert placed - modules == set(), "a module in LAYERS no longer exists"


def test_no_module_imports_from_a_layer_above_it():
    level = {name: i for i, layer in enumerate(LAYERS) for name in layer}
    upward = []
    for path in sorted(PACKAGE.glob("*.py")):
        for dep in _imports(path) & set(level):
            if level[dep] > level[path.stem]:
                upward.append(f"{path.stem} (layer {level[path.stem]}) imports {dep} (layer {level[dep]})")
    assert upward == []


def test_the_check_sees_imports_inside_functions(tmp_path):
    probe = tmp_path / "probe.py"
    probe.write_text("def f():\n    from tlcli import training\n    import tlcli.cli\n")
    assert _imports(probe) == {"training", "cli"}
