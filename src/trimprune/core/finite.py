"""NaN / Inf never passes: the checks of weights, activations and statistics.

Each tensor is reduced once, on its own device, to its (min, max) (`extrema`: one pass, no
temporaries; a NaN anywhere makes both NaN, an Inf shows as +-inf), and all the extrema of one check
are read back together: one host read (device sync) per check. A failed check raises
`NonFiniteError`, a `TrimpruneError` whose one line names the tensor and what to do.

Where they run (nothing here changes a computation):
- `check_walk_step`, from the walk (`engine.walk.walk`), as each block is loaded: the block's
  parameters and the hidden states entering it (block 0: the captured inputs; block i: block i-1's
  outputs), in one read; once more after the last block, for its outputs;
- `check_statistics`, after each statistics forward (`BlockRun.statistics`, OWL): the Wanda squared
  norms and Gram matrices of every group of linears;
- `blame`, only once a result of the model came out non-finite (a perplexity in `io.evaluate`, the
  first logits of each batch sampled in `calib.data`): which parameters are to blame, if any.
Besides: AlphaPruning refuses a matrix whose sums (its fingerprint) are not finite, SparseGPT a Gram
matrix that is not finite.
"""

from __future__ import annotations

import math
from collections.abc import Hashable
from typing import TypeVar

import torch
from torch import nn

from trimprune.errors import NonFiniteError

K = TypeVar("K", bound=Hashable)

WEIGHTS_FIX = "the checkpoint holds NaN/Inf weights: check it, or download or convert it again"


def extrema(t: torch.Tensor) -> torch.Tensor:
    """(min, max) of `t` as a float32 (2,) tensor on its device."""
    if t.numel() == 0:
        return torch.zeros(2, device=t.device)
    lo, hi = torch.aminmax(t.detach())
    return torch.stack([lo, hi]).float()


def nonfinite(ext: dict[K, torch.Tensor]) -> dict[K, str]:
    """key -> "NaN" or "Inf" for the entries of `ext` (their `extrema`) that are not finite, in the
    given order. One host read per device."""
    by_device: dict[torch.device, list] = {}
    for k, e in ext.items():
        by_device.setdefault(e.device, []).append(k)
    bad = {}
    for keys in by_device.values():
        for k, (lo, hi) in zip(keys, torch.stack([ext[k] for k in keys]).tolist()):
            if math.isnan(lo) or math.isnan(hi):
                bad[k] = "NaN"
            elif math.isinf(lo) or math.isinf(hi):
                bad[k] = "Inf"
    return {k: bad[k] for k in ext if k in bad}


def describe(bad: dict[str, str], limit: int = 3) -> str:
    """'a holds NaN, b holds Inf and 2 more'."""
    items = [f"{k} holds {v}" for k, v in list(bad.items())[:limit]]
    more = f" and {len(bad) - limit} more" if len(bad) > limit else ""
    return ", ".join(items) + more


def check_finite(tensors: dict[str, torch.Tensor], what: str, fix: str = WEIGHTS_FIX) -> None:
    """Raise `NonFiniteError` ('<what>: <name> holds NaN, ...: <fix>') if a tensor holds a NaN or an
    Inf. One reduction per tensor, one host read."""
    bad = nonfinite({k: extrema(t) for k, t in tensors.items()})
    if bad:
        raise NonFiniteError(f"{what}: {describe(bad)}: {fix}")


def overflow_fix(dtype: torch.dtype) -> str:
    """What to do when activations are not finite although the weights are."""
    if dtype == torch.float16:
        return "the activations overflow in float16: try --dtype bfloat16 or --dtype float32"
    if dtype == torch.bfloat16:
        return "the activations overflow in bfloat16: try --dtype float32, or check the checkpoint"
    return (
        f"the activations are not finite even in {str(dtype).replace('torch.', '')}: "
        "check the checkpoint"
    )


def nonfinite_parameters(model: nn.Module) -> dict[str, str]:
    """name -> "NaN" / "Inf" for every parameter of `model` that is not finite (one pass, one read
    per device): run once something came out non-finite, to say which weights are to blame."""
    return nonfinite(
        {n: extrema(p) for n, p in model.named_parameters() if p.device.type != "meta"}
    )  # --offload disk: blocks not loaded (checked as they are)


def blame(model: nn.Module, what: str) -> NonFiniteError:
    """The error for a result of `model` that is not finite (`what` says which): the non-finite
    weights, looked for now, or else the activations (an overflow) are to blame."""
    bad = nonfinite_parameters(model)
    if bad:
        return NonFiniteError(f"{what}: {describe(bad)}: {WEIGHTS_FIX}")
    return NonFiniteError(
        f"{what}: its weights are finite; {overflow_fix(next(model.parameters()).dtype)}"
    )


