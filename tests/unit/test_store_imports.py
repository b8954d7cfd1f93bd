"""The store's modules import each other in one direction only (entry <- tiers, disk <-
chunk_store <- build <- the package): no import circle, not even one hidden behind
TYPE_CHECKING or inside a function, which would break as soon as it ran first."""
import ast
from pathlib import Path

import vllm_kvflow.store

STORE_DIR = Path(vllm_kvflow.store.__file__).parent
PACKAGE = "vllm_kvflow.store"


def module_name(path: Path) -> str:
    return PACKAGE if path.name == "__init__.py" else f"{PACKAGE}.{path.stem}"


def store_imports(path: Path, modules: set[str]) -> set[str]:
    """The store modules that path imports anywhere in its source."""
    here = module_name(path)
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative: resolve against this module's package
                parts = (here if path.name == "__init__.py" else here.rsplit(".", 1)[0]).split(".")
                parts = parts[:len(parts) - (node.level - 1)]
                base = ".".join(parts + ([base] if base else []))
            names = [base] + [f"{base}.{a.name}" for a in node.names]
        else:
            continue
        found |= {n for n in names if n in modules and n != here}
    return found


def import_graph() -> dict[str, set[str]]:
    paths = sorted(STORE_DIR.glob("*.py"))
    modules = {module_name(p) for p in paths}
    return {module_name(p): store_imports(p, modules) for p in paths}


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import cycle as a path [a, b, ..., a], or None."""
    state: dict[str, str] = {}  # "open" while on the current path, then "done"

    def visit(node: str, path: list[str]) -> list[str] | None:
        state[node] = "open"
        for nxt in sorted(graph[node]):
            if state.get(nxt) == "open":
                return path[path.index(nxt):] + [node, nxt] if nxt in path else [node, nxt]
            if nxt not in state:
                cycle = visit(nxt, path + [node])
                if cycle:
                    return cycle
        state[node] = "done"
        return None

    for start in sorted(graph):
        if start not in state:
            cycle = visit(start, [])
            if cycle:
                return cycle
    return None


def test_cycle_finder_finds_a_cycle():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set(), "c": {"a", "b"}}) is None


def test_graph_sees_the_store_modules_and_their_imports():
    graph = import_graph()
    assert {"vllm_kvflow.store.entry", "vllm_kvflow.store.tiers", "vllm_kvflow.store.disk",
            "vllm_kvflow.store.chunk_store"} <= set(graph)
    assert "vllm_kvflow.store.entry" in graph["vllm_kvflow.store.tiers"]
    assert "vllm_kvflow.store.entry" in graph["vllm_kvflow.store.disk"]


def test_store_modules_form_no_import_cycle():
    cycle = find_cycle(import_graph())
    assert cycle is None, "import cycle in the store: " + " -> ".join(cycle)
