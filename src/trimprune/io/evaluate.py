"""Evaluation: perplexity with the paper protocol, and the data-free `self` fidelity measure.

Perplexity (Wanda/SparseGPT protocol): the test text is tokenized once, cut into non-overlapping
windows of seqlen tokens (the remainder is dropped), and ppl = exp(total NLL / predicted tokens),
every window predicting its tokens 2..seqlen.

`self`: sequences sampled from the dense model (seeded, from BOS, temperature 1). Their mean
per-token NLL under the dense model estimates its entropy rate; under the pruned model it is the
cross-entropy; the difference estimates KL(dense || pruned) per token.
"""

from __future__ import annotations

import math
import time

import torch
import torch.nn.functional as F
from torch import nn

from trimprune.calib.data import (
    EVAL_JOIN,
    DataFile,
    check_source,
    eval_source,
    hub_name,
    probe_rows,
    sample_from_model,
)
from trimprune.core.finite import blame
from trimprune.core.model import ModelAdapter, model_device
from trimprune.core.progress import Progress
from trimprune.core.ranks import Ranks
from trimprune.core.runtime import EAGER
from trimprune.engine.capture import blocks_replaced, capture, non_block_modules_on
from trimprune.engine.walk import Streams, walk
from trimprune.errors import NonFiniteError, TrimpruneError
from trimprune.io.diskmodel import DiskBlocks, blocks_on_meta

SELF_EVAL_SEED_OFFSET = 1_000_003  # held-out self samples never share the calibration seed
MAX_NLL = math.log(torch.finfo(torch.float64).max)  # a mean NLL above this has no float perplexity


def _nll_from_logits(logits: torch.Tensor, ids: torch.Tensor) -> float:
    lg = logits[:, :-1, :].float()
    return float(
        F.cross_entropy(lg.reshape(-1, lg.shape[-1]), ids[:, 1:].reshape(-1), reduction="sum")
    )


class _Feeder(nn.Module):
    """Stands in for block 0 and returns precomputed final hidden states (offloaded evaluation)."""

    def __init__(self):
        super().__init__()
        self.value = None

    def forward(self, hidden_states=None, *args, **kwargs):
        return self.value


class _Identity(nn.Module):
    def forward(self, hidden_states=None, *args, **kwargs):
        return hidden_states if hidden_states is not None else kwargs["hidden_states"]


@torch.no_grad()
def nll_of_windows(
    model: nn.Module,
    windows: torch.Tensor,
    batch_size: int = 8,
    device=None,
    offload: bool = False,
    progress=False,
    desc: str = "eval",
    storage: DiskBlocks | None = None,
) -> tuple[float, int]:
    """Sum of NLL over windows (n, L) and the number of predicted tokens n * (L - 1). In a
    data-parallel run each rank evaluates its share of the windows and the sums are added over the
    ranks. `storage`: the `DiskBlocks` of a model loaded with offload="disk"
    (`LoadedModel.storage`; its blocks are read from there)."""
    ranks = Ranks.current()
    dev = torch.device(device) if device is not None else model_device(model)
    n_predicted = windows.shape[0] * (windows.shape[1] - 1)
    total = _nll_share(
        model,
        windows[ranks.share(windows.shape[0])],
        batch_size,
        dev,
        offload,
        progress if ranks.main else False,
        desc,
        storage,
    )
    if ranks.parallel:
        total = float(ranks.sum_(torch.tensor(total, dtype=torch.float64, device=dev)))
    return total, n_predicted


def _nll_share(
    model: nn.Module,
    windows: torch.Tensor,
    batch_size: int,
    dev: torch.device,
    offload: bool,
    progress,
    desc: str,
    storage: DiskBlocks | None = None,
) -> float:
    total = 0.0
    for ids, logits in logits_batches(
        model, list(windows.split(batch_size, 0)), dev, offload, progress, desc, storage=storage
    ):
        total += _nll_from_logits(logits, ids)
    return total


