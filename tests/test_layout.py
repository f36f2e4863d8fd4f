"""The layout's rules: the algorithms never import the execution machinery, and only `trimprune.exec`
knows streams, events, pinned memory, graphs and Triton."""
import ast
from pathlib import Path

SRC = Path(__file__).resolve().parents[1] / "src" / "trimprune"
MACHINERY = ("torch.cuda.Stream", "torch.cuda.Event", "torch.cuda.CUDAGraph", "torch.cuda.graph", "torch.cuda.stream",
             "pin_memory", "wait_event", "wait_stream", "record_function", "triton")


def _imports(path: Path) -> list[str]:
    """Absolute module names imported by a file of the package."""
    pkg = path.relative_to(SRC.parent).with_suffix("").parts[:-1]
    out = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            out += [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = list(pkg[:len(pkg) - node.level + 1]) if node.level else []
            mod = ".".join(base + ([node.module] if node.module else []))
            out += [mod] + [f"{mod}.{a.name}" for a in node.names]
    return out


def test_algorithms_never_import_the_execution_package():
    files = sorted((SRC / "algo").rglob("*.py"))
    assert len(files) > 10
    bad = [(str(f.relative_to(SRC)), m) for f in files for m in _imports(f)
           if m == "trimprune.exec" or m.startswith("trimprune.exec.")]
    assert not bad, bad


def test_only_exec_knows_streams_events_pinned_memory_graphs_and_triton():
    bad = []
    for f in sorted(SRC.rglob("*.py")):
        if f.relative_to(SRC).parts[0] == "exec":
            continue
        text = f.read_text()
        bad += [(str(f.relative_to(SRC)), word) for word in MACHINERY if word in text]
    assert not bad, bad


def test_the_rule_is_checked_on_a_real_import():
    """The import parser resolves relative imports (so the first test can fail)."""
    imports = _imports(SRC / "exec" / "kernels.py")
    assert "trimprune.algo.trim.search" in imports and "trimprune.exec.fastpaths" in imports
