"""Fast paths, each registered against the pure function it accelerates.

A `FastPath` has the pure function's signature and gives the same result (up to floating-point
summation order, within `compare`'s tolerance); `applies(*args, **kwargs)` says whether it runs for
those arguments (keywords may be missing when asked ahead of time, e.g. `accelerates(pure, G=...)`).
`examples(device)` yields arguments on which `check` compares it with the pure function: the test
suite (`tests/test_fast_paths.py`, in Triton's CPU interpreter) and `benchmarks/gpu_check.py` (on a
GPU) run `check` for every registered fast path.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable
from dataclasses import dataclass

import torch

from trimprune.core.linalg import mm_f32

log = logging.getLogger("trimprune")


@dataclass(frozen=True)
class FastPath:
    name: str
    pure: Callable
    impl: Callable
    applies: Callable[..., bool]
    examples: Callable[[torch.device], Iterable[tuple[tuple, dict]]]
    compare: Callable[[object, object], tuple[bool, str]]
    backend: str  # "triton" (runs in Triton's CPU interpreter too) or "cuda"


REGISTRY: dict[Callable, list[FastPath]] = {}


def register(fp: FastPath) -> FastPath:
    REGISTRY.setdefault(fp.pure, []).append(fp)
    return fp


def find(pure: Callable, args: tuple, kwargs: dict) -> FastPath | None:
    for fp in REGISTRY.get(pure, ()):
        if fp.applies(*args, **kwargs):
            return fp
    return None


def check(fp: FastPath, device: torch.device) -> list[tuple[bool, str]]:
    """(agrees, detail) of the fast path against its pure function on every example."""
    out = []
    for args, kwargs in fp.examples(device):
        want = fp.pure(*args, **kwargs)
        got = fp.impl(*args, **kwargs)
        out.append(fp.compare(got, want))
    return out


def rel_close(rtol: float):
    def compare(got, want):
        got, want = got.double(), want.double()
        rel = float((got - want).abs().max() / want.abs().max().clamp_min(1e-300))
        return rel <= rtol, f"max rel. diff {rel:.1e} (<= {rtol:g})"

    return compare


# ------------------------------------------------------------------------------ float32 products
_OUT_DTYPE_OK: dict = {}


def _key(device: torch.device) -> tuple:
    device = torch.device(device)
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    return device.type, device.index


def probe_out_dtype(device: torch.device) -> bool:
    """Whether torch.mm(a, b, out_dtype=torch.float32) works for half inputs on `device` (probed
    once per device, never inside a graph capture: the executor probes its device when it is
    made)."""
    device = torch.device(device)
    key = _key(device)
    if key not in _OUT_DTYPE_OK:
        if device.type == "cuda" and torch.cuda.is_current_stream_capturing():
            return False
        try:
            a = torch.ones(8, 8, dtype=torch.float16, device=device)
            _OUT_DTYPE_OK[key] = torch.mm(a, a, out_dtype=torch.float32).dtype == torch.float32
        except (TypeError, RuntimeError, NotImplementedError):
            _OUT_DTYPE_OK[key] = False
    return _OUT_DTYPE_OK[key]


def _mm_out_f32(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    op = torch.bmm if a.dim() == 3 else torch.mm
    return op(a, b, out_dtype=torch.float32)


def _mm_applies(a=None, b=None) -> bool:
    return (
        a is not None
        and a.is_cuda
        and a.dtype in (torch.float16, torch.bfloat16)
        and a.dtype == b.dtype
        and probe_out_dtype(a.device)
    )


def _mm_examples(device):
    g = torch.Generator().manual_seed(0)
    for dt in (torch.float16, torch.bfloat16):
        a = torch.randn(300, 96, generator=g).to(device, dt)
        yield (a.t(), a), {}
        yield (
            (
                torch.randn(3, 40, 64, generator=g).to(device, dt),
                torch.randn(3, 64, 64, generator=g).to(device, dt),
            ),
            {},
        )


register(
    FastPath(
        "float32 product of half inputs on tensor cores (torch.mm out_dtype)",
        mm_f32,
        _mm_out_f32,
        _mm_applies,
        _mm_examples,
        rel_close(1e-5),
        "cuda",
    )
)