@torch.no_grad()
def logits_batches(
    model: nn.Module,
    batches: list[torch.Tensor],
    dev: torch.device,
    offload: bool = False,
    progress=False,
    desc: str = "eval",
    ex=None,
    storage: DiskBlocks | None = None,
    head: bool = True,
):
    """(ids on `dev`, logits) of every batch of token ids, in order. Offloaded: the blocks are
    walked one at a time on `dev` over all batches (hidden states in host memory), then the model's
    own tail runs per batch. `ex`: the executor of the walk (a prune's, to reuse its offload
    staging). `storage`: --offload disk, the blocks read from the checkpoint or the output
    (`LoadedModel.storage`). `head=False`: (ids, the hidden states entering the output head) in
    place of the logits, the forward stopped there (`head_input`; `head_logits` turns them into
    the logits, a slice at a time)."""
    out = _logits if head else head_input
    if not batches:
        return
    if storage is None and blocks_on_meta(model):
        raise TrimpruneError(
            "the model's blocks are on the meta device (a model loaded with offload='disk' keeps "
            "them in the checkpoint): evaluate it with storage=loaded.storage"
        )
    if not offload and storage is None:
        for ids in Progress.of(progress).bar(batches, desc=desc):
            ids = ids.to(dev)
            yield ids, out(model, ids)
        return
    adapter = ModelAdapter.from_model(model)
    own = None
    if ex is None:
        if storage is not None:
            from trimprune.exec import make_executor

            ex = own = make_executor(dev, storage=storage)
        else:
            ex = EAGER
    try:
        captured = capture(model, adapter, batches, dev, offload=True, ex=ex)
        hidden = walk(
            adapter,
            captured,
            Streams(captured.hidden),
            lambda run: None,
            offload=True,
            progress=progress,
            desc=desc,
            ex=ex,
        ).main
    finally:
        if own is not None:
            own.close()
    feeder = _Feeder()
    stand_ins = [feeder] + [_Identity() for _ in range(adapter.num_blocks - 1)]
    with blocks_replaced(adapter, stand_ins), non_block_modules_on(model, dev, True):
        for ids, h in zip(batches, hidden):
            feeder.value = h.to(dev)
            ids = ids.to(dev)
            yield ids, out(model, ids)


def _logits(model: nn.Module, ids: torch.Tensor) -> torch.Tensor:
    return model(input_ids=ids, use_cache=False).logits


class _AtHead(Exception):
    def __init__(self, hidden: torch.Tensor):
        self.hidden = hidden


def head_input(model: nn.Module, ids: torch.Tensor) -> torch.Tensor:
    """The hidden states entering `model`'s output head (`get_output_embeddings()`) on `ids`,
    (batch, seq, hidden): the forward stops there, so the logits (batch x seq x vocab) are never
    made whole."""

    def stop(module, args):
        raise _AtHead(args[0])

    hook = model.get_output_embeddings().register_forward_pre_hook(stop)
    try:
        model(input_ids=ids, use_cache=False)
    except _AtHead as e:
        return e.hidden
    finally:
        hook.remove()
    raise TrimpruneError(f"{type(model).__name__}'s forward did not reach its output head")


def head_logits(model: nn.Module, hidden: torch.Tensor) -> torch.Tensor:
    """The logits from hidden states entering the output head (`head_input`): the head, then the
    final logit soft-capping of the families that have one (Gemma-2/3: cap * tanh(logits / cap)).
    `head_is_exact` says whether this is bit for bit what the model's forward returns."""
    logits = model.get_output_embeddings()(hidden)
    cfg = model.config
    cap = getattr(getattr(cfg, "text_config", None) or cfg, "final_logit_softcapping", None)
    if cap:
        logits = torch.tanh(logits / cap) * cap
    return logits


