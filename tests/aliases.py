"""Real models behind the built-in aliases (`io.models.ALIASES`): their weights come in optional
packages, so a test that needs one is skipped, naming the install command, when it is absent."""

import importlib.util

import pytest

from trimprune.io.models import ALIASES


def need_alias(alias: str) -> None:
    """Skip the calling test when the package that ships `alias`'s weights is not installed."""
    pkg, _, pip_cmd = ALIASES[alias]
    if importlib.util.find_spec(pkg) is None:
        pytest.skip(f"{alias} is not installed: {pip_cmd}")
