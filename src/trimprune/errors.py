"""User-facing errors: one line that names the bad value and the fix.

A message names a config field by a token of its flat name in braces, `{trim_iterations}`: `str(e)`
renders it as the name a Python user writes (`trim.iterations`; `sparsity` for a top-level field),
`e.cli_message()` as its command-line flag (`--trim-iterations`). `config` registers the fields
(`register_fields`); braces around any other name stay as they are, and a message without tokens
reads the same both ways.
"""

from __future__ import annotations

import re

_TOKEN = re.compile(r"\{([a-z][a-z0-9_]*)\}")
_FIELDS: dict[str, tuple[str, str]] = {}  # flat name -> (Python name, flag)


def register_fields(fields: dict[str, tuple[str, str]]) -> None:
    """Make `{name}` a field token: flat name -> (its Python name, its command-line flag)."""
    _FIELDS.update(fields)


def render(template: str, cli: bool = False) -> str:
    """`template` with each field token as its Python name, or with `cli` as its flag."""
    form = 1 if cli else 0

    def one(m: re.Match) -> str:
        names = _FIELDS.get(m.group(1))
        return m.group(0) if names is None else names[form]

    return _TOKEN.sub(one, template)


class TrimpruneError(Exception):
    """An error caused by bad input or environment; the CLI prints it as one line and exits 2.
    `template`: the message with its field tokens; `fields`: the flat names of the fields it names;
    `str(e)`: the Python names; `cli_message()`: the flags."""

    def __init__(self, message: str):
        self.template = " ".join(str(message).split())
        super().__init__(self.template)

    @property
    def fields(self) -> tuple[str, ...]:
        """The flat names of the config fields the message names, in order, once each."""
        return tuple(dict.fromkeys(n for n in _TOKEN.findall(self.template) if n in _FIELDS))

    def __str__(self) -> str:
        return render(self.template)

    def cli_message(self) -> str:
        """The message as the command line prints it: each field named by its flag."""
        return render(self.template, cli=True)


class ConfigError(TrimpruneError):
    """A config value (a flag or a recipe key) of the wrong type or out of range (`config`)."""


class InputFileError(TrimpruneError):
    """A calibration, evaluation, allocation or recipe file that is missing, unreadable or
    malformed."""


class ModelSourceError(TrimpruneError):
    """A --model / --gguf-file that is not a loadable model: a missing path, a folder without
    config.json, a hub id that cannot be reached."""


class OutputError(TrimpruneError):
    """An output location that cannot be written, or that --overwrite may not replace
    (`io.export`)."""


class NonFiniteError(TrimpruneError):
    """NaN or Inf in weights, activations, statistics or an evaluation result (`core.finite`)."""


class CorruptFileError(TrimpruneError):
    """A file whose bytes fail an integrity check: a truncated or damaged GGUF or safetensors file
    (`io.integrity`), or a resume-state file that differs from the sha256 its state.json records
    (`io.resume_manifest`). `path`: the file."""

    def __init__(self, message: str, path=None):
        super().__init__(message)
        self.path = str(path) if path is not None else None
