"""The seam between the algorithms and how their tensor work is executed.

The algorithms are plain tensor code; each receives an `Executor`. This base class runs everything
eagerly, as written: it is the default and the reference that every fast path is tested against.
`trimprune.exec` subclasses it for GPUs (CUDA-graph replay, side streams, registered fast paths,
deferred host copies, profiling phases); nothing here knows of any of those.

What an algorithm asks of its executor:
- `run(key, fn, inputs, size)`: `fn(**inputs)`, a computation of static shapes named by `key`
  (a GPU executor may replay it as a captured graph);
- `launch(...)`: the same, started now and collected later with `Launched.result()` (a GPU executor
  may run it on a side stream, overlapping other work); `captures(device, size)` says whether a
  computation of `size` elements would be replayed (then batching more work into it is cheap);
- `call(pure_fn, *args)`: a pure function, or a fast path registered for it that gives the same
  result; `accelerates(pure_fn, *args)` says whether one would run;
- `to_device(values, dtype, device)`: a few Python numbers as a tensor on `device`;
- `pinned(tensor)`: a host tensor that is copied to the compute device often (offloaded
  activations);
- `defer(tensors, then)`: `then(host copies of tensors)` as a `Deferred` value, where `tensors` is
  a tensor tree (a dataclass, dict, list or tuple of tensors, nested; other values are kept as they
  are, see `map_tensors`): a GPU executor copies in the background and the caller reads it once the
  copy is done;
- `resident(blocks, index, device)`: a context holding block `index` on `device` while it is
  processed (offload), its weights back in host memory afterwards (a GPU executor copies the next
  block ahead);
- `batches(stored, device)` / `store(tensor, device)`: the stored hidden-state batches, each on the
  compute device in turn, and a computed batch copied to where the streams are stored (a GPU
  executor copies host-stored batches ahead and back on side streams, overlapping the block's
  forward);
- `phase(name)`: a context naming a phase of the work (timings, profiles);
- `close()`: release what the executor holds (captured graphs), at the end of a prune.
"""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Callable
from typing import Any, Generic, TypeVar, cast

import torch

T = TypeVar("T")
R = TypeVar("R")


def map_tensors(tree: R, fn: Callable[[Any], Any], leaf: type = torch.Tensor) -> R:
    """`tree` with every value of type `leaf` (a tensor) replaced by `fn(value)`, in a fixed order
    (dataclass fields, dict items and sequence items as they come, depth first). A tree is made of
    dataclass instances, dicts, lists and tuples; any other value (None, numbers) is kept."""
    if isinstance(tree, leaf):
        return fn(tree)
    if dataclasses.is_dataclass(tree) and not isinstance(tree, type):
        fields = [f.name for f in dataclasses.fields(tree) if f.init]
        return cast(
            R,
            dataclasses.replace(
                tree, **{n: map_tensors(getattr(tree, n), fn, leaf) for n in fields}
            ),
        )
    if isinstance(tree, dict):
        return cast(R, {k: map_tensors(v, fn, leaf) for k, v in tree.items()})
    if isinstance(tree, (list, tuple)):
        return cast(R, type(tree)(map_tensors(v, fn, leaf) for v in tree))
    return tree


def tensor_leaves(tree) -> list[torch.Tensor]:
    """The tensors of a tensor tree, in `map_tensors`'s order."""
    out: list[torch.Tensor] = []
    map_tensors(tree, out.append)
    return out


class Launched(Generic[T]):
    """A computation started by `Executor.launch`. `result()` returns its outputs once the current
    stream may use them (eagerly: at once)."""

    def __init__(self, value: T):
        self._value = value

    def result(self) -> T:
        return self._value


class Deferred(Generic[T]):
    """A value computed from tensors copied to the host. `ready()`: whether `result()` would return
    without waiting for the device; `result()`: the value (computed once)."""

    def __init__(self, value: T):
        self._value = value

    def ready(self) -> bool:
        return True

    def result(self) -> T:
        return self._value


class Executor:
    """Eager execution on the current stream."""

    def run(self, key, fn: Callable[..., Any], inputs: dict[str, torch.Tensor], size: int):
        return fn(**inputs)

    def launch(
        self, key, fn: Callable[..., Any], inputs: dict[str, torch.Tensor], size: int
    ) -> Launched:
        return Launched(fn(**inputs))

    def captures(self, device: torch.device, size: int) -> bool:
        return False

    def call(self, pure_fn: Callable[..., T], *args, **kwargs) -> T:
        return pure_fn(*args, **kwargs)

    def accelerates(self, pure_fn: Callable, *args, **kwargs) -> bool:
        return False

    def to_device(self, values, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
        return torch.tensor(values, dtype=dtype).to(device)

    def pinned(self, tensor: torch.Tensor) -> torch.Tensor:
        return tensor

    def defer(self, tensors: R, then: Callable[[R], T]) -> Deferred[T]:
        return Deferred(then(map_tensors(tensors, lambda v: v.detach().cpu())))

    @contextlib.contextmanager
    def resident(self, blocks, index: int, device: torch.device):
        block = blocks[index]
        block.to(device)
        try:
            yield block
        finally:
            block.to("cpu")

    def batches(self, stored: list[torch.Tensor], device: torch.device):
        for h in stored:
            yield h.to(device, non_blocking=True)

    def store(self, tensor: torch.Tensor, device: torch.device) -> torch.Tensor:
        return tensor.to(device, non_blocking=True)

    @contextlib.contextmanager
    def phase(self, name: str):
        yield

    def close(self) -> None:
        pass


EAGER = Executor()
