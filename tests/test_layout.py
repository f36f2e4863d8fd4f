"""The layout's rules: folders are floors (a module imports only lower floors or its own package),
no import circle anywhere (lazy and type-checking imports included), the algorithms never import the
execution machinery, and only `trimprune.exec` knows streams, events, pinned memory, graphs and Triton."""

import ast
from pathlib import Path

SRC = Path(__file__).resolve().parents[1] / "src" / "trimprune"
MACHINERY = (
    "torch.cuda.Stream",
    "torch.cuda.Event",
    "torch.cuda.CUDAGraph",
    "torch.cuda.graph",
    "torch.cuda.stream",
    "pin_memory",
    "wait_event",
    "wait_stream",
    "record_function",
    "triton",
)
# lowest first; the units of one floor never import each other
FLOORS = [
    {"errors"},
    {"limits"},
    {"config"},
    {"core"},
    {"algo"},
    {"engine", "exec", "calib"},
    {"io"},
    {"preflight", "session"},
    {"search", "sweep"},
    {"api"},
    {"cli"},
    {"__main__"},
]


def _imports(path: Path) -> list[str]:
    """Absolute module names imported by a file of the package (every import, lazy ones included)."""
    pkg = path.relative_to(SRC.parent).with_suffix("").parts[:-1]
    if path.name == "__init__.py":
        pkg = path.relative_to(SRC.parent).parts[:-1]
    out = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            out += [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = list(pkg[: len(pkg) - node.level + 1]) if node.level else []
            mod = ".".join(base + ([node.module] if node.module else []))
            out += [f"{mod}.{a.name}" for a in node.names]
    return out


def _modules() -> dict[str, Path]:
    out = {}
    for f in sorted(SRC.rglob("*.py")):
        parts = f.relative_to(SRC.parent).with_suffix("").parts
        if parts[-1] == "__init__":
            parts = parts[:-1]
        out[".".join(parts)] = f
    return out


def _unit(module: str) -> str | None:
    """The floor unit of a module: its first name below `trimprune` (None for the package itself)."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else None


def _floor(unit: str) -> int:
    for i, units in enumerate(FLOORS):
        if unit in units:
            return i
    raise AssertionError(f"{unit} is on no floor: add it to FLOORS")


def _edges() -> dict[str, set[str]]:
    """module -> the package's modules it imports (`from m import name`: the module m.name where it is
    one, else m)."""
    mods = _modules()
    edges: dict[str, set[str]] = {}
    for name, f in mods.items():
        targets = set()
        for m in _imports(f):
            while m and m not in mods:
                m = m.rpartition(".")[0]
            if m and m != name and m != "trimprune":
                targets.add(m)
        edges[name] = targets
    return edges


def test_every_unit_is_on_a_floor_and_imports_only_lower_floors():
    bad = []
    for mod, targets in _edges().items():
        unit = _unit(mod)
        if unit is None:
            continue
        for t in targets:
            other = _unit(t)
            if other != unit and _floor(other) >= _floor(unit):
                bad.append(f"{mod} -> {t}")
    assert not bad, bad


def test_no_import_circle():
    edges = _edges()
    state: dict[str, int] = {}
    circles = []

    def visit(m: str, path: list[str]) -> None:
        state[m] = 1
        for t in sorted(edges.get(m, ())):
            if state.get(t) == 1:
                circles.append(path[path.index(t) :] + [t])
            elif t not in state:
                visit(t, path + [t])
        state[m] = 2

    for m in sorted(edges):
        if m not in state:
            visit(m, [m])
    assert not circles, circles


def test_the_floor_rule_can_fail():
    """The checks see real imports: relative ones resolved, lazy ones included."""
    edges = _edges()
    assert "trimprune.algo.trim.search" in edges["trimprune.exec.kernels"]
    assert "trimprune.exec.fastpaths" in edges["trimprune.exec.kernels"]
    assert _floor(_unit("trimprune.exec.kernels")) > _floor(_unit("trimprune.algo.trim.search"))
    assert "trimprune.api" in edges["trimprune.cli"]  # a lazy import inside a function


def test_algorithms_never_import_the_execution_package():
    files = sorted((SRC / "algo").rglob("*.py"))
    assert len(files) > 10
    bad = [
        (str(f.relative_to(SRC)), m)
        for f in files
        for m in _imports(f)
        if m == "trimprune.exec" or m.startswith("trimprune.exec.")
    ]
    assert not bad, bad


def test_only_exec_knows_streams_events_pinned_memory_graphs_and_triton():
    bad = []
    for f in sorted(SRC.rglob("*.py")):
        if f.relative_to(SRC).parts[0] == "exec":
            continue
        text = f.read_text()
        bad += [(str(f.relative_to(SRC)), word) for word in MACHINERY if word in text]
    assert not bad, bad


MAX_FUNCTION_LINES = 80


def _is_triton_kernel(fn: ast.FunctionDef | ast.AsyncFunctionDef) -> bool:
    """Decorated with `triton.jit` (bare or called, e.g. `@triton.jit(...)`)."""
    for dec in fn.decorator_list:
        target = dec.func if isinstance(dec, ast.Call) else dec
        if ast.unparse(target) == "triton.jit":
            return True
    return False


def test_no_function_over_80_lines_outside_triton_kernels():
    too_long = []
    for path in sorted(SRC.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if not isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                continue
            n = node.end_lineno - node.lineno + 1
            if n > MAX_FUNCTION_LINES and not _is_triton_kernel(node):
                rel = path.relative_to(SRC.parents[1])
                too_long.append(f"{rel}:{node.lineno} {node.name} ({n} lines)")
    assert not too_long, "functions over 80 lines:\n" + "\n".join(too_long)
