"""The import graph of pipeline/ has no circle and no upward edge between the layers of
docs/ARCHITECTURE.md section 2. Built from the source with :mod:`ast`, so imports inside functions count."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "pipeline"

# Lowest first; a module may import from its own layer or a lower one. The first matching prefix wins.
LAYERS: list[tuple[str, tuple[str, ...]]] = [
    ("foundation", ("pipeline.fileio", "pipeline.config")),
    ("infrastructure", ("pipeline.inputs", "pipeline.distributed", "pipeline.checkpoint", "pipeline.train_state",
                        "pipeline.run_lock", "pipeline.tracking")),
    ("model", ("pipeline.backbone", "pipeline.prompts", "pipeline.zeroshot", "pipeline.augment")),
    ("data", ("pipeline.data",)),
    ("meta", ("pipeline.meta",)),
    ("stage library", ("pipeline.pretrain_config", "pipeline.pretrain_loop", "pipeline.finetune_config",
                       "pipeline.finetune_loop", "pipeline.evaluation", "pipeline.extract", "pipeline.cluster",
                       "pipeline.digits_demo.data", "pipeline.digits_demo.inputs", "pipeline.suite.glyphs",
                       "pipeline.suite.styles", "pipeline.suite.data", "pipeline.suite.stats",
                       "pipeline.suite.plots", "pipeline.suite.report")),
    ("entry points", ("pipeline.pretrain", "pipeline.finetune", "pipeline.evaluate", "pipeline.report",
                      "pipeline.cli")),
    ("runners", ("pipeline.digits_demo", "pipeline.suite")),
]


def module_name(path: Path) -> str:
    parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def layer_of(module: str) -> int:
    if module == "pipeline":  # the package's own (empty) __init__
        return 0
    for i, (_, prefixes) in enumerate(LAYERS):
        if any(module == p or module.startswith(p + ".") for p in prefixes):
            return i
    raise AssertionError(f"{module} belongs to no layer: add it to LAYERS and to docs/ARCHITECTURE.md section 2")


def imports_of(path: Path, module: str, known: set[str]) -> set[str]:
    """Modules of the package that ``path`` imports (``from pipeline import x`` counts as ``pipeline.x``)."""
    is_package = path.name == "__init__.py"
    out = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parent = module.split(".")[: len(module.split(".")) - node.level + (1 if is_package else 0)]
                base = ".".join(parent + ([base] if base else []))
            names = [f"{base}.{a.name}" if f"{base}.{a.name}" in known else base for a in node.names]
        else:
            continue
        for name in names:
            while name and name not in known:  # a name inside a module -> the module
                name = name.rpartition(".")[0]
            if name and name != module and name != "pipeline":
                out.add(name)
    return out


def import_graph() -> dict[str, set[str]]:
    files = {module_name(p): p for p in PACKAGE.rglob("*.py")}
    known = set(files)
    return {m: imports_of(p, m, known) for m, p in files.items()}


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import circle as a list of modules (first == last), or ``None``."""
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(m: str) -> list[str] | None:
        state[m] = 1
        stack.append(m)
        for d in sorted(graph.get(m, ())):
            if state.get(d) == 1:
                return stack[stack.index(d):] + [d]
            if d not in state and (found := visit(d)):
                return found
        stack.pop()
        state[m] = 2
        return None

    for m in sorted(graph):
        if m not in state and (found := visit(m)):
            return found
    return None


def upward_edges(graph: dict[str, set[str]]) -> list[str]:
    return sorted(f"{m} ({LAYERS[layer_of(m)][0]}) imports {d} ({LAYERS[layer_of(d)][0]})"
                  for m, deps in graph.items() for d in deps if layer_of(d) > layer_of(m))


def test_the_checks_can_fail():
    assert find_cycle({"pipeline.a": {"pipeline.b"}, "pipeline.b": {"pipeline.a"}}) == ["pipeline.a", "pipeline.b",
                                                                                        "pipeline.a"]
    assert find_cycle({"pipeline.a": {"pipeline.b"}, "pipeline.b": set()}) is None
    assert upward_edges({"pipeline.config": {"pipeline.finetune"}, "pipeline.finetune": set()}) == [
        "pipeline.config (foundation) imports pipeline.finetune (entry points)"]
    with pytest.raises(AssertionError, match="no layer"):
        layer_of("pipeline.somewhere_new")


def test_imports_are_resolved_from_the_source():
    graph = import_graph()
    assert "pipeline.meta.regulator" in graph["pipeline.meta.inner"]
    assert "pipeline.pretrain_loop" in graph["pipeline.pretrain"]  # `from pipeline import pretrain_loop`
    assert "pipeline.config" in graph["pipeline.meta.config"]


def test_every_module_has_a_layer():
    for module in import_graph():
        layer_of(module)


def test_no_import_circle():
    assert find_cycle(import_graph()) is None


def test_no_upward_import():
    assert upward_edges(import_graph()) == []


def test_the_documented_layers_are_the_checked_ones():
    doc = (PACKAGE.parent / "docs" / "ARCHITECTURE.md").read_text(encoding="utf-8")
    section = doc[doc.index("## 2. Layers"):doc.index("## 3.")]
    rows = [line for line in section.splitlines() if line.startswith("| ") and line[2].isdigit()]
    assert len(rows) == len(LAYERS), "docs/ARCHITECTURE.md section 2 lists another number of layers"
    for row, (name, prefixes) in zip(rows, LAYERS):
        for prefix in prefixes:
            assert f"`{prefix}" in row, f"{prefix} is in layer {name!r} here but not in that row of the doc: {row[:60]}"
