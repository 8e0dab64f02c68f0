"""The code's shape: no two modules import each other, and every step's KFP function is self-contained."""

from __future__ import annotations

import ast
import builtins
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
# The project's modules by their installed names: components/ and pipelines/ install as vlp.components and
# vlp.pipelines (pyproject.toml's package-dir).
MODULES = {
    "vlp." + ".".join(p.relative_to(ROOT).with_suffix("").parts).removesuffix(".__init__"): p
    for p in [*(ROOT / "components").rglob("*.py"), *(ROOT / "pipelines").rglob("*.py")]
}


def _imports(path: Path) -> set[str]:
    """The project modules a module imports, at module level or inside functions."""
    deps = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            subs = [f"{node.module}.{a.name}" for a in node.names if f"{node.module}.{a.name}" in MODULES]
            deps.update(subs)
            if node.module in MODULES and len(subs) < len(node.names):
                deps.add(node.module)
        elif isinstance(node, ast.Import):
            deps.update(a.name for a in node.names if a.name in MODULES)
    return deps


def test_no_two_modules_import_each_other() -> None:
    graph = {name: _imports(path) - {name} for name, path in MODULES.items()}
    mutual = sorted({tuple(sorted((a, b))) for a in graph for b in graph[a] if a in graph.get(b, set())})
    assert mutual == []


def _import_time_deps(name: str, path: Path) -> set[str]:
    """What importing a module imports right away: its module-level imports (not those inside functions or under
    `if TYPE_CHECKING:`), each with the packages above it, whose `__init__` runs first."""
    deps: set[str] = set()
    for node in ast.parse(path.read_text()).body:
        targets: list[str] = []
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            targets = [f"{node.module}.{a.name}" if f"{node.module}.{a.name}" in MODULES else node.module for a in node.names]
        elif isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        for target in targets:
            parts = target.split(".")
            deps.update(".".join(parts[:i]) for i in range(1, len(parts) + 1) if ".".join(parts[:i]) in MODULES)
    parts = name.split(".")
    deps.update(".".join(parts[:i]) for i in range(1, len(parts)) if ".".join(parts[:i]) in MODULES)
    return deps - {name}


def test_no_import_cycles_at_import_time() -> None:
    """No chain of module-level imports leads back to where it started, counting the package `__init__`s every
    import of a submodule runs first (a cycle works only while the import order happens to allow it)."""
    graph = {name: _import_time_deps(name, path) for name, path in MODULES.items()}
    cycles, index, low, stack, on_stack = [], {}, {}, [], set()

    def visit(node: str) -> None:  # Tarjan's strongly connected components
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for dep in graph.get(node, ()):
            if dep not in index:
                visit(dep)
                low[node] = min(low[node], low[dep])
            elif dep in on_stack:
                low[node] = min(low[node], index[dep])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                cycles.append(sorted(component))

    for name in sorted(graph):
        if name not in index:
            visit(name)
    assert cycles == []


def _step_functions() -> list[tuple[str, ast.FunctionDef]]:
    found = []
    for path in sorted((ROOT / "components").rglob("*.py")):
        module = ".".join(path.relative_to(ROOT / "components").with_suffix("").parts)
        for node in ast.parse(path.read_text()).body:
            if isinstance(node, ast.FunctionDef) and node.name.endswith("_op"):
                found.append((f"{module}.{node.name}", node))
    return found


@pytest.mark.parametrize(("name", "func"), _step_functions(), ids=[n for n, _ in _step_functions()])
def test_each_step_function_imports_what_its_body_uses(name: str, func: ast.FunctionDef) -> None:
    """KFP runs a lightweight component's function alone, without its module: a name the body reads from the
    module (an import that lives only at module level) is a NameError on Vertex."""
    bound = {a.arg for a in [*func.args.args, *func.args.kwonlyargs]}
    for node in ast.walk(func):
        if isinstance(node, ast.Import | ast.ImportFrom):
            bound.update((a.asname or a.name).split(".")[0] for a in node.names)
        elif isinstance(node, ast.Name) and isinstance(node.ctx, ast.Store):
            bound.add(node.id)
        elif isinstance(node, ast.FunctionDef | ast.ClassDef) and node is not func:
            bound.add(node.name)
        elif isinstance(node, ast.arg):
            bound.add(node.arg)
        elif isinstance(node, ast.ExceptHandler) and node.name:
            bound.add(node.name)
    body = ast.Module(body=func.body, type_ignores=[])
    read = {n.id for n in ast.walk(body) if isinstance(n, ast.Name) and isinstance(n.ctx, ast.Load)}
    assert read - bound - set(dir(builtins)) == set()


TARGETS = ("vlp.components.vertex", "vlp.components.cloud_run")
# The steps that serve both targets and pick one by the config's `target`: the only shared code that names a target.
DISPATCHERS = {"vlp.components.preflight", "vlp.components.cleanup", "vlp.components.benchmark_step"}


def _within(name: str, package: str) -> bool:
    return name == package or name.startswith(package + ".")


def test_the_targets_never_import_each_other_and_shared_code_imports_neither() -> None:
    """Cloud Run code and Vertex code meet only in the three dispatching steps: what both use lives in a shared
    folder (serving/, smoke/, planning/...) or at the root, so neither target drags the other into its steps."""
    crossings = []
    for name, path in MODULES.items():
        if not name.startswith("vlp.components.") or name in DISPATCHERS:
            continue
        own = next((t for t in TARGETS if _within(name, t)), None)
        for dep in _imports(path):
            target = next((t for t in TARGETS if _within(dep, t)), None)
            if target and target != own:
                crossings.append(f"{name} -> {dep}")
    assert crossings == []


def test_the_code_imports_itself_by_its_installed_names_only() -> None:
    """`import components.x` or `pipelines.x` works only from the repository root (the folders' own names) and
    would load a second copy of a module beside its `vlp.` one; installed, those names are a user's own folders."""
    found = []
    for path in [*(ROOT / "components").rglob("*.py"), *(ROOT / "pipelines").rglob("*.py"), *(ROOT / "tests").rglob("*.py")]:
        for node in ast.walk(ast.parse(path.read_text())):
            names = [node.module or ""] if isinstance(node, ast.ImportFrom) and node.level == 0 else []
            names += [a.name for a in node.names] if isinstance(node, ast.Import) else []
            found += [f"{path.relative_to(ROOT)}: {n}" for n in names if n.split(".")[0] in ("components", "pipelines")]
    assert found == []
