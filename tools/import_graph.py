"""Print hkstore's module-level import graph and check the rule of the layers.

Usage (from a checkout; needs only the standard library)::

    python tools/import_graph.py            # graph, layer summary, problems; exit 1 on a problem
    python tools/import_graph.py --check    # problems only

The graph is read from the source with :mod:`ast`: every ``import`` and ``from ... import``
statement of a module counts, at module level or inside a function, except those under
``if TYPE_CHECKING:`` (they are never executed). Relative imports are resolved. An arrow
``a -> b`` means module ``a`` imports module ``b`` of the package (importing ``pkg.mod`` also
runs ``pkg/__init__.py``, so a ``from hkstore.store._x import y`` counts as an arrow to
``hkstore.store._x``; the package ``__init__`` it passes through is not drawn).

The rule of the layers (docs: the README's "Layout" section):

- layers, bottom up: ``base`` (``hkstore.errors``, ``hkstore._version``) < ``store`` <
  ``model`` < {``saving``, ``checkpoint``, ``integrations``} < ``cli``; an import may only
  point down or sideways within its own layer, never up;
- ``saving`` is a leaf: only the CLI may import it; ``checkpoint`` and ``integrations`` use
  the public API instead;
- nothing outside ``hkstore/store/`` imports a private ``hkstore.store._*`` module (the store
  exposes what the rest needs from ``hkstore.store``);
- ``hkstore.store`` and the CLI never import jax or haiku (the CLI also never imports the
  ``model`` or ``saving`` layers, which do);
- no cycle between modules.

The package's ``__init__`` (``hkstore``) resolves its public names lazily and is the public
API: any layer above ``model`` may import it.

Example:
    >>> graph = build_graph(Path(__file__).resolve().parents[1])
    >>> "hkstore.errors" in graph.modules
    True
"""

from __future__ import annotations

import argparse
import ast
import sys
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

PACKAGE = "hkstore"
#: Layers, bottom up. The public package ``hkstore`` has a layer of its own (see module doc).
RANKS = {"base": 0, "store": 1, "model": 2, "saving": 3, "checkpoint": 3, "integrations": 3,
         "cli": 4}
FORBIDDEN_THIRD_PARTY = {"store": ("jax", "jaxlib", "haiku"), "cli": ("jax", "jaxlib", "haiku")}


@dataclass
class Graph:
    """Modules of the package, their imports inside it, and their third-party imports."""

    modules: dict[str, Path] = field(default_factory=dict)
    arrows: dict[str, set[str]] = field(default_factory=dict)
    external: dict[str, set[str]] = field(default_factory=dict)


def module_name(root: Path, path: Path) -> str:
    """``hkstore/store/_x.py`` -> ``hkstore.store._x``; ``pkg/__init__.py`` -> ``pkg``."""
    parts = list(path.relative_to(root).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _is_type_checking(node: ast.If) -> bool:
    test = node.test
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def _imports(tree: ast.AST, module: str, is_package: bool) -> Iterable[str]:
    """Yield the absolute names every executed import statement of ``tree`` refers to."""
    stack: list[ast.AST] = [tree]
    while stack:
        node = stack.pop()
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.If) and _is_type_checking(child):
                stack.extend(child.orelse)
                continue
            if isinstance(child, ast.Import):
                yield from (alias.name for alias in child.names)
            elif isinstance(child, ast.ImportFrom):
                if child.level:
                    base = module.split(".")
                    base = base if is_package else base[:-1]
                    base = base[: len(base) - (child.level - 1)]
                    target = ".".join([*base, *([child.module] if child.module else [])])
                else:
                    target = child.module or ""
                yield target
                for alias in child.names:  # `from pkg import submodule`
                    yield f"{target}.{alias.name}"
            stack.append(child)


def build_graph(root: Path) -> Graph:
    """Read every module under ``root/hkstore`` and return its import graph."""
    graph = Graph()
    for path in sorted((root / PACKAGE).rglob("*.py")):
        graph.modules[module_name(root, path)] = path
    for name, path in graph.modules.items():
        tree = ast.parse(path.read_text(encoding="utf-8"), str(path))
        inside: set[str] = set()
        outside: set[str] = set()
        for target in _imports(tree, name, path.name == "__init__.py"):
            if target == PACKAGE or target.startswith(PACKAGE + "."):
                # the longest known module the name refers to (`from a.b import c` -> a.b.c
                # if it is a module, else a.b)
                while target not in graph.modules and "." in target:
                    target = target.rsplit(".", 1)[0]
                if target != name:
                    inside.add(target)
            elif target:
                outside.add(target.split(".")[0])
        graph.arrows[name] = inside
        graph.external[name] = outside
    return graph


