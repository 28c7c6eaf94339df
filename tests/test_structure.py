"""The layout's rules, read from the code (docs/design.md, "Where things live"): no
import cycles, none of the arrows the design forbids, vLLM known to the binding
alone, and an exporter process that never loads torch or vLLM."""
from __future__ import annotations

import ast
import re
import subprocess
import sys
from pathlib import Path

PACKAGE = Path(__file__).parent.parent / "otel_moe"

# (importer, imported): a module under the first may not import one under the second
FORBIDDEN = [
    ("otel_moe.exporter", "otel_moe.worker"),  # the exporter child must not load torch or vLLM
    ("otel_moe.worker", "otel_moe.plugin"),  # no reaching back to the entry point
    ("otel_moe.worker", "otel_moe.exporter"),  # the two sides meet in the wire only
    ("otel_moe.report", "otel_moe.cli"),  # the report does not know the command line
    ("otel_moe.report", "otel_moe.exporter"),  # it reads what the sinks wrote, by the schema
    ("otel_moe.report", "otel_moe.worker"),
    ("otel_moe.schema", "otel_moe.config"),  # the data model does not depend on flags
    ("otel_moe.collector", "otel_moe.exporter"),  # the collector knows only OTLP
    ("otel_moe.collector", "otel_moe.worker"),
    ("otel_moe.control", "otel_moe.worker"),
    ("otel_moe.frontend", "otel_moe.worker"),  # the front end hands the engine a trace context, nothing more
    ("otel_moe.frontend", "otel_moe.exporter"),
    ("otel_moe.trace_context", "otel_moe.config"),
]


def _module(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {_module(p): p for p in PACKAGE.rglob("*.py")}


def _imports(path: Path) -> set[str]:
    """otel-moe modules this file imports, at run time (``if TYPE_CHECKING:`` blocks are not)."""
    found: set[str] = set()

    def visit(node: ast.AST) -> None:
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            return
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(node.module)
            found.update(f"{node.module}.{a.name}" for a in node.names)  # a module imported by name
        for child in ast.iter_child_nodes(node):
            visit(child)

    visit(ast.parse(path.read_text()))
    return {m for m in found if m in MODULES}


GRAPH = {name: _imports(path) - {name} for name, path in MODULES.items()}


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    found: list[list[str]] = []

    def connect(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        for nxt in sorted(graph[node]):
            if nxt not in index:
                connect(nxt)
                low[node] = min(low[node], low[nxt])
            elif nxt in stack:
                low[node] = min(low[node], index[nxt])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for node in sorted(graph):
        if node not in index:
            connect(node)
    return found


def _under(module: str, package: str) -> bool:
    return module == package or module.startswith(package + ".")


def test_the_graph_is_read():
    """The rules below stand on this graph: it must hold the arrows we know of."""
    assert "otel_moe.wire.messages" in GRAPH["otel_moe.worker.recorder"]
    assert "otel_moe.wire.messages" in GRAPH["otel_moe.exporter.receiver"]
    assert "otel_moe.worker.binding" in GRAPH["otel_moe.plugin"]  # an import inside a function counts
    assert "otel_moe.frontend.binding" in GRAPH["otel_moe.plugin"]


def test_no_import_cycles():
    assert _cycles(GRAPH) == []
    assert _cycles({"a": {"b"}, "b": {"a"}, "c": set()}) == [["a", "b"]]  # the check itself finds one


def test_no_forbidden_arrow():
    arrows = [(a, b) for a, targets in GRAPH.items() for b in targets
              for importer, imported in FORBIDDEN if _under(a, importer) and _under(b, imported)]
    assert arrows == []


def test_the_wire_imports_only_the_wire():
    assert {(a, b) for a, targets in GRAPH.items() if _under(a, "otel_moe.wire") for b in targets
            if not _under(b, "otel_moe.wire")} == set()


def test_only_the_bindings_know_vllm():
    """(and the plugin, which declares otel-moe's variables to vLLM). A module named in a
    string (``importlib.import_module("vllm.v1.engine...")``, three parts or more: "vllm.model"
    is an attribute name, "vllm.otel_moe" a logger's) counts as imported."""
    module_name = re.compile(r"^vllm(\.\w+){2,}$")
    knowing = set()
    for name, path in MODULES.items():
        tree = ast.parse(path.read_text())
        for node in ast.walk(tree):
            names = ([a.name for a in node.names] if isinstance(node, ast.Import)
                     else [node.module or ""] if isinstance(node, ast.ImportFrom)
                     else [node.value] if isinstance(node, ast.Constant) and isinstance(node.value, str) else [])
            if any(n == "vllm" or n.startswith("vllm.") if not isinstance(node, ast.Constant) else module_name.match(n)
                   for n in names):
                knowing.add(name)
    assert knowing == {"otel_moe.worker.binding", "otel_moe.frontend.binding", "otel_moe.plugin"}


def test_the_exporter_process_loads_no_torch_or_vllm():
    code = ("import sys\n"
            "import otel_moe.exporter.receiver, otel_moe.exporter.sinks.otlp, otel_moe.exporter.sinks.jsonl\n"
            "import otel_moe.exporter.sinks.metrics\n"
            "print(sorted(m for m in sys.modules if m.split('.')[0] in ('torch', 'vllm')))\n")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert proc.stdout.strip() == "[]"
