"""The package's import graph: no module imports one that imports it back, at any depth, at
module level or inside a function."""
from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "pipeline"


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports_of(path: Path, modules: set[str]) -> set[str]:
    """The pipeline modules ``path`` imports anywhere in its body (relative imports resolved;
    ``from package import name`` counts the submodule when ``name`` is one, else the package)."""
    me = module_name(path)
    package = me if path.name == "__init__.py" else me.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                up = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(up + ([base] if base else []))
            names = [f"{base}.{a.name}" if f"{base}.{a.name}" in modules else base for a in node.names]
        else:
            continue
        found |= {n for n in names if n in modules}
    found.discard(me)
    return found


def graph() -> dict[str, set[str]]:
    files = {module_name(p): p for p in PACKAGE.rglob("*.py")}
    return {m: imports_of(p, set(files)) for m, p in files.items()}


def find_cycle(edges: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}  # 1 = on the path, 2 = done
    path: list[str] = []

    def visit(m: str) -> list[str] | None:
        state[m] = 1
        path.append(m)
        for n in sorted(edges.get(m, ())):
            if state.get(n) == 1:
                return path[path.index(n):] + [n]
            if n not in state and (c := visit(n)):
                return c
        path.pop()
        state[m] = 2
        return None

    for m in sorted(edges):
        if m not in state and (c := visit(m)):
            return c
    return None


def test_the_cycle_finder_finds_a_cycle():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": set()}) is None


def test_the_graph_sees_relative_and_function_level_imports(tmp_path):
    (tmp_path / "pkg").mkdir()
    f = tmp_path / "pkg" / "m.py"
    f.write_text("def f():\n    from . import other\n    from .sub import x\n")
    global PACKAGE
    saved, PACKAGE = PACKAGE, tmp_path / "pkg"
    try:
        assert imports_of(f, {"pkg", "pkg.other", "pkg.sub", "pkg.m"}) == {"pkg.other", "pkg.sub"}
    finally:
        PACKAGE = saved


def test_no_module_of_pipeline_imports_one_that_imports_it_back():
    edges = graph()
    assert len(edges) > 30 and edges["pipeline.query.run"]  # the walk found the package
    cycle = find_cycle(edges)
    assert cycle is None, " -> ".join(cycle)


# the layers, lowest first: a module imports only modules of its own package or of a lower rank.
# Training and query share a rank: neither imports the other (they meet at the run directory), and
# what stands on query (teach, serve) never imports training either. ``pipeline/__init__.py`` (the
# public API, which gathers every stage) stands above them all.
RANK = {"shared": 0, "engines": 1, "data": 2, "extraction": 3, "table": 4, "training": 5, "query": 5, "teach": 6, "serve": 7}
LAYERS = list(RANK)
NEVER = {("teach", "training"), ("serve", "training")}


def layer_of(module: str) -> str:
    parts = module.split(".")
    if len(parts) == 2 and parts[1] not in LAYERS:
        return "shared"  # a module at pipeline's root: config, layout, errors, model, familiarity, ...
    return parts[1] if len(parts) > 1 else "api"


def against_layers(edges: dict[str, set[str]]) -> list[str]:
    """Every import of a module from a higher layer (or of the public API from inside)."""
    out = []
    for m, targets in sorted(edges.items()):
        if m == "pipeline":
            continue
        for t in sorted(targets):
            a, b = layer_of(m), layer_of(t)
            if t == "pipeline" or RANK[b] > RANK[a] or (RANK[b] == RANK[a] and a != b) or (a, b) in NEVER:
                out.append(f"{m} -> {t}")
    return out


def test_the_layer_check_finds_an_upward_import():
    edges = {"pipeline.query.run": {"pipeline.training.loop", "pipeline.table.vocab"}, "pipeline.config": {"pipeline.data.split"},
             "pipeline.table.index": {"pipeline.layout"}, "pipeline.serve.app": {"pipeline", "pipeline.query.run", "pipeline.training.grow"},
             "pipeline.training.loop": {"pipeline.query.classify", "pipeline.training.bags"}}
    assert against_layers(edges) == ["pipeline.config -> pipeline.data.split", "pipeline.query.run -> pipeline.training.loop",
                                     "pipeline.serve.app -> pipeline", "pipeline.serve.app -> pipeline.training.grow",
                                     "pipeline.training.loop -> pipeline.query.classify"]


def test_imports_follow_the_layers():
    """Nothing imports a higher layer: query, teach and serve never import training (they meet it
    only at the run directory), no module at pipeline's root imports a stage package, and the table
    (the vocabulary, the pattern table, the indexes, the weights file, the pooling kernel) sits
    below both training and query."""
    edges = graph()
    assert {layer_of(m) for m in edges} >= set(LAYERS)  # every layer exists
    against = against_layers(edges)
    assert not against, "imports against the layer order:\n" + "\n".join(against)
