"""No import circles inside neuronscope: every module's intra-package imports, read with `ast`, form a DAG.

Every import counts, wherever it is written: at the top, inside a function, under `if TYPE_CHECKING:` (a circle that
only a lazy import or a type hint hides is still two modules that each need the other). An edge goes to the module
named: `from .x import y` gives x.y when x/y is a module, else x; importing a submodule does not add an edge to its
parent package's __init__ (Python runs it, but every submodule would then sit in a circle with its own package).
Circles are the strongly connected components of more than one module (or a module that imports itself).
"""
from __future__ import annotations

import ast
import textwrap
from pathlib import Path

SRC = Path(__file__).resolve().parents[1] / "src"
PACKAGE = "neuronscope"


def modules(root: Path, package: str) -> dict[str, Path]:
    """{dotted module name: file} for every .py file of the package under root."""
    out = {}
    for path in sorted((root / package).rglob("*.py")):
        parts = list(path.relative_to(root).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        out[".".join(parts)] = path
    return out


def _targets(node: ast.AST, name: str, is_package: bool, known: set[str], package: str) -> list[str]:
    """The modules of the package that one import statement names (resolved to a known module)."""
    def resolve(mod: str) -> str | None:
        while mod and mod not in known:  # `import neuronscope.x.Class`-like names: the longest known prefix
            mod = mod.rpartition(".")[0]
        return mod or None

    found: list[str | None] = []
    if isinstance(node, ast.Import):
        found += [resolve(a.name) for a in node.names if a.name == package or a.name.startswith(package + ".")]
    elif isinstance(node, ast.ImportFrom):
        if node.level:
            base = name.split(".") if is_package else name.split(".")[:-1]
            base = base[:len(base) - (node.level - 1)]
            mod = ".".join(base + ([node.module] if node.module else []))
        else:
            mod = node.module or ""
            if not (mod == package or mod.startswith(package + ".")):
                return []
        for a in node.names:
            sub = f"{mod}.{a.name}"
            found.append(sub if sub in known else resolve(mod))
    return [m for m in found if m is not None]


def import_graph(root: Path, package: str) -> dict[str, set[str]]:
    """{module: the package's modules it imports anywhere in its body}."""
    mods = modules(root, package)
    known = set(mods)
    graph: dict[str, set[str]] = {m: set() for m in mods}
    for name, path in mods.items():
        tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
        is_package = path.name == "__init__.py"
        for node in ast.walk(tree):
            if isinstance(node, (ast.Import, ast.ImportFrom)):
                graph[name].update(_targets(node, name, is_package, known, package))
    return graph


def strongly_connected(graph: dict[str, set[str]]) -> list[list[str]]:
    """Tarjan's strongly connected components (iterative), each sorted, in a stable order."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    on_stack: set[str] = set()
    stack: list[str] = []
    out: list[list[str]] = []
    counter = 0
    for start in sorted(graph):
        if start in index:
            continue
        work = [(start, iter(sorted(graph[start])))]
        index[start] = low[start] = counter
        counter += 1
        stack.append(start)
        on_stack.add(start)
        while work:
            node, children = work[-1]
            for child in children:
                if child not in index:
                    index[child] = low[child] = counter
                    counter += 1
                    stack.append(child)
                    on_stack.add(child)
                    work.append((child, iter(sorted(graph.get(child, ())))))
                    break
                if child in on_stack:
                    low[node] = min(low[node], index[child])
            else:
                work.pop()
                if work:
                    low[work[-1][0]] = min(low[work[-1][0]], low[node])
                if low[node] == index[node]:
                    comp = []
                    while True:
                        w = stack.pop()
                        on_stack.discard(w)
                        comp.append(w)
                        if w == node:
                            break
                    out.append(sorted(comp))
    return out


def circles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The import circles: components of two or more modules, and modules that import themselves."""
    return [c for c in strongly_connected(graph) if len(c) > 1 or c[0] in graph[c[0]]]


def one_cycle(graph: dict[str, set[str]], comp: list[str]) -> list[str]:
    """A concrete path a -> ... -> a inside one component (for the failure message)."""
    inside = set(comp)
    start = comp[0]
    path, seen = [start], {start}
    node = start
    while True:
        nxt = sorted(graph[node] & inside)
        if start in nxt and len(path) > 1 or nxt == [start]:
            return path + [start]
        step = next((n for n in nxt if n not in seen), None)
        if step is None:  # every neighbour seen: close the loop at the first one seen
            loop_at = nxt[0]
            return path[path.index(loop_at):] + [loop_at]
        path.append(step)
        seen.add(step)
        node = step


def describe(graph: dict[str, set[str]], found: list[list[str]]) -> str:
    lines = []
    for comp in found:
        short = [m.removeprefix(PACKAGE + ".") for m in one_cycle(graph, comp)]
        lines.append(f"{len(comp)} modules ({', '.join(c.removeprefix(PACKAGE + '.') for c in comp)}): "
                     + " -> ".join(short))
    return "\n".join(lines)


def test_the_walker_sees_every_kind_of_import(tmp_path: Path) -> None:
    """A package built here with each kind of import: the graph has each edge and the test finds the circles."""
    pkg = tmp_path / "pkg"
    (pkg / "sub").mkdir(parents=True)
    files = {
        "__init__.py": "from .a import A\n",
        "a.py": "import os\nfrom . import b\nA = 1\n",
        "b.py": "def f():\n    from .sub.c import C\n    return C\n",
        "sub/__init__.py": "",
        "sub/c.py": "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from ..a import A\nC = 2\n",
        "d.py": "import pkg.sub.c\nfrom pkg import a\n",
        "e.py": "from .sub import c as _c\nfrom . import e\n",
    }
    for rel, text in files.items():
        (pkg / rel).write_text(textwrap.dedent(text))
    graph = import_graph(tmp_path, "pkg")
    assert graph == {"pkg": {"pkg.a"}, "pkg.a": {"pkg.b"}, "pkg.b": {"pkg.sub.c"}, "pkg.sub": set(),
                     "pkg.sub.c": {"pkg.a"}, "pkg.d": {"pkg.sub.c", "pkg.a"}, "pkg.e": {"pkg.sub.c", "pkg.e"}}
    found = circles(graph)
    assert sorted(found) == [["pkg.a", "pkg.b", "pkg.sub.c"], ["pkg.e"]]
    assert one_cycle(graph, ["pkg.a", "pkg.b", "pkg.sub.c"]) == ["pkg.a", "pkg.b", "pkg.sub.c", "pkg.a"]
    assert one_cycle(graph, ["pkg.e"]) == ["pkg.e", "pkg.e"]
    # without the type-only import the circle is gone
    (pkg / "sub/c.py").write_text("C = 2\n")
    assert circles(import_graph(tmp_path, "pkg")) == [["pkg.e"]]


def test_the_graph_covers_the_package() -> None:
    graph = import_graph(SRC, PACKAGE)
    assert len(graph) > 50
    assert "neuronscope.interventions" in graph["neuronscope.subject"]
    assert "neuronscope.server.monitor" in graph["neuronscope.server"]


def test_no_import_circles() -> None:
    graph = import_graph(SRC, PACKAGE)
    found = circles(graph)
    assert not found, "Import circles in neuronscope (break each: one direction only):\n" + describe(graph, found)
