"""The shape of the import graph: dependencies run one way.

The graph is read from the source with ``ast`` (every ``import``, at module level or inside a
function, since a deferred import is still a dependency), over the project's packages. It has no
cycle, neither between modules nor between packages; the pure cores import nothing of the
project but each other; ``lb`` never imports the supervisor; the supervisor reaches nothing of
the HTTP app, and its process loads neither Flask nor Werkzeug.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from collections.abc import Iterable
from functools import cache
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("lb", "supervisor", "replica", "analysis")
PURE_CORES = {"lb.hashring", "lb.strategies", "lb.formulas"}
HTTP_LIBRARIES = {"flask", "werkzeug"}
# The balancer's HTTP side: what the supervisor must not reach (besides anything that imports
# an HTTP library, found from the source below).
HTTP_APP = {"lb.app", "lb.admin", "lb.routing", "lb.ops.blueprint"}
HTTP_APP_PACKAGES = ("lb.aio", "lb.threads")

Graph = dict[str, set[str]]


@cache
def modules() -> dict[str, Path]:
    """Dotted name -> file, for every module of the project's packages."""
    found = {}
    for package in PACKAGES:
        for path in sorted((ROOT / package).rglob("*.py")):
            parts = list(path.relative_to(ROOT).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts.pop()
            found[".".join(parts)] = path
    return found


def imported_names(name: str, path: Path) -> Iterable[str]:
    """Every dotted name ``name``'s source imports (relative imports made absolute)."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            yield from (alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = package.split(".")
                parts = parts[:len(parts) - node.level + 1]
                base = ".".join(parts + ([node.module] if node.module else []))
            # "from lb import lifeline" imports the module lb.lifeline; "from lb.x import y"
            # imports lb.x (y being a name in it).
            for alias in node.names:
                yield f"{base}.{alias.name}" if f"{base}.{alias.name}" in modules() else base


def owning_module(dotted: str) -> str | None:
    """The project module ``dotted`` is (or is in); None for the standard library and others."""
    while dotted:
        if dotted in modules():
            return dotted
        dotted = dotted.rpartition(".")[0]
    return None


@cache
def graph() -> Graph:
    """Module -> the project modules it imports."""
    edges: Graph = {}
    for name, path in modules().items():
        targets = {owning_module(d) for d in imported_names(name, path)}
        edges[name] = {t for t in targets if t is not None and t != name}
    return edges


@cache
def third_party(name: str) -> frozenset[str]:
    """The top-level names of what ``name`` imports from outside the project."""
    return frozenset(d.partition(".")[0] for d in imported_names(name, modules()[name])
                     if owning_module(d) is None)


def collapse(edges: Graph, depth: int) -> Graph:
    """The graph between units of the first ``depth`` name components (1: top packages)."""
    out: Graph = {}
    for source, targets in edges.items():
        unit = ".".join(source.split(".")[:depth])
        out.setdefault(unit, set()).update(".".join(t.split(".")[:depth]) for t in targets)
        out[unit].discard(unit)
    return out


def find_cycle(edges: Graph) -> list[str] | None:
    """One cycle as a path ``[a, b, ..., a]``, or None (a depth-first search)."""
    done: set[str] = set()
    for start in sorted(edges):
        if start in done:
            continue
        path = [start]
        stack = [iter(sorted(edges.get(start, ())))]
        while stack:
            child = next(stack[-1], None)
            if child is None:
                stack.pop()
                done.add(path.pop())
            elif child in path:
                return path[path.index(child):] + [child]
            elif child not in done:
                path.append(child)
                stack.append(iter(sorted(edges.get(child, ()))))
    return None


def reachable(edges: Graph, starts: Iterable[str]) -> set[str]:
    seen: set[str] = set()
    todo = list(starts)
    while todo:
        node = todo.pop()
        if node not in seen:
            seen.add(node)
            todo.extend(edges.get(node, ()))
    return seen


def is_http_app(name: str) -> bool:
    return (name in HTTP_APP or name.startswith(tuple(p + "." for p in HTTP_APP_PACKAGES))
            or bool(third_party(name) & HTTP_LIBRARIES))


# -- the checks ---------------------------------------------------------------------------------
def test_the_reader_sees_every_kind_of_import() -> None:
    edges = graph()
    assert "lb.lifeline" in edges["supervisor.__main__"]  # from lb import lifeline
    assert "lb.backends.local" in edges["lb.backends"]  # inside a function
    assert "lb.backends.base" in edges["lb.backends"]  # from a package's __init__
    assert "lb.formulas" in edges["lb.hashring"]
    assert "flask" in third_party("lb.app")


def test_the_cycle_finder_finds_a_cycle_and_names_it() -> None:
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b", "c"}, "b": {"c"}, "c": set()}) is None
    assert collapse({"x.m": {"y.n"}, "y.n": {"x.k"}, "x.k": set()}, 1) == {"x": {"y"},
                                                                           "y": {"x"}}


def test_no_module_imports_itself_back() -> None:
    cycle = find_cycle(graph())
    assert cycle is None, "import cycle: " + " -> ".join(cycle or [])


def test_no_cycle_between_packages_or_subpackages() -> None:
    for depth, level in ((1, "packages"), (2, "subpackages and top-level modules")):
        cycle = find_cycle(collapse(graph(), depth))
        assert cycle is None, f"cycle between {level}: " + " -> ".join(cycle or [])


def test_the_pure_cores_import_nothing_of_the_project_but_each_other() -> None:
    for core in sorted(PURE_CORES):
        assert graph()[core] <= PURE_CORES, (core, graph()[core] - PURE_CORES)
        assert not third_party(core) & HTTP_LIBRARIES


def test_the_balancer_never_imports_the_supervisor() -> None:
    offenders = {(m, t) for m, targets in graph().items() if m.split(".")[0] == "lb"
                 for t in targets if t.split(".")[0] == "supervisor"}
    assert offenders == set()


def test_the_supervisor_reaches_nothing_of_the_http_app() -> None:
    supervisor = [m for m in graph() if m.split(".")[0] == "supervisor"]
    reached = reachable(graph(), supervisor)
    assert {"lb.registry", "lb.naming", "lb.backends", "lb.events"} <= reached  # what it needs
    assert sorted(m for m in reached if is_http_app(m)) == []


def test_the_supervisor_process_loads_no_http_library() -> None:
    code = ("import sys, supervisor.__main__; "
            "print(' '.join(sorted({m.partition('.')[0] for m in sys.modules})))")
    loaded = set(subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True,
                                text=True, check=True, timeout=60).stdout.split())
    assert "supervisor" in loaded and "lb" in loaded
    assert loaded & HTTP_LIBRARIES == set()
