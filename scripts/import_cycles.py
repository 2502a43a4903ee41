"""Print every import cycle among the orchestrator's modules; exit 1 if there is one.

import-linter's layers contract only sees imports that cross layers; this check sees every
import between two of the package's modules, including the ones Python runs late: imports
inside a function and imports under ``if TYPE_CHECKING:`` (grimp reads both by default). A
cycle is a strongly connected component of the module graph with more than one module; a
module importing itself is not reported.

For each cycle the script prints its modules and the imports inside it (importer ->
imported, with line numbers), which is where a cut has to be made.

Run from the repository root:  python scripts/import_cycles.py  (needs grimp).
"""

from __future__ import annotations

import sys
from pathlib import Path

import grimp

PACKAGE = "orchestrator"


def direct_imports(graph: grimp.ImportGraph) -> dict[str, set[str]]:
    """Each module of the package mapped to the other modules of it that it imports."""
    edges: dict[str, set[str]] = {}
    for module in graph.modules:
        imported = graph.find_modules_directly_imported_by(module)
        edges[module] = {other for other in imported if other != module}
    return edges


def strongly_connected(edges: dict[str, set[str]]) -> list[list[str]]:
    """Tarjan's algorithm: the graph's strongly connected components, each sorted."""
    index: dict[str, int] = {}
    lowlink: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    components: list[list[str]] = []

    def visit(module: str) -> None:
        index[module] = lowlink[module] = len(index)
        stack.append(module)
        on_stack.add(module)
        for other in sorted(edges.get(module, ())):
            if other not in index:
                visit(other)
                lowlink[module] = min(lowlink[module], lowlink[other])
            elif other in on_stack:
                lowlink[module] = min(lowlink[module], index[other])
        if lowlink[module] == index[module]:
            component = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.append(member)
                if member == module:
                    break
            components.append(sorted(component))

    for module in sorted(edges):
        if module not in index:
            visit(module)
    return components


def describe(component: list[str], edges: dict[str, set[str]], graph: grimp.ImportGraph) -> str:
    """The component's modules, then each import between two of them with its lines."""
    lines = [f"cycle of {len(component)} modules: " + ", ".join(component)]
    members = set(component)
    for importer in component:
        for imported in sorted(edges[importer] & members):
            details = graph.get_import_details(importer=importer, imported=imported)
            where = ", ".join(f"l.{d['line_number']}" for d in details)
            lines.append(f"    {importer} -> {imported} ({where})")
    return "\n".join(lines)


def main() -> int:
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # the checkout's package
    graph = grimp.build_graph(PACKAGE, cache_dir=None)  # includes lazy and TYPE_CHECKING imports
    edges = direct_imports(graph)
    cycles = [c for c in strongly_connected(edges) if len(c) > 1]
    for component in sorted(cycles):
        print(describe(component, edges, graph))
        print()
    if cycles:
        print(f"{len(cycles)} import cycle(s) among {PACKAGE}'s modules", file=sys.stderr)
        return 1
    print(f"no import cycles among {len(edges)} {PACKAGE} modules")
    return 0


if __name__ == "__main__":
    sys.exit(main())