def layer(module: str) -> str:
    """The layer a module belongs to (``"api"`` for the public package ``hkstore``)."""
    parts = module.split(".")
    if module == PACKAGE:
        return "api"
    second = parts[1]
    if second in ("errors", "_version"):
        return "base"
    if second in ("store", "model", "checkpoint", "integrations"):
        return second
    if second in ("saving", "serialization"):  # serialization: the saving module's old name
        return "saving"
    if second in ("cli", "_cli", "__main__"):
        return "cli"
    return "unknown"


def cycles(graph: Graph) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan), each sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    on_stack: set[str] = set()
    stack: list[str] = []
    out: list[list[str]] = []
    counter = 0

    def visit(v: str) -> None:
        nonlocal counter
        index[v] = low[v] = counter
        counter += 1
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph.arrows.get(v, ())):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                out.append(sorted(component))

    for v in sorted(graph.modules):
        if v not in index:
            visit(v)
    return out


def problems(graph: Graph) -> list[str]:
    """Every broken layering rule, one line each (empty when the layers hold)."""
    out = [f"import cycle: {' <-> '.join(c)}" for c in cycles(graph)]
    for src in sorted(graph.arrows):
        src_layer = layer(src)
        if src_layer == "unknown":
            out.append(f"module outside every layer: {src}")
            continue
        for dst in sorted(graph.arrows[src]):
            dst_layer = layer(dst)
            if dst_layer == "unknown":
                continue
            arrow = f"{src} -> {dst}"
            if src_layer != "store" and dst.startswith(f"{PACKAGE}.store._"):
                out.append(f"private store module used outside the store: {arrow}")
            if dst_layer == "api":
                if src_layer in ("base", "store", "model"):
                    out.append(f"{src_layer} imports the public package (a layer above): {arrow}")
                continue
            if src_layer == "api":
                continue
            if RANKS[dst_layer] > RANKS[src_layer]:
                out.append(f"{src_layer} imports a higher layer ({dst_layer}): {arrow}")
            elif (RANKS[dst_layer] == RANKS[src_layer] and dst_layer != src_layer):
                out.append(f"{src_layer} imports its sibling layer {dst_layer}: {arrow}")
            if src_layer == "cli" and dst_layer in ("model", "saving"):
                out.append(f"the CLI imports the {dst_layer} layer (jax): {arrow}")
        for name in sorted(graph.external.get(src, ())):
            if name in FORBIDDEN_THIRD_PARTY.get(src_layer, ()):
                out.append(f"{src_layer} imports {name}: {src}")
    return out


def render(graph: Graph) -> str:
    """The graph as text: arrows per module, then arrows between layers."""
    lines = ["modules and their imports inside the package:"]
    for src in sorted(graph.modules):
        targets = sorted(graph.arrows[src])
        lines.append(f"  {src} [{layer(src)}]" + (f" -> {', '.join(targets)}" if targets else ""))
    between: dict[tuple[str, str], int] = {}
    for src, targets in graph.arrows.items():
        for dst in targets:
            key = (layer(src), layer(dst))
            if key[0] != key[1]:
                between[key] = between.get(key, 0) + 1
    lines.append("arrows between layers (count):")
    lines.extend(f"  {a} -> {b}: {n}" for (a, b), n in sorted(between.items()))
    total = sum(len(t) for t in graph.arrows.values())
    lines.append(f"modules {len(graph.modules)}, arrows {total}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--root", type=Path, default=Path(__file__).resolve().parents[1])
    parser.add_argument("--check", action="store_true", help="print problems only")
    args = parser.parse_args(argv)
    graph = build_graph(args.root)
    found = problems(graph)
    if not args.check:
        print(render(graph))
    print(f"layering problems: {len(found)}")
    for line in found:
        print(f"  {line}")
    return 1 if found else 0


if __name__ == "__main__":
    sys.exit(main())
