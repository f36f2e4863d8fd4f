"""User-facing errors: one line that names the bad value and the fix."""


class TrimpruneError(Exception):
    """An error caused by bad input or environment; the CLI prints it as one line and exits 2."""

    def __init__(self, message: str):
        super().__init__(" ".join(str(message).split()))


class NonFiniteError(TrimpruneError):
    """NaN or Inf in weights, activations, statistics or an evaluation result (`calib.finite`)."""
