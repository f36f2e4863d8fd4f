"""Named phases of a prune (`Executor.phase`), for timings, benchmarks and traces.

Modes:
- "time" (default): host time per phase (exclusive of nested phases); no effect on the device.
- "events": also a CUDA event at every phase boundary (no synchronisation): after the run, the
  device time between boundaries and how far the device lagged behind the host
  (`benchmarks/phases.py --mode events`).
- "sync": the device is synchronised at every boundary, so each phase's time includes its device
  work (slower; `benchmarks/phases.py --mode sync`).
- "trace": each phase is a `torch.profiler.record_function` range named `trimprune::<phase>`.
"""

from __future__ import annotations

import contextlib
import time
from collections import defaultdict
from dataclasses import dataclass, field

import torch

MODES = ("time", "events", "sync", "trace")


@dataclass
class Mark:
    """A phase boundary: the phase, "start" or "end", the host clock and (mode "events") a CUDA
    event."""

    phase: str
    edge: str
    host: float
    event: object = None


@dataclass
class Phases:
    mode: str = "time"
    totals: dict[str, float] = field(
        default_factory=lambda: defaultdict(float)
    )  # exclusive host seconds
    counts: dict[str, int] = field(default_factory=lambda: defaultdict(int))
    marks: list[Mark] = field(default_factory=list)
    _stack: list[float] = field(default_factory=list)

    def __post_init__(self):
        if self.mode not in MODES:
            raise ValueError(f"profiling mode {self.mode!r}: use one of {', '.join(MODES)}")
        if self.mode in ("events", "sync") and not torch.cuda.is_available():
            self.mode = "time"

    def _mark(self, name: str, edge: str) -> None:
        if self.mode == "sync":
            torch.cuda.synchronize()
        event = None
        if self.mode == "events":
            event = torch.cuda.Event(enable_timing=True)
            event.record()
        if self.mode in ("events", "sync"):
            self.marks.append(Mark(name, edge, time.perf_counter(), event))

    @contextlib.contextmanager
    def phase(self, name: str):
        self._mark(name, "start")
        t0 = time.perf_counter()
        self._stack.append(0.0)
        ctx = (
            torch.profiler.record_function(f"trimprune::{name}")
            if self.mode == "trace"
            else contextlib.nullcontext()
        )
        try:
            with ctx:
                yield
        finally:
            self._mark(name, "end")
            dt = time.perf_counter() - t0
            nested = self._stack.pop()
            self.totals[name] += dt - nested
            self.counts[name] += 1
            if self._stack:
                self._stack[-1] += dt
