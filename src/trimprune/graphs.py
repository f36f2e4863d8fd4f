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

    @staticmethod
    def usable(device: torch.device, elements: int) -> bool:
        return (device.type == "cuda" and elements <= MAX_ELEMENTS
                and os.environ.get("TRIMPRUNE_CUDA_GRAPHS", "1") != "0")

    def run(self, key, fn: Callable, inputs: dict[str, torch.Tensor]):
        """fn(**inputs) -> tuple of tensors. Returns the graph's static outputs: consume or clone
        them before the next `run` with the same key."""
        entry = self._cache.get(key)
        if entry is None:
            static = {k: v.clone() for k, v in inputs.items()}
            side = torch.cuda.Stream()
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):
                for _ in range(2):                       # warm-up (cuBLAS handles, allocator)
                    fn(**static)
            torch.cuda.current_stream().wait_stream(side)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                out = fn(**static)
            entry = (graph, static, out)
            self._cache[key] = entry
        graph, static, out = entry
        for k, v in inputs.items():
            static[k].copy_(v)
        graph.replay()
        return out

    def clear(self) -> None:
        self._cache.clear()


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
