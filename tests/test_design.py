"""The shape docs/DESIGN.md promises, checked on the source: no import cycle, no module
reaching into another's private names, and the core stages blind to the demo."""

from __future__ import annotations

import ast
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PACKAGE = REPO / "length_control"
CORE_STAGES = {"generate", "splice", "train", "evaluate", "report", "pipeline", "contracts", "policy"} | {
    f"engines.{name}" for name in ("protocol", "requests", "vllm", "vllm_worker", "openai", "recipe_engine")
}


def _modules() -> dict[str, Path]:
    return {
        ".".join(path.relative_to(PACKAGE).with_suffix("").parts).removesuffix(".__init__"): path
        for path in PACKAGE.rglob("*.py")
    }


def _imports(path: Path) -> list[tuple[str, list[str]]]:
    """(module, names) of every `length_control` import in a file, at any depth."""
    found = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("length_control"):
            module = node.module.removeprefix("length_control").lstrip(".")
            for alias in node.names:
                submodule = f"{module}.{alias.name}".lstrip(".")
                if submodule in _modules():
                    found.append((submodule, []))
                else:
                    found.append((module, [alias.name]))
        elif isinstance(node, ast.Import):
            found += [
                (a.name.removeprefix("length_control."), []) for a in node.names if a.name.startswith("length_control.")
            ]
    return found


def _private_uses(path: Path) -> list[str]:
    """`module._name` where `module` is a length_control module imported by name."""
    tree = ast.parse(path.read_text())
    modules = {
        alias.asname or alias.name
        for node in ast.walk(tree)
        if isinstance(node, ast.ImportFrom) and node.module == "length_control"
        for alias in node.names
    }
    return [
        f"{node.value.id}.{node.attr}"
        for node in ast.walk(tree)
        if isinstance(node, ast.Attribute)
        and isinstance(node.value, ast.Name)
        and node.value.id in modules
        and node.attr.startswith("_")
        and not node.attr.startswith("__")
    ]


def _graph() -> dict[str, set[str]]:
    modules = _modules()
    return {
        name: {target for target, _ in _imports(path) if target in modules and target != name}
        for name, path in modules.items()
    }


def test_no_import_cycle() -> None:
    graph = _graph()
    state: dict[str, str] = {}

    def visit(node: str, trail: list[str]) -> None:
        state[node] = "open"
        for target in sorted(graph[node]):
            assert state.get(target) != "open", f"import cycle: {' -> '.join(trail + [node, target])}"
            if target not in state:
                visit(target, trail + [node])
        state[node] = "done"

    for node in sorted(graph):
        if node not in state:
            visit(node, [])


def test_no_module_or_bench_imports_another_modules_private_names() -> None:
    files = {**_modules(), **{f"bench/{path.name}": path for path in (REPO / "bench").glob("*.py")}}
    private = [
        (name, target, imported)
        for name, path in files.items()
        for target, names in _imports(path)
        for imported in names
        if imported.startswith("_")
    ]
    private += [(name, use) for name, path in files.items() for use in _private_uses(path)]
    assert private == []


def test_the_core_stages_do_not_import_the_demo() -> None:
    graph = _graph()
    reaching = {name: sorted(t for t in graph[name] if t == "demo" or t.startswith("demo.")) for name in CORE_STAGES}
    assert {name: targets for name, targets in reaching.items() if targets} == {}
