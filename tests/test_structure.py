"""The package's shape: no import cycle among its modules, counting every import, including
those deferred into function bodies."""

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent.parent / "pipeline"


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports_of(path: Path, modules: set[str]) -> set[str]:
    """The pipeline modules a file imports anywhere in it (`from pipeline import x` counts as
    pipeline.x where x is a module)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names if alias.name.startswith("pipeline")}
        elif isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("pipeline") \
                and node.level == 0:
            for alias in node.names:
                child = f"{node.module}.{alias.name}"
                found.add(child if child in modules else node.module)
    return {name for name in found if name in modules}


def import_graph() -> dict[str, set[str]]:
    files = {module_name(path): path for path in PACKAGE.rglob("*.py")}
    return {name: imports_of(path, set(files)) - {name} for name, path in files.items()}


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Every strongly connected group of more than one module (Tarjan)."""
    index, low, stack, on_stack, found = {}, {}, [], set(), []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for target in graph[node]:
            if target not in index:
                visit(target)
                low[node] = min(low[node], low[target])
            elif target in on_stack:
                low[node] = min(low[node], index[target])
        if low[node] == index[node]:
            group = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                group.append(member)
                if member == node:
                    break
            if len(group) > 1:
                found.append(sorted(group))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return found


def test_the_cycle_finder_finds_a_cycle():
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


def test_no_import_cycle_among_pipeline_modules():
    assert cycles(import_graph()) == []


def test_config_is_a_leaf_and_runtimes_import_no_format_gate_or_stage():
    graph = import_graph()
    assert graph["pipeline.config"] <= {"pipeline.errors"}
    above = ("pipeline.formats", "pipeline.gates", "pipeline.builds", "pipeline.engines", "pipeline.publish",
             "pipeline.report", "pipeline.compare", "pipeline.cli")
    for name, targets in graph.items():
        if name.startswith("pipeline.runtimes"):
            assert not {t for t in targets if t.startswith(above)}, (name, targets)
        if name.startswith("pipeline.registries"):
            assert "pipeline.publish" not in targets, name
    assert graph["pipeline.measure"] == set()
