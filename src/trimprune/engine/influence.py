"""LayerIF's gradients (`algo.allocation.layerif`): per-example backward passes over the dense
model, in float32, reduced to per-group dot products at once.

The model's parameters are frozen except the weights of the prunable linears (the groups: one per
block, or one per linear with `--layerif-per-linear`); each pass runs one sequence at a time, its
loss the mean next-token NLL of that sequence (the model's own `labels` loss), and keeps no
per-example gradient: each linear's gradient is reduced as soon as the backward pass has made it,
and dropped. Held besides the model: the running validation gradient v, then (DataInf) u = sum_i
c_i g_i, one model-sized float32 copy of those weights at a time, one linear's gradient, and the
activations of one block (each decoder block runs under activation checkpointing).

Passes: the validation sequences (v = the mean of their gradients); the training sequences (v . g_i
and ||g_i||^2 per group: the identity-Hessian influence, and DataInf's damping and coefficients
c_i); with `datainf`, the training sequences twice more (u, then u . g_k). A model in another
floating dtype is cast to float32 for the passes and back afterwards (exact: every value of the
narrower dtype is a float32); its float32 copy and the gradients must fit the compute device, so
`--offload` is refused (`PruneConfig`).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from trimprune.algo.allocation import linear_sizes
from trimprune.algo.allocation.layerif import (
    datainf_coefficients,
    datainf_damping,
    datainf_influence,
    layer_score,
    tracin_influence,
)
from trimprune.core.forwards import instance_forwards
from trimprune.core.progress import Progress
from trimprune.errors import TrimpruneError


def linear_weights(adapter, method: str) -> dict[str, nn.Parameter]:
    """full linear name -> its weight parameter, in model order; `{allocation} METHOD` refused in
    one line where a weight is a view into a fused tensor (MoE experts)."""
    params = {}
    for i in range(adapter.num_blocks):
        for n, mod in adapter.linears(i).items():
            full = adapter.full_name(i, n)
            w = getattr(mod, "weight", None)
            if not isinstance(w, nn.Parameter):
                raise TrimpruneError(
                    f"{{allocation}} {method} needs each prunable linear's weight as a parameter; "
                    f"{full} is a view into a fused tensor (MoE experts): use another "
                    "{allocation}"
                )
            params[full] = w
    return params


def _weights(adapter, per_linear: bool) -> tuple[dict[str, nn.Parameter], dict[str, str]]:
    """(full linear name -> its weight parameter, full linear name -> its group)."""
    params = linear_weights(adapter, "layerif")
    _, block_of = linear_sizes(adapter)
    group = {k: k if per_linear else str(block_of[k]) for k in params}
    return params, group


def float32_frozen(model: nn.Module):
    """No parameter requires grad; floating parameters and buffers in float32; the model in eval
    mode; all restored on exit (`_float32_grads_of` with no parameter)."""
    return _float32_grads_of(model, {})


@contextlib.contextmanager
def _float32_grads_of(model: nn.Module, params: dict[str, nn.Parameter]) -> Iterator[None]:
    """Only `params` require grad; floating parameters and buffers in float32; the model in eval
    mode; all restored on exit."""
    all_params = list(model.parameters())
    flags = [p.requires_grad for p in all_params]
    tensors = all_params + list(model.buffers())
    dtypes = [t.dtype for t in tensors]
    training = model.training
    keep = {id(p) for p in params.values()}
    try:
        for p in all_params:
            p.requires_grad_(id(p) in keep)
        for t in tensors:
            if t.is_floating_point() and t.dtype != torch.float32:
                t.data = t.data.float()
        model.eval()
        yield
    finally:
        for t, dt in zip(tensors, dtypes):
            if t.dtype != dt:
                t.data = t.data.to(dt)
        for p, f in zip(all_params, flags):
            p.requires_grad_(f)
            p.grad = None
        model.train(training)


def checkpointed_blocks(adapter) -> contextlib.AbstractContextManager[None]:
    """While open, every decoder block runs under non-reentrant activation checkpointing: a
    backward pass keeps each block's input and makes the block's activations again when it
    reaches the block, so it holds one block's activations instead of the model's."""

    def checkpointed(inner: Callable) -> Callable:
        def forward(*args, **kwargs):
            return checkpoint(inner, *args, use_reentrant=False, **kwargs)

        return forward

    return instance_forwards((b, checkpointed(b.forward)) for b in adapter.blocks)


def _per_example(
    model: nn.Module,
    adapter,
    params: dict[str, nn.Parameter],
    ids: torch.Tensor,
    device: torch.device,
    each: Callable[[int, str, torch.Tensor], None],
    bar,
) -> None:
    """For every sequence j of `ids`: the gradient of its mean next-token NLL with respect to each
    weight k of `params` (float32), handed to `each(j, k, grad)` as soon as the backward pass has
    made it, and dropped: one linear's gradient is held at a time, and one block's activations
    (`checkpointed_blocks`)."""
    name_of = {id(p): k for k, p in params.items()}
    current = [0]

    def hand_over(p: torch.Tensor) -> None:
        assert p.grad is not None
        each(current[0], name_of[id(p)], p.grad.float())
        p.grad = None

    handles = [p.register_post_accumulate_grad_hook(hand_over) for p in params.values()]
    try:
        with checkpointed_blocks(adapter):
            for j in range(ids.shape[0]):
                current[0] = j
                x = ids[j : j + 1].to(device)
                with torch.enable_grad():
                    loss = model(input_ids=x, labels=x, use_cache=False).loss.float()
                    if not torch.isfinite(loss):
                        raise TrimpruneError(
                            f"{{allocation}} layerif: the loss of calibration sequence {j} is "
                            f"{float(loss)} (the dense model gives non-finite logits): use another "
                            "{allocation}"
                        )
                    loss.backward()
                bar.update(1)
    finally:
        for h in handles:
            h.remove()


def layerif_scores(
    model: nn.Module,
    adapter,
    train_ids: torch.Tensor,
    val_ids: torch.Tensor,
    device: torch.device,
    hessian: str = "datainf",
    damping: float = 0.1,
    per_linear: bool = False,
    progress=False,
    score: str = "positive",
) -> tuple[dict[str, float], dict]:
    """(full linear name -> its group's score S_l (`algo.allocation.layerif.layer_score`: the
    cumulative positive influence, or with `score` "signed" the sum of all influences), details:
    per group S_l, the damping of each group with `datainf`, the number of training / validation
    sequences)."""
    params, group = _weights(adapter, per_linear)
    groups = list(dict.fromkeys(group.values()))
    gi = {g: k for k, g in enumerate(groups)}
    col = {k: c for c, k in enumerate(params)}
    onehot = torch.zeros(len(params), len(groups), dtype=torch.float64)
    for k, c in col.items():
        onehot[c, gi[group[k]]] = 1.0
    dims = onehot.t() @ torch.tensor(
        [float(p.numel()) for p in params.values()], dtype=torch.float64
    )
    n, m = int(train_ids.shape[0]), int(val_ids.shape[0])
    passes = m + n * (3 if hessian == "datainf" else 1)
    bar = Progress.of(progress).bar(total=passes, desc=f"LayerIF ({hessian})")

    def per_group_dots(ids: torch.Tensor, other: dict[str, torch.Tensor], norms: bool):
        """g_j . other_k per sequence j and linear k, and with `norms` ||g_j||^2 too, summed into
        the groups (n x groups, float64 on the CPU; the norms None without `norms`)."""
        dot = torch.zeros(ids.shape[0], len(params), dtype=torch.float64, device=device)
        sq = torch.zeros_like(dot) if norms else None

        def reduce(j, k, g):
            dot[j, col[k]] = (g * other[k]).sum(dtype=torch.float64)
            if sq is not None:
                sq[j, col[k]] = (g * g).sum(dtype=torch.float64)

        _per_example(model, adapter, params, ids, device, reduce, bar)
        return dot.cpu() @ onehot, (sq.cpu() @ onehot if sq is not None else None)

    with _float32_grads_of(model, params):
        v = {k: torch.zeros_like(p, dtype=torch.float32) for k, p in params.items()}

        def add_val(j, k, g):
            v[k].add_(g, alpha=1.0 / m)

        _per_example(model, adapter, params, val_ids, device, add_val, bar)
        vd, sq = per_group_dots(train_ids, v, norms=True)
        assert sq is not None
        details: dict = {"hessian": hessian, "train_sequences": n, "validation_sequences": m}
        if hessian == "identity":
            infl = tracin_influence(vd)
        else:
            lam = [datainf_damping(sq[:, c], int(dims[c]), damping) for c in range(len(groups))]
            lam_t = torch.tensor(lam, dtype=torch.float64)
            coef = datainf_coefficients(vd, sq, lam_t)  # (n, groups), on the CPU
            del v
            u = {k: torch.zeros_like(p, dtype=torch.float32) for k, p in params.items()}

            def add_u(j, k, g):
                u[k].add_(g, alpha=float(coef[j, gi[group[k]]]))

            _per_example(model, adapter, params, train_ids, device, add_u, bar)
            ud, _ = per_group_dots(train_ids, u, norms=False)
            infl = torch.stack(
                [datainf_influence(vd[:, c], ud[:, c], lam[c]) for c in range(len(groups))], 1
            )
            details["damping"] = dict(zip(groups, lam))
            details["damping_factor"] = damping
    bar.close()
    s = {g: layer_score(infl[:, c], score) for c, g in enumerate(groups)}
    details["scores"] = s
    details["score_kind"] = score
    details["per_linear"] = per_linear
    return {k: s[group[k]] for k in params}, details
