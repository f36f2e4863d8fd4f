"""CUDA-graph replay of small, static-shape computations (TRIM searches, SparseGPT column blocks).

On small matrices these computations are a few hundred tiny kernels each, so the time goes into
kernel launches; captured once per key and replayed, they cost one launch. Large matrices are
compute-bound and run eagerly (`MAX_ELEMENTS`). Outputs may be tensors or nested tuples / lists /
dataclasses of tensors.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any, cast

import torch

MAX_ELEMENTS = 64 * 2**20  # graph only computations whose main tensors are below this size
SIDE_STREAMS = 4
# device -> the side streams, made once per process (the caching allocator keeps freed memory per
# stream: new streams for every prune would not reuse it)
_STREAMS: dict = {}


def side_streams(device: torch.device) -> list:
    if device not in _STREAMS:
        _STREAMS[device] = [torch.cuda.Stream(device) for _ in range(SIDE_STREAMS)]
    return _STREAMS[device]


def leaves(obj) -> list[torch.Tensor]:
    """The tensors of a (nested) output, in a fixed order."""
    if isinstance(obj, torch.Tensor):
        return [obj]
    if isinstance(obj, (tuple, list)):
        return [t for o in obj for t in leaves(o)]
    if dataclasses.is_dataclass(obj):
        return [t for f in dataclasses.fields(obj) for t in leaves(getattr(obj, f.name))]
    return []


def rebuild(template, tensors):
    """`template` with its tensors replaced, in `leaves` order, by those of the iterator
    `tensors`."""
    if isinstance(template, torch.Tensor):
        return next(tensors)
    if isinstance(template, (tuple, list)):
        return type(template)(rebuild(o, tensors) for o in template)
    if dataclasses.is_dataclass(template):
        return dataclasses.replace(
            cast(Any, template),
            **{
                f.name: rebuild(getattr(template, f.name), tensors)
                for f in dataclasses.fields(template)
            },
        )
    return template


class GraphCache:
    """Graphs captured per key, and the side streams `run_async` replays them on."""

    def __init__(self):
        self._cache: dict = {}
        self._seen: set = set()
        self._turn = 0

    def _entry(self, key, fn: Callable, inputs: dict[str, torch.Tensor]):
        """The captured (graph, static inputs, static outputs) of `key`, or None the first time a
        key is seen: that call runs eagerly and is the warm-up (cuBLAS handles, allocator, kernel
        compilation); the second captures."""
        entry = self._cache.get(key)
        if entry is None:
            if key not in self._seen:
                self._seen.add(key)
                return None
            static = {k: v.clone() for k, v in inputs.items()}
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                out = fn(**static)
            entry = (graph, static, out)
            self._cache[key] = entry
        return entry

    def clear(self) -> None:
        """Drop the captured graphs (their memory pools are freed with them)."""
        self._cache.clear()
        self._seen.clear()

    def run(self, key, fn: Callable, inputs: dict[str, torch.Tensor]):
        """fn(**inputs). Returns the graph's static outputs: consume or clone them before the next
        `run` with the same key."""
        entry = self._entry(key, fn, inputs)
        return fn(**inputs) if entry is None else self._replay(entry, inputs)

    @staticmethod
    def _replay(entry, inputs: dict[str, torch.Tensor]):
        graph, static, out = entry
        for k, v in inputs.items():
            static[k].copy_(v)
        graph.replay()
        return out

    def run_async(self, key, fn: Callable, inputs: dict[str, torch.Tensor]):
        """As `run`, but replayed on one of a few side streams (round robin) after the work queued
        so far, so independent graphs overlap on the device; the outputs are copied there. Returns
        (outputs, event): the consuming stream must wait for the event, and `inputs` must stay
        referenced until then."""
        entry = self._entry(key, fn, inputs)
        main = torch.cuda.current_stream()
        streams = side_streams(main.device)
        side = streams[self._turn % len(streams)]
        self._turn += 1
        side.wait_stream(main)
        with torch.cuda.stream(side):
            if entry is None:
                res = fn(**inputs)
            else:
                out = self._replay(entry, inputs)
                res = rebuild(out, iter([t.clone() for t in leaves(out)]))
            done = torch.cuda.Event()
            done.record(side)
        return res, done