@torch.no_grad()
def head_is_exact(
    model: nn.Module,
    ids: torch.Tensor,
    dev: torch.device,
    offload: bool = False,
    ex=None,
    storage: DiskBlocks | None = None,
) -> bool:
    """Whether `head_logits` of the head's input equals, bit for bit, the logits of `model`'s own
    forward on `ids` (one short sequence; run like `logits_batches`): false for a family that
    transforms its logits in a way `head_logits` does not know (callers then keep whole logits)."""
    head = model.get_output_embeddings()
    if head is None:
        return False
    seen: list[torch.Tensor] = []
    hook = head.register_forward_pre_hook(lambda m, args: seen.append(args[0]))
    exact = False
    try:  # compared while the generator holds an offloaded model's head on `dev`
        for _, logits in logits_batches(model, [ids], dev, offload, ex=ex, storage=storage):
            exact = len(seen) == 1 and torch.equal(head_logits(model, seen[0]), logits)
    finally:
        hook.remove()
    return exact


def text_windows(tokenizer, text: str, seqlen: int, max_windows: int | None = None) -> torch.Tensor:
    ids = tokenizer(text, return_tensors="pt", verbose=False).input_ids[0]
    n = ids.numel() // seqlen
    if max_windows is not None:
        n = min(n, max_windows)
    if n < 1:
        raise TrimpruneError(
            f"the evaluation text has {ids.numel()} tokens, fewer than --seqlen {seqlen}: "
            "use a smaller --seqlen"
        )
    return ids[: n * seqlen].view(n, seqlen)


EVAL_SPLITS = {"wikitext2": "test", "ptb": "test", "c4": "validation"}


def check_eval_sources(names: list[str], eval_data: dict[str, str] | None = None) -> None:
    """Before the model loads: every evaluation set's file (given with --eval-data NAME=PATH, or
    found under TRIMPRUNE_DATA) exists, can be read and its first rows parse; a set from the Hub
    needs a reachable Hub."""
    eval_data = eval_data or {}
    for name in names:
        if name == "self":
            continue
        flag = f"--eval-data {name}=PATH"
        if name in EVAL_SPLITS:
            check_source(name, EVAL_SPLITS[name], eval_data.get(name), None, flag)
        elif name in eval_data:
            probe_rows(eval_data[name], None, flag=f"--eval-data {name}")
        else:
            raise TrimpruneError(
                f"--eval {name} is not a known dataset: use wikitext2, c4, ptb or self, or give "
                f"--eval-data {name}=PATH"
            )


def prepare_eval_sets(
    names: list[str],
    tokenizer,
    seqlen: int,
    eval_data: dict[str, str] | None = None,
    limit: int | None = None,
    model=None,
    self_samples: int = 16,
    seed: int = 0,
    progress=False,
) -> dict[str, dict]:
    """Token windows for every evaluation set (done before pruning: `self` samples the dense
    model), each with its `source`, the `files` read (path, bytes, sha256) and the `protocol`
    (data set, split, window length, windows used and available, --eval-limit, the cap and how
    the rows were joined; for `self` the samples' seed)."""
    eval_data = eval_data or {}
    sets = {}
    shown = Progress.of(progress if Ranks.current().main else False)
    for name in names:
        what = "sampling" if name == "self" else "reading"
        with shown.stage(f"evaluation data: {what} {name}") as stage:
            t0 = time.perf_counter()
            if name == "self":
                if model is None:
                    raise TrimpruneError("--eval self needs the dense model to sample from")
                n = self_samples if limit is None else min(self_samples, limit)
                w = sample_from_model(
                    model,
                    tokenizer,
                    n,
                    seqlen,
                    seed + SELF_EVAL_SEED_OFFSET,
                    progress=progress,
                    batch_size=min(n, 32),
                )
                sets[name] = {
                    "windows": w,
                    "limited": False,
                    "source": (
                        f"sampled from the dense model, seed {seed + SELF_EVAL_SEED_OFFSET}"
                    ),
                    "files": [],
                    "protocol": {
                        "dataset": "self",
                        "seqlen": seqlen,
                        "windows": n,
                        "samples": self_samples,
                        "limit": limit,
                        "seed": seed + SELF_EVAL_SEED_OFFSET,
                    },
                }
            else:
                text, cap, used = eval_source(name, eval_data.get(name))
                full = text_windows(tokenizer, text, seqlen, cap)
                w = full if limit is None else full[:limit]
                split = EVAL_SPLITS.get(name)
                sets[name] = {
                    "windows": w,
                    "limited": w.shape[0] < full.shape[0],
                    "total_windows": full.shape[0],
                    "source": used if used is not None else f"hub {hub_name(name, split or '')}",
                    "files": [DataFile.of(used).to_dict()] if used is not None else [],
                    "protocol": {
                        "dataset": name,
                        "split": split,
                        "seqlen": seqlen,
                        "windows": int(w.shape[0]),
                        "total_windows": int(full.shape[0]),
                        "limit": limit,
                        "max_windows": cap,
                        "joined_with": EVAL_JOIN.get(name, "\n\n"),
                    },
                }
            sets[name]["prepare_seconds"] = time.perf_counter() - t0
            stage.result = f"{w.shape[0]} windows of {seqlen} tokens"
    return sets


