"""`--allocation lua`: the thresholds of `algo.allocation.lua` trained by gradient on the whole
model.

1. One dense walk over the captured calibration activations gives every prunable linear's
   importance under the run's scorer (Wanda |W| ||x||, magnitude |W|, SparseGPT w^2 / [U]_jj^2),
   turned into unit row ranks (`unit_ranks`, kept in float16: 2 bytes per weight).
2. The model is frozen and cast to float32 (back afterwards, exactly). Each of `--lua-steps` steps
   draws `--lua-batch` calibration sequences (seeded by `--seed`), takes the dense log-probabilities
   with the unmasked weights (no gradient), then runs the model with every prunable weight
   replaced by W * soft_mask(r, t_l, tau) (`masked_logits`: inside each linear's forward under
   activation checkpointing, so that no masked copy of the weights outlives its linear; the
   parameters are never written) and backpropagates KL(dense || masked) to the thresholds t
   only. Adam steps t by `--lua-lr`; each step ends with the projection onto the budget.

Memory besides the float32 model: the ranks (2 bytes per prunable weight), the masked weight of
one linear at a time, the logits of one batch, and the activations of one block of one batch
(each decoder block runs under activation checkpointing, `engine.influence.checkpointed_blocks`);
`--offload` is refused (`PruneConfig`), as are experts stored as fused 3-D tensors.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from contextlib import nullcontext

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from trimprune.algo.allocation import linear_sizes
from trimprune.algo.allocation.base import Allocation
from trimprune.algo.allocation.lua import (
    kl_per_token,
    lua_allocation,
    project,
    soft_mask,
    unit_ranks,
)
from trimprune.algo.scorers import make_scorer
from trimprune.algo.stats import StatsNeeds
from trimprune.config import PruneConfig
from trimprune.core.forwards import instance_forwards
from trimprune.core.model import weight_2d
from trimprune.core.moe import calibrate_all
from trimprune.core.progress import Progress
from trimprune.core.runtime import EAGER, Executor
from trimprune.engine.influence import checkpointed_blocks, float32_frozen, linear_weights
from trimprune.engine.walk import BlockRun, Streams, StreamUpdate, moe_calibration, walk
from trimprune.errors import TrimpruneError


@torch.no_grad()
def importance_ranks(
    config: PruneConfig, adapter, captured, ex: Executor = EAGER, progress=False
) -> dict[str, torch.Tensor]:
    """full linear name -> unit row ranks of its weights under the run's scorer (float16, on the
    compute device), from one dense walk."""
    scorer = make_scorer(config.scorer, ex)
    needs = StatsNeeds(sqnorm=True, gram=scorer.needs_gram)
    out: dict[str, torch.Tensor] = {}

    def visit(run: BlockRun) -> StreamUpdate:
        hooks = run.hooks(needs, ex)
        with hooks, calibrate_all(run.moe.mode == "all"):
            dense = run.forward(run.streams.main, on_batch_end=hooks.next_batch)
        hooks.reduce()
        run.check_statistics(hooks, ex)
        for n, mod in run.linears.items():
            w = weight_2d(mod).float()
            imp = scorer.importance(w, hooks.stats_for(n))
            out[adapter.full_name(run.index, n)] = unit_ranks(imp).half()
        return StreamUpdate(main=dense)

    walk(
        adapter,
        captured,
        Streams(captured.hidden),
        visit,
        offload=config.run.offload,
        progress=progress,
        desc="Lua importance",
        ex=ex,
        moe=moe_calibration(config),
    )
    return out


def _masked_linear(x, weight, bias, ranks, t, tau: float):
    return F.linear(x, weight * soft_mask(ranks, t, tau).to(weight.dtype), bias)


def _checkpointed(modules: dict[str, nn.Linear], ranks, t: torch.Tensor, tau: float):
    """While open, each linear of `modules` (full name -> module, in the order of the thresholds
    `t`) computes F.linear(x, W * soft_mask(r, t_l, tau), b) under non-reentrant activation
    checkpointing: its masked weight exists only inside its forward and is made again in the
    backward, so no masked copy of the weights is held across the model."""

    def masked(j: int, k: str, mod: nn.Linear) -> Callable:
        w, b, r = mod.weight, mod.bias, ranks[k]

        def forward(x):
            return checkpoint(_masked_linear, x, w, b, r, t[j], tau, use_reentrant=False)

        return forward

    return instance_forwards((mod, masked(j, k, mod)) for j, (k, mod) in enumerate(modules.items()))


@contextlib.contextmanager
def masked_forward(
    model: nn.Module,
    params: dict[str, nn.Parameter],
    ranks: dict[str, torch.Tensor],
    t: torch.Tensor,
    tau: float,
    checkpointed: bool = True,
    adapter=None,
) -> Iterator[Callable[[torch.Tensor], torch.Tensor]]:
    """While open: a function from token ids x to the logits of `model` with every weight of
    `params` (full linear name -> parameter, in the order of the thresholds `t`) replaced by
    W * soft_mask(r, t_l, tau). The weights of `nn.Linear` modules are masked inside their forward
    (`_checkpointed`; with `checkpointed=False`, as the others); the others are passed to
    `torch.func.functional_call`, which holds their masked copies until the backward. The
    parameters are never written. With `adapter`, and every masked weight inside its linear, the
    decoder blocks run under activation checkpointing too (`checkpointed_blocks`): run the
    backward inside the context, where the blocks it makes again are masked the same way."""
    owner = {id(m.weight): m for m in model.modules() if type(m) is nn.Linear}
    inside = {k: owner[id(p)] for k, p in params.items() if checkpointed and id(p) in owner}
    order = {k: j for j, k in enumerate(params)}
    path = {id(p): k for k, p in model.named_parameters(remove_duplicate=False)}
    masked = {
        path[id(p)]: p * soft_mask(ranks[k], t[order[k]], tau).to(p.dtype)
        for k, p in params.items()
        if k not in inside
    }
    t_inside = t[[order[k] for k in inside]] if inside else t
    blocks = checkpointed_blocks(adapter) if adapter is not None and not masked else nullcontext()

    def logits(x: torch.Tensor) -> torch.Tensor:
        kwargs = {"input_ids": x, "use_cache": False}
        return torch.func.functional_call(model, masked, args=(), kwargs=kwargs).logits

    with blocks, _checkpointed(inside, ranks, t_inside, tau):
        yield logits


def masked_logits(
    model: nn.Module,
    params: dict[str, nn.Parameter],
    ranks: dict[str, torch.Tensor],
    t: torch.Tensor,
    tau: float,
    x: torch.Tensor,
    checkpointed: bool = True,
) -> torch.Tensor:
    """The logits of `masked_forward` on token ids `x` (without block checkpointing: its backward
    may run after the call)."""
    with masked_forward(model, params, ranks, t, tau, checkpointed) as forward:
        return forward(x)


def train_thresholds(
    config: PruneConfig,
    model: nn.Module,
    adapter,
    ranks: dict[str, torch.Tensor],
    ids: torch.Tensor,
    device,
    progress=False,
) -> tuple[dict[str, float], dict]:
    """The learned thresholds (full linear name -> t_l, projected onto the budget) and the details
    (settings, KL at the first and last step, the loss per step)."""
    a, s = config.allocation, config.sparsity
    assert s is not None
    params = linear_weights(adapter, "lua")
    names = list(params)
    numels, _ = linear_sizes(adapter)
    w = torch.tensor([numels[k] for k in names], dtype=torch.float64)
    dev = torch.device(device)
    t = torch.full((len(names),), float(s), dtype=torch.float32, device=dev)
    t = project(t, w, s).requires_grad_(True)
    opt = torch.optim.Adam([t], lr=a.lua_lr)
    gen = torch.Generator().manual_seed(config.calib.seed)
    n = int(ids.shape[0])
    batch = min(a.lua_batch, n)
    losses: list[float] = []
    shown = Progress.of(progress)
    bar = shown.bar(total=a.lua_steps, desc="Lua thresholds")
    every = max(1, a.lua_steps // 10)  # a line every tenth of the steps
    with float32_frozen(model):
        for step in range(a.lua_steps):
            x = ids[torch.randperm(n, generator=gen)[:batch]].to(dev)
            with torch.no_grad():
                dense = torch.log_softmax(model(input_ids=x, use_cache=False).logits.float(), -1)
            # the backward inside: it makes each block's activations again, masked alike
            with masked_forward(model, params, ranks, t, a.lua_temperature, True, adapter) as f:
                logits = f(x)
                loss = kl_per_token(dense, logits)
                if not torch.isfinite(loss):
                    raise TrimpruneError(
                        f"{{allocation}} lua: the KL at step {step} is {float(loss)}: use a "
                        "larger {lua_temperature} or another {allocation}"
                    )
                opt.zero_grad(set_to_none=True)
                loss.backward()
            opt.step()
            with torch.no_grad():
                t.copy_(project(t, w, s))
            losses.append(float(loss.detach()))
            bar.update(1)
            if (step + 1) % every == 0 or step + 1 == a.lua_steps:
                shown.line(f"Lua thresholds: step {step + 1}/{a.lua_steps}, KL {losses[-1]:.4g}")
            del logits, dense
    bar.close()
    details = {
        "steps": a.lua_steps,
        "lr": a.lua_lr,
        "temperature": a.lua_temperature,
        "batch": batch,
        "scorer": config.scorer.name,
        "kl_first": losses[0] if losses else None,
        "kl_last": losses[-1] if losses else None,
        "kl": losses,
    }
    return {k: float(v) for k, v in zip(names, t.detach().cpu())}, details


def lua_allocation_of(
    config: PruneConfig,
    model: nn.Module,
    adapter,
    captured,
    ids: torch.Tensor,
    ex: Executor = EAGER,
    progress=False,
) -> Allocation:
    """`--allocation lua`: `importance_ranks`, `train_thresholds`, then the exact allocation."""
    s = config.sparsity
    assert s is not None
    numels, block_of = linear_sizes(adapter)
    ranks = importance_ranks(config, adapter, captured, ex, progress)
    thresholds, details = train_thresholds(
        config, model, adapter, ranks, ids, captured.exec_device, progress
    )
    del ranks
    return lua_allocation(thresholds, s, numels, block_of, details)
