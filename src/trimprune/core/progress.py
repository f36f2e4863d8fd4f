"""Progress reporting: bars that stay on a terminal, lines in a log (never per token), nothing
with `--quiet`; optionally one JSON line per pruned block (`--log-json FILE`).

Each stage a person waits for (the model load, the calibration data and its capture, each block,
each evaluation, the write of the outputs) prints a line with the time elapsed since the run
began; in a log (stderr not a terminal) every line starts with a timestamp.

Everything that reports progress takes `progress`: a `Progress`, or True (automatic: bars when
stderr is a terminal, else lines) / False (nothing).
"""

from __future__ import annotations

import contextlib
import json
import sys
import time
from collections.abc import Iterator
from pathlib import Path


class _Silent:
    """A stand-in for a tqdm bar that shows nothing."""

    def __init__(self, iterable=None):
        self._it = iterable

    def __iter__(self):
        return iter(self._it)

    def update(self, n: int = 1) -> None:
        pass

    def close(self) -> None:
        pass


class Progress:
    MODES = ("auto", "bar", "lines", "off")

    def __init__(self, mode: str = "auto", log_json: str | Path | None = None, stream=None):
        if mode not in self.MODES:
            raise ValueError(f"progress mode {mode!r}: use one of {', '.join(self.MODES)}")
        self.stream = stream if stream is not None else sys.stderr
        if mode == "auto":
            mode = "bar" if getattr(self.stream, "isatty", lambda: False)() else "lines"
        self.mode = mode
        self.log_json = Path(log_json) if log_json else None
        self.t0 = time.perf_counter()  # the run's start: every line's elapsed time counts from it

    @classmethod
    def of(cls, progress) -> Progress:
        if isinstance(progress, Progress):
            return progress
        return cls("auto" if progress else "off")

    def bar(self, iterable=None, *, total: int | None = None, desc: str = "", unit: str = "it"):
        """A tqdm bar on a terminal; otherwise the iterable (or a silent stand-in with
        update/close)."""
        if self.mode != "bar":
            return _Silent(iterable)
        from tqdm.auto import tqdm

        return tqdm(iterable, total=total, desc=desc, unit=unit, leave=True, file=self.stream)

    def blocks(self, total: int, desc: str) -> BlockProgress:
        return BlockProgress(self, total, desc)

    def message(self, text: str) -> None:
        """One line of news (e.g. a resumed run), unless progress is off."""
        if self.mode != "off":
            print(text, file=self.stream, flush=True)

    def prefix(self) -> str:
        """The timestamp that starts a line in a log ("" on a terminal)."""
        return time.strftime("%Y-%m-%d %H:%M:%S ") if self.mode == "lines" else ""

    def line(self, text: str) -> None:
        """One progress line with the time elapsed since the run began (in a log, after a
        timestamp), unless progress is off."""
        if self.mode == "off":
            return
        out = f"{self.prefix()}{text} [{time.perf_counter() - self.t0:.1f} s elapsed]"
        if self.mode == "bar":
            from tqdm.auto import tqdm

            tqdm.write(out, file=self.stream)  # below the bars that stay, never through one
            self.stream.flush()
        else:
            print(out, file=self.stream, flush=True)

    @contextlib.contextmanager
    def stage(self, what: str) -> Iterator[Stage]:
        """A line when `what` begins ("what ...") and one when it ends ("what: RESULT in T s"; the
        result is what the body sets as `stage.result`, else "done"). A stage that raises prints no
        end line (the error says why)."""
        st = Stage()
        self.line(f"{what} ...")
        t = time.perf_counter()
        yield st
        self.line(f"{what}: {st.result or 'done'} in {time.perf_counter() - t:.1f} s")


class Stage:
    """What a `Progress.stage` body reports at its end (`result`)."""

    result: str = ""


class BlockProgress:
    """Progress over the decoder blocks: `step(i)` when block i is done; `record(...)` when its
    records are known (the JSON line)."""

    def __init__(self, progress: Progress, total: int, desc: str):
        self.p, self.total, self.desc = progress, total, desc
        self.t0 = self.last = time.perf_counter()
        self.seconds: dict[int, float] = {}
        self.first = 0  # blocks before it were done by an earlier (interrupted) run
        self._waiting: dict[int, dict] = {}  # JSON lines of blocks whose time is not yet taken
        self._bar = (
            progress.bar(total=total, desc=desc, unit="block") if progress.mode == "bar" else None
        )
        self._log = open(progress.log_json, "a") if progress.log_json else None

    def resume_at(self, first: int) -> None:
        """Blocks 0..first-1 were restored from the resume state: count them done, time only the
        rest."""
        self.first = first
        if self._bar is not None and first:
            self._bar.update(first)

    def step(self, index: int) -> None:
        now = time.perf_counter()
        self.seconds[index] = now - self.last
        self.last = now
        if index in self._waiting:
            self._write(index, self._waiting.pop(index))
        if self._bar is not None:
            self._bar.update(1)
        elif self.p.mode == "lines":
            done, elapsed = index + 1, now - self.t0
            eta = elapsed / max(1, done - self.first) * (self.total - done)
            print(
                f"{self.p.prefix()}{self.desc}: block {done}/{self.total} done in "
                f"{self.seconds[index]:.1f} s, {elapsed:.1f} s pruning, ETA {eta:.1f} s "
                f"[{now - self.p.t0:.1f} s elapsed]",
                file=self.p.stream,
                flush=True,
            )

    def record(self, index: int, linears: list, block_safeguard=None) -> None:
        """One JSON line for block `index` (its `LinearRecord`s and `BlockSafeguardRecord`) with
        --log-json. The records of a block may be known before the block is done (`step`): its
        line then waits for the block's time."""
        if self._log is None:
            return
        from trimprune.core.records import Kept

        zeros = sum(r.zeros for r in linears)
        numel = sum(r.numel for r in linears)
        trim = [r.trim for r in linears if r.trim is not None]
        line = {
            "block": index,
            "sparsity": zeros / numel if numel else 0.0,
            "trim_linears": len(trim),
            "trim_kept": sum(t.kept == Kept.TRIM for t in trim),
            "block_safeguard": (
                block_safeguard.kept.value if block_safeguard is not None else None
            ),
        }
        if index in self.seconds:
            self._write(index, line)
        else:
            self._waiting[index] = line

    def _write(self, index: int, line: dict) -> None:
        assert self._log is not None
        line = {"block": line["block"], "seconds": round(self.seconds[index], 6)} | line
        self._log.write(json.dumps(line) + "\n")
        self._log.flush()

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
        if self._log is not None:
            for index in sorted(self._waiting):  # a walk cut short: time up to now
                self.seconds.setdefault(index, time.perf_counter() - self.last)
                self._write(index, self._waiting.pop(index))
            self._log.close()