def evaluate_sets(
    model,
    sets: dict[str, dict],
    batch_size: int = 4,
    device=None,
    offload: bool = False,
    progress=False,
    label: str = "the model",
    storage: DiskBlocks | None = None,
) -> dict[str, dict]:
    """Mean NLL and perplexity per set. A perplexity that is not a finite number is never returned:
    `NonFiniteError` names the set, `label` (which model) and, when they are to blame, the
    non-finite weights. `storage`: the `DiskBlocks` of a model loaded with offload="disk"
    (`LoadedModel.storage`)."""
    out = {}
    shown = Progress.of(progress if Ranks.current().main else False)
    for name, s in sets.items():
        t0 = time.perf_counter()
        n, length = s["windows"].shape
        with shown.stage(
            f"perplexity of {label} on {name} ({n} windows of {length} tokens)"
        ) as stage:
            nll, ntok = nll_of_windows(
                model,
                s["windows"],
                batch_size,
                device,
                offload,
                shown,
                desc=f"eval {name}",
                storage=storage,
            )
            mean = nll / ntok
            stage.result = (
                f"{math.exp(mean):.4f}" if math.isfinite(mean) and mean <= MAX_NLL else "no number"
            )
        if not math.isfinite(mean):
            raise blame(
                model, f"the {name} perplexity of {label} is not a number (mean NLL {mean})"
            )
        if mean > MAX_NLL:
            raise NonFiniteError(
                f"the {name} perplexity of {label} overflows: its mean NLL is {mean:.6g} nats per "
                "token (finite logits, useless predictions): check the model"
            )
        out[name] = {
            "nll": mean,
            "perplexity": math.exp(mean),
            "windows": int(s["windows"].shape[0]),
            "tokens": ntok,
            "limited": bool(s.get("limited")),
            "seconds": time.perf_counter() - t0,
        }
    return out


def perplexity(
    model,
    tokenizer,
    dataset: str = "wikitext2",
    seqlen: int = 2048,
    path: str | None = None,
    limit: int | None = None,
    batch_size: int = 4,
    device=None,
    storage: DiskBlocks | None = None,
) -> float:
    """Convenience: perplexity of `model` on one dataset under the paper protocol. `storage`: the
    `LoadedModel.storage` of a model loaded with offload="disk" (its blocks are streamed from
    there)."""
    sets = prepare_eval_sets([dataset], tokenizer, seqlen, {dataset: path} if path else None, limit)
    return evaluate_sets(model, sets, batch_size, device, storage=storage)[dataset]["perplexity"]
