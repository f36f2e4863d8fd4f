"""CUDA-graph replay of small, static-shape computations (TRIM sweeps, SparseGPT column blocks).

On small matrices these computations are a few hundred tiny kernels each, so the time goes into
kernel launches; captured once per shape and replayed, they cost one launch. Large matrices are
compute-bound and run eagerly. Set TRIMPRUNE_CUDA_GRAPHS=0 to disable.
"""
from __future__ import annotations

import os
from typing import Callable

import torch

MAX_ELEMENTS = 64 * 2**20   # graph only computations whose main tensors are below this size


class GraphCache:
    def __init__(self):
        self._cache: dict = {}
        self._seen: set = set()
        self._streams: dict = {}
        self._turn = 0

    @staticmethod
    def usable(device: torch.device, elements: int) -> bool:
        return (device.type == "cuda" and elements <= MAX_ELEMENTS
                and os.environ.get("TRIMPRUNE_CUDA_GRAPHS", "1") != "0")

    def _entry(self, key, fn: Callable, inputs: dict[str, torch.Tensor]):
        """The captured (graph, static inputs, static outputs) of `key`, or None the first time a key is
        seen: that call runs eagerly and is the warm-up (cuBLAS handles, allocator, kernel compilation);
        the second captures."""
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

    def run(self, key, fn: Callable, inputs: dict[str, torch.Tensor]):
        """fn(**inputs) -> tuple of tensors. Returns the graph's static outputs: consume or clone
        them before the next `run` with the same key."""
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
        """As `run`, but replayed on one of a few side streams (round robin) after the work queued so
        far, so independent graphs overlap on the device; the outputs are copied there. Returns
        (outputs, event): the consuming stream must wait for the event, and `inputs` must stay
        referenced until then."""
        entry = self._entry(key, fn, inputs)
        main = torch.cuda.current_stream()
        if main.device not in self._streams:
            self._streams[main.device] = [torch.cuda.Stream(main.device) for _ in range(4)]
        streams = self._streams[main.device]
        side = streams[self._turn % len(streams)]
        self._turn += 1
        side.wait_stream(main)
        with torch.cuda.stream(side):
            res = fn(**inputs) if entry is None else tuple(o.clone() for o in self._replay(entry, inputs))
            done = torch.cuda.Event()
            done.record(side)
        return res, done

    def clear(self) -> None:
        self._cache.clear()
        self._seen.clear()


GRAPHS = GraphCache()


_OUT_DTYPE_OK: dict = {}


def mm_out_dtype_ok(device: torch.device) -> bool:
    """Whether torch.mm(a, b, out_dtype=torch.float32) works for half inputs on `device` (probed once,
    never inside a graph capture)."""
    key = (device.type, device.index)
    if key not in _OUT_DTYPE_OK:
        if device.type != "cuda" or torch.cuda.is_current_stream_capturing():
            return False
        try:
            a = torch.ones(8, 8, dtype=torch.float16, device=device)
            _OUT_DTYPE_OK[key] = torch.mm(a, a, out_dtype=torch.float32).dtype == torch.float32
        except (TypeError, RuntimeError):
            _OUT_DTYPE_OK[key] = False
    return _OUT_DTYPE_OK[key]


def host_to_device(values, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """A small list of Python numbers as a tensor on `device`. On a GPU through pinned memory, so the
    copy does not wait for the work already queued (a copy from pageable memory synchronises)."""
    t = torch.tensor(values, dtype=dtype)
    if device.type != "cuda":
        return t.to(device)
    return t.pin_memory().to(device, non_blocking=True)
