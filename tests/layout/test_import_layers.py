"""The package's import graph: dependencies point one way and there are no cycles.

The graph is read statically from every module's source (module-level imports, imports inside
functions and ``TYPE_CHECKING`` blocks alike), so a cycle hidden in a function still fails.
Layers, lowest first (a module may import only its own layer or lower ones):

    _validation  <-  core, datasets  <-  kernels  <-  attention  <-  nn  <-  train
    <-  adapters.{estimators, forecast, text} (never each other)  <-  the top-level package, cli
"""

import ast
from pathlib import Path

import seqtensor

ROOT = Path(seqtensor.__file__).parent

LAYERS = {
    "seqtensor._validation": 0,
    "seqtensor.core": 1,
    "seqtensor.datasets": 1,
    "seqtensor.kernels": 2,
    "seqtensor.attention": 3,
    "seqtensor.nn": 4,
    "seqtensor.train": 5,
    "seqtensor.adapters": 6,
    "seqtensor.cli": 7,
    "seqtensor": 7,
}
ADAPTERS = (
    "seqtensor.adapters.estimators",
    "seqtensor.adapters.forecast",
    "seqtensor.adapters.text",
)


def module_name(path: Path) -> str:
    parts = ["seqtensor", *path.relative_to(ROOT).with_suffix("").parts]
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def modules() -> dict[str, Path]:
    return {module_name(p): p for p in ROOT.rglob("*.py")}


def imports_of(name: str, path: Path, known: set[str]) -> set[str]:
    """Every seqtensor module ``name`` imports, wherever the import statement stands."""
    package = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(base + ([node.module] if node.module else []))
            else:
                base = node.module or ""
            # `from pkg import sub` imports the submodule when one exists, else a name of pkg
            targets = [
                f"{base}.{a.name}" if f"{base}.{a.name}" in known else base for a in node.names
            ]
        else:
            continue
        for target in targets:
            while target and target not in known:  # `import a.b.c` of a name inside a module
                target = target.rpartition(".")[0]
            if target.startswith("seqtensor") and target != name:
                found.add(target)
    return found


def graph() -> dict[str, set[str]]:
    mods = modules()
    return {name: imports_of(name, path, set(mods)) for name, path in mods.items()}


def layer(name: str) -> int:
    best = max((k for k in LAYERS if name == k or name.startswith(k + ".")), key=len)
    return LAYERS[best]


def adapter(name: str) -> str | None:
    return next((a for a in ADAPTERS if name == a or name.startswith(a + ".")), None)


def test_every_module_has_a_layer():
    for name in modules():
        assert any(name == k or name.startswith(k + ".") for k in LAYERS), name


def test_imports_point_down_only():
    upward = []
    for name, targets in graph().items():
        for target in targets:
            if name == "seqtensor" or target.startswith(name + "."):
                continue  # a package may import its own submodules
            if layer(target) > layer(name):
                upward.append(f"{name} -> {target}")
            elif adapter(name) and adapter(target) and adapter(name) != adapter(target):
                upward.append(f"{name} -> {target} (adapters must not import each other)")
    assert not upward, "imports against the layering:\n" + "\n".join(sorted(upward))


def find_cycle(edges: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}  # 1 on the DFS stack, 2 done
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(edges.get(node, ())):
            if state.get(nxt) == 1:
                return stack[stack.index(nxt) :] + [nxt]
            if nxt not in state and (cycle := visit(nxt)):
                return cycle
        stack.pop()
        state[node] = 2
        return None

    for node in sorted(edges):
        if node not in state and (cycle := visit(node)):
            return cycle
    return None


def test_no_import_cycles():
    # edges from a package's __init__ to its own submodules are how packages re-export; a
    # submodule importing its parent package back would still show up as a cycle
    edges = {
        name: {t for t in targets if not t.startswith(name + ".")}
        for name, targets in graph().items()
    }
    assert find_cycle(edges) is None, f"import cycle: {' -> '.join(find_cycle(edges))}"


def test_cycle_finder_finds_a_planted_cycle():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": set()}) is None


def test_import_seqtensor_stays_light():
    import subprocess
    import sys

    code = (
        "import sys, seqtensor; "
        "print(sorted(m for m in ('pandas', 'sklearn', 'transformers') if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]", out.stdout
    # and the lazy names still resolve
    code = "import seqtensor as st; print(st.Forecaster.__name__, st.SequenceRegressor.__name__)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["Forecaster", "SequenceRegressor"]
