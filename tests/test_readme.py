"""The README's and the docs' commands and Python example run as pasted (offline), on a tiny model: each line of
its "Commands" block goes through the CLI with only the model swapped for a tiny one and the
calibration / evaluation sizes shrunk by flags appended after the pasted ones (the last value of a
flag wins), in an empty working folder so that the relative output paths are the README's own."""

import re
import shlex
from pathlib import Path

import pytest

from trimprune.cli import main

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
SMALL = {  # flags appended to each command, by subcommand
    "prune": ["--nsamples", "4", "--seqlen", "16", "--eval-seqlen", "32", "--eval-limit", "2"],
    "sweep": ["--nsamples", "2", "--seqlen", "16", "--eval-seqlen", "32", "--eval-limit", "2"],
    "eval": ["--seqlen", "32", "--eval-limit", "2", "--tasks-limit", "2"],
    "report": [],
    "export": [],
}


def _section(title: str) -> str:
    text = README.read_text()
    start = text.index(f"## {title}\n")
    end = text.find("\n## ", start + 1)
    return text[start : end if end >= 0 else None]


def _commands() -> list[str]:
    block = re.search(r"```bash\n(.*?)```", _section("Commands"), re.S)
    assert block, "README: no bash block under ## Commands"
    return [ln for ln in block.group(1).splitlines() if ln.startswith("trimprune ")]


def test_the_readme_starts_with_the_demo_and_the_test_command():
    first = re.search(r"```bash\n(.*?)```", README.read_text(), re.S)
    assert first and [ln.split()[:2] for ln in first.group(1).splitlines()] == [
        ["make", "demo"],
        ["make", "test"],
    ]


def test_every_readme_command_runs_as_pasted(
    tiny_dir, tmp_path, monkeypatch, capsys, with_data_env
):
    commands = _commands()
    assert {c.split()[1] for c in commands} == set(SMALL), commands
    monkeypatch.chdir(tmp_path)
    for line in commands:
        argv = shlex.split(line)[1:]
        argv = [str(tiny_dir) if a == "smollm2-135m" else a for a in argv]
        rc = main([*argv, *SMALL[argv[0]]])
        assert rc == 0, f"{line}\n{capsys.readouterr().err[-2000:]}"
    assert (tmp_path / "out" / "smollm2-wanda50" / "model.safetensors").is_file()
    assert (tmp_path / "out" / "smollm2-trim70" / "model.compact.safetensors").is_file()
    assert (tmp_path / "eval.json").is_file() and (tmp_path / "compare.html").is_file()
    assert (tmp_path / "out" / "sweep" / "sweep.json").is_file()
    assert (tmp_path / "out" / "smollm2-trim70-hf" / "model.safetensors").is_file()


def test_the_readme_python_example_runs_as_pasted(tiny_dir, monkeypatch, capsys, with_data_env):
    code = re.search(r"```python\n(.*?)```", _section("Python"), re.S)
    assert code
    src = code.group(1)
    swaps = {
        '"smollm2-135m"': repr(str(tiny_dir)),
        '"nsamples": 32, "seqlen": 512': '"nsamples": 2, "seqlen": 16',
        "seqlen=512, limit=20": "seqlen=32, limit=2",
    }
    for old, new in swaps.items():
        assert old in src, f"README's Python example changed: {old!r} is gone"
        src = src.replace(old, new)
    exec(compile(src, "README.md", "exec"), {})
    out = capsys.readouterr().out
    assert re.search(r"sparsity 0\.\d{3}, \d+\.\d s", out), out


def _docs_commands(page: Path) -> list[str]:
    """The `trimprune` commands of a docs page's bash blocks (continued lines joined) that run
    offline: on the SmolLM2 alias, or on what earlier commands of the page wrote (no model)."""
    out = []
    for block in re.findall(r"```bash\n(.*?)```", page.read_text(), re.S):
        for cmd in block.replace("\\\n", " ").splitlines():
            if not cmd.startswith("trimprune "):
                continue
            model = re.search(r"--model (\S+)", cmd)
            if model is None or model.group(1) == "smollm2-135m":
                out.append(cmd)
    return out


DOCS = ["getting-started.md", "trim.md", "cli.md", "layerif.md", "lua.md", "search.md"]


def test_the_docs_pages_with_offline_commands_are_the_ones_run():
    pages = sorted(p.name for p in (ROOT / "docs").glob("*.md") if _docs_commands(p))
    assert pages == sorted(DOCS)


@pytest.mark.parametrize("page", DOCS)
def test_docs_commands_run_as_pasted(page, tiny_dir, tmp_path, monkeypatch, capsys, with_data_env):
    commands = _docs_commands(ROOT / "docs" / page)
    assert commands
    for d in ("scripts", "recipes"):  # the paths the docs name, relative to the project
        (tmp_path / d).symlink_to(ROOT / d)
    monkeypatch.chdir(tmp_path)
    for line in commands:
        argv = shlex.split(line)[1:]
        argv = [str(tiny_dir) if a == "smollm2-135m" else a for a in argv]
        rc = main([*argv, *SMALL[argv[0]]])
        assert rc == 0, f"{line}\n{capsys.readouterr().err[-2000:]}"
