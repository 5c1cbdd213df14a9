"""No module of gift_fast imports one that imports it back (issue 15).

Every ``import`` / ``from ... import`` of every module is read with ``ast``, function-local ones
included (a local import only hides a circle, it does not remove it), and the test fails on any
circle of the module graph. ``kernels/`` and ``cli/`` count as ``gift_fast.kernels`` and
``gift_fast.cli`` (their installed names). An edge goes to the module an import names: ``from
gift_fast.toy.world import X`` depends on ``gift_fast.toy.world``, ``from gift_fast.data import mtil``
on ``gift_fast.data.mtil``; the parent packages Python initialises on the way are not counted (a
package's ``__init__`` may re-export its submodules).
"""
from __future__ import annotations

import ast
from pathlib import Path
from typing import Dict, List, Optional, Set

ROOT = Path(__file__).resolve().parents[1]
SOURCES = {"gift_fast": ROOT / "gift_fast", "gift_fast.kernels": ROOT / "kernels", "gift_fast.cli": ROOT / "cli"}

def _modules() -> Dict[str, Path]:
    out: Dict[str, Path] = {}
    for prefix, folder in SOURCES.items():
        for path in sorted(folder.rglob("*.py")):
            rel = path.relative_to(folder).with_suffix("")
            parts = [p for p in rel.parts if p != "__init__"]
            out[".".join([prefix, *parts])] = path
    return out


def _resolve(module: str, is_package: bool, node: ast.ImportFrom) -> str:
    if not node.level:
        return node.module or ""
    base = module.split(".")
    base = base if is_package else base[:-1]
    base = base[: len(base) - (node.level - 1)]
    return ".".join(base + ([node.module] if node.module else []))


def _known(name: str, modules: Dict[str, Path]) -> Optional[str]:
    """The longest prefix of a dotted name that is a module of the package."""
    parts = name.split(".")
    for k in range(len(parts), 0, -1):
        cand = ".".join(parts[:k])
        if cand in modules:
            return cand
    return None


def import_graph() -> Dict[str, Set[str]]:
    modules = _modules()
    graph: Dict[str, Set[str]] = {m: set() for m in modules}
    for module, path in modules.items():
        is_package = path.name == "__init__.py"
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), str(path))):
            targets: List[str] = []
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = _resolve(module, is_package, node)
                # `from pkg import sub` imports the submodule pkg.sub when there is one
                targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in modules else base for a in node.names]
            for t in targets:
                dep = _known(t, modules)
                if dep is not None and dep != module:
                    graph[module].add(dep)
    return graph


def circles(graph: Dict[str, Set[str]]) -> List[List[str]]:
    """The strongly connected components with more than one module (Tarjan), each as a sorted list."""
    index: Dict[str, int] = {}
    low: Dict[str, int] = {}
    stack: List[str] = []
    on_stack: Set[str] = set()
    out: List[List[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph[v]):
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
                out.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


def _edges_inside(graph: Dict[str, Set[str]], comp: List[str]) -> List[str]:
    inside = set(comp)
    return [f"{a} -> {b}" for a in comp for b in sorted(graph[a]) if b in inside]


def test_the_graph_sees_local_and_relative_imports():
    graph = import_graph()
    assert "gift_fast.toy.world" in graph["gift_fast.toy.pretrain"]          # a top-level absolute import
    assert "gift_fast.synth.prompts" in graph["gift_fast.synth.engine"]      # a relative import
    assert "gift_fast.config" in graph["gift_fast.synth.engine"]             # a function-local relative import


def test_no_module_imports_one_that_imports_it_back():
    graph = import_graph()
    found = circles(graph)
    assert not found, "import circles (each: the modules, then the imports between them):\n" + "\n".join(
        f"  {comp}: " + "; ".join(_edges_inside(graph, comp)) for comp in found)


def test_the_circle_finder_finds_a_circle():
    assert circles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert circles({"a": {"b"}, "b": set()}) == []