def check_walk_step(
    adapter,
    index: int,
    hidden: list[torch.Tensor],
    hidden_extrema: list[torch.Tensor] | None = None,
) -> None:
    """Before block `index` of `adapter` (a `ModelAdapter`) runs: its parameters and the hidden
    states entering it; `index` = the number of blocks: after the last block, its outputs.
    `hidden_extrema`: the extrema of `hidden` when already computed (on the device, before the copy
    to storage). One host read."""
    name = f"{adapter.blocks_name}.{index}"
    ext: dict[tuple[str, int | str], torch.Tensor] = {
        ("hidden", k): e
        for k, e in enumerate(
            hidden_extrema if hidden_extrema is not None else [extrema(h) for h in hidden]
        )
    }
    n_hidden = len(ext)
    params = dict(adapter.blocks[index].named_parameters()) if index < adapter.num_blocks else {}
    ext |= {("param", n): extrema(p) for n, p in params.items()}
    bad = nonfinite(ext)
    if not bad:
        return
    acts = [k[1] for k in bad if k[0] == "hidden"]
    if not acts:
        weights = {f"{name}.{k[1]}": v for k, v in bad.items()}
        raise NonFiniteError(
            f"non-finite weights in block {index} ({name}): {describe(weights)}: {WEIGHTS_FIX}"
        )
    kind = " and ".join(sorted({bad[("hidden", k)] for k in acts}))
    which = f"batch{'es' if len(acts) > 1 else ''} {', '.join(map(str, acts))} of {n_hidden}"
    if index > 0:
        prev = f"{adapter.blocks_name}.{index - 1}"
        raise NonFiniteError(
            f"the outputs of block {index - 1} ({prev}) hold {kind} ({which}): "
            f"{overflow_fix(hidden[0].dtype)}"
        )
    # block 0's inputs come from the embeddings: their weights, or an overflow, are to blame
    outside = {
        n: v
        for n, v in nonfinite_parameters(adapter.model).items()
        if not n.startswith(f"{adapter.blocks_name}.")
    }
    fix = f"{describe(outside)}: {WEIGHTS_FIX}" if outside else overflow_fix(hidden[0].dtype)
    raise NonFiniteError(
        f"the inputs of block 0 ({name}, from the embeddings) hold {kind} ({which}): {fix}"
    )


def check_weights(blocks, blocks_name: str) -> None:
    """Before any weight changes: the parameters of every block (`blocks`, the decoder stack named
    `blocks_name`) that is loaded (--offload disk: blocks are checked as the walk loads them). One
    reduction per tensor, one host read per device; no forward."""
    bad = nonfinite(
        {
            (i, n): extrema(p)
            for i, b in enumerate(blocks)
            for n, p in b.named_parameters()
            if p.device.type != "meta"
        }
    )
    if not bad:
        return
    index = next(iter(bad))[0]
    weights = {f"{blocks_name}.{index}.{n}": v for (i, n), v in bad.items() if i == index}
    raise NonFiniteError(
        f"before pruning, non-finite weights in block {index} ({blocks_name}.{index}): "
        f"{describe(weights)}: {WEIGHTS_FIX}"
    )


def check_dense_outputs(
    path: str, index: int, outputs: list[torch.Tensor], dtype: torch.dtype
) -> None:
    """A block's outputs (of `dtype`) in its first (dense, statistics) pass (`outputs`: their
    `extrema`), before
    any of its weights changes: activations that overflow the dtype (float16's range is 65504) stop
    the run at the first block where they appear, naming it and the dtype to use. It costs one
    reduction per batch and one host read: no extra forward."""
    bad = nonfinite(dict(enumerate(outputs)))
    if not bad:
        return
    kind = " and ".join(sorted(set(bad.values())))
    which = f"batch{'es' if len(bad) > 1 else ''} {', '.join(map(str, bad))} of {len(outputs)}"
    raise NonFiniteError(
        f"before pruning, the dense outputs of block {index} ({path}) hold {kind} ({which}): "
        f"{overflow_fix(dtype)}"
    )


def check_statistics(hooks, path: str, index: int, dtype: torch.dtype) -> None:
    """The input statistics of a block's linears (`hooks`: a `engine.hooks.BlockHooks` after its
    forward; `path`: the block, e.g. model.layers.3): Wanda squared norms and Gram matrices. One
    host read."""
    ext = {}
    for gid, names in enumerate(hooks.groups):
        st = hooks.stats[gid]
        for kind, t in (("Wanda squared norms", st.sqnorm), ("Gram matrix X^T X", st.gram)):
            if names and t is not None:
                ext[(gid, kind)] = extrema(t)
    bad = nonfinite(ext)
    if bad:
        (gid, kind), v = next(iter(bad.items()))
        names = ", ".join(f"{path}.{n}" for n in hooks.groups[gid])
        raise NonFiniteError(
            f"the input statistics ({kind}) of {names} hold {v}, in block {index} ({path}): "
            f"{overflow_fix(dtype)}"
        )
