"""User-facing errors: one line that names the bad value and the fix."""


class TrimpruneError(Exception):
    """An error caused by bad input or environment; the CLI prints it as one line and exits 2."""

    def __init__(self, message: str):
        super().__init__(" ".join(str(message).split()))


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
