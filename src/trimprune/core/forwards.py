"""Running modules under another forward for a while (activation checkpointing, masked weights,
an experts forward) without touching their classes."""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterable, Iterator

from torch import nn


@contextlib.contextmanager
def instance_forwards(forwards: Iterable[tuple[nn.Module, Callable]]) -> Iterator[None]:
    """While open, each module of `forwards` ((module, forward) pairs) runs its given forward: set
    on the instance, where `nn.Module.__call__` finds it before the class's. On exit each module's
    instance forward is what it was before (none, or the one it had), so contexts nest."""
    pairs = list(forwards)
    before = [m.__dict__.get("forward") for m, _ in pairs]
    try:
        for m, f in pairs:
            m.__dict__["forward"] = f
        yield
    finally:
        for (m, _), f in zip(reversed(pairs), reversed(before)):
            if f is None:
                m.__dict__.pop("forward", None)
            else:
                m.__dict__["forward"] = f
