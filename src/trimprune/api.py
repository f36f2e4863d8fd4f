"""`prune(model, tokenizer, config, calibration)`: the one call that applies a `PruneConfig`.

Calibration -> capture of the block inputs -> layer-wise allocation -> the walk over the decoder
blocks, each pruned by `algo.block.prune_block` -> a `PruneResult` with typed records.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch
from torch import nn

from .algo.allocation import Allocation, build_allocation
from .algo.block import BlockRecords, Plan, prune_block
from .algo.executor import Deferred
from .algo.masks import unpack_mask
from .algo.records import BlockGuardRecord, LinearRecord
from .algo.scorers import make_scorer
from .calib.capture import Streams, StreamUpdate, capture, walk
from .calib.data import get_calibration
from .config import PruneConfig
from .errors import TrimpruneError
from .exec import Phases, make_executor
from .io.models import ModelAdapter, model_device
from .io.progress import BlockProgress, Progress


@dataclass
class PruneResult:
    """What `prune` did: per-linear records, the allocation, masks, timings and the block safeguard."""

    config: PruneConfig
    layers: dict[str, LinearRecord]              # full linear name -> record, in model order
    allocation: Allocation
    masks: dict[str, torch.Tensor] = field(repr=False, default_factory=dict)  # bit-packed (masks.pack_mask)
    timings: dict[str, float] = field(default_factory=dict)
    calibration_shape: tuple = ()
    notes: list[str] = field(default_factory=list)
    block_safeguard: list[BlockGuardRecord] = field(default_factory=list)
    phases: Phases | None = field(repr=False, default=None)     # the profiling phases (benchmarks read them)

    def mask(self, name: str) -> torch.Tensor:
        """The bool mask (True = pruned) of one linear, unpacked."""
        return unpack_mask(self.masks[name], self.layers[name].shape)

    @property
    def global_sparsity(self) -> float:
        z = sum(r.zeros for r in self.layers.values())
        n = sum(r.numel for r in self.layers.values())
        return z / n if n else 0.0

    def block_sparsity(self) -> list[float]:
        nb = max(r.block for r in self.layers.values()) + 1
        z, n = [0] * nb, [0] * nb
        for r in self.layers.values():
            z[r.block] += r.zeros
            n[r.block] += r.numel
        return [a / b if b else 0.0 for a, b in zip(z, n)]


def auto_batch_size(adapter: ModelAdapter, config: PruneConfig, device: torch.device, dtype: torch.dtype) -> int:
    if config.run.batch_size:
        return config.run.batch_size
    if device.type != "cuda":
        return min(config.calib.nsamples, 8)
    cfg = adapter.model.config
    cfg = getattr(cfg, "text_config", None) or cfg
    hidden = adapter.hidden_size()
    inter = getattr(cfg, "intermediate_size", None) or getattr(cfg, "ffn_dim", None) or 4 * hidden
    per_sample = config.calib.seqlen * (10 * hidden + 4 * inter) * torch.finfo(dtype).bits // 8
    free, _ = torch.cuda.mem_get_info(device)
    return int(max(1, min(config.calib.nsamples, 64, (0.25 * free) // max(per_sample, 1))))


def _as_batches(calibration, batch_size: int) -> list[torch.Tensor]:
    if isinstance(calibration, torch.Tensor):
        if calibration.dim() != 2:
            raise TrimpruneError(f"calibration must be a (nsamples, seqlen) tensor of token ids, got shape "
                                 f"{tuple(calibration.shape)}")
        return list(calibration.split(batch_size, 0))
    seqs = list(calibration)
    if not seqs:
        raise TrimpruneError("calibration is empty: give at least one sequence")
    return list(torch.stack([torch.as_tensor(s) for s in seqs]).split(batch_size, 0))


class _Records:
    """The blocks' deferred records, resolved in block order as their host copies complete (and reported
    to `blocks`: the JSON line of each block)."""

    def __init__(self, blocks: BlockProgress):
        self.blocks = blocks
        self.pending: list[Deferred] = []
        self.layers: dict[str, LinearRecord] = {}
        self.masks: dict[str, torch.Tensor] = {}
        self.guard: list[BlockGuardRecord] = []

    def add(self, records: Deferred) -> None:
        self.pending.append(records)

    def collect(self, wait: bool) -> None:
        while self.pending and (wait or self.pending[0].ready()):
            rec: BlockRecords = self.pending.pop(0).result()
            self.layers.update(rec.linears)
            self.masks.update(rec.masks)
            if rec.guard is not None:
                self.guard.append(rec.guard)
            self.blocks.record(rec.block, list(rec.linears.values()), rec.guard)


def _walk(model, adapter: ModelAdapter, captured, plan: Plan, config: PruneConfig, ex, progress: Progress) -> _Records:
    """Every block through `prune_block`; the records of earlier blocks are collected as their host
    copies complete."""
    blocks = progress.blocks(adapter.num_blocks, f"{config.scorer.name}{'+trim' if config.trim.enabled else ''}")
    records = _Records(blocks)

    def visit(run) -> StreamUpdate:
        with ex.phase("block"):
            decision = prune_block(run, plan, ex)
        records.add(decision.records)
        with ex.phase("records"):
            records.collect(wait=False)
        return StreamUpdate(subset_dense=decision.subset_dense, subset_pruned=decision.subset_pruned)

    subset = [captured.subset] if captured.subset is not None else []
    use_cache = getattr(model.config, "use_cache", None)
    model.config.use_cache = False
    try:
        with torch.no_grad():
            walk(adapter, captured, Streams(captured.hidden, subset, list(subset)), visit, offload=config.run.offload,
                 progress=blocks, ex=ex)
            with ex.phase("records"):
                records.collect(wait=True)
    finally:
        blocks.close()
        if use_cache is not None:
            model.config.use_cache = use_cache
    return records


def prune(model: nn.Module, tokenizer, config: PruneConfig, calibration=None, *, device=None,
          progress=True, profile: str = "time") -> PruneResult:
    """Prune `model` in place following `config`; returns a `PruneResult`.

    `calibration`: a (nsamples, seqlen) LongTensor of token ids, or None to build it from
    `config.calib` (`tokenizer` is then needed). `device`: where blocks are computed (default: the
    model's device; with `config.run.offload` the model may live on CPU and blocks visit `device`).
    `progress`: a `io.progress.Progress` (bars, log lines, --log-json) or True / False.
    `profile`: the phases' mode (`exec.profiling`), for benchmarks.

    NaN / Inf in the weights, activations or statistics raises `NonFiniteError` (a `TrimpruneError`)
    naming the block and the tensor (`calib.finite`); blocks before it are already pruned in place."""
    t_start = time.perf_counter()
    progress = Progress.of(progress)
    adapter = ModelAdapter.from_model(model)
    dev = torch.device(device) if device is not None else model_device(model)
    if config.run.offload and dev.type == "cpu" and torch.cuda.is_available():
        dev = torch.device("cuda")
    if calibration is None:
        adapter.check_context(config.calib.seqlen, "--seqlen")
        calibration = get_calibration(config.calib, tokenizer, model, progress=progress)
    timings = {"calibration_data_seconds": time.perf_counter() - t_start}
    batches = _as_batches(calibration, auto_batch_size(adapter, config, dev, next(model.parameters()).dtype))
    adapter.check_context(batches[0].shape[1], "--seqlen")
    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats(dev)
    ex = make_executor(dev, profile)
    t_prune = time.perf_counter()
    n_sub = 0
    if config.trim.block_guard:    # the block safeguard's subset: 1/8 of the calibration sequences (at least 4)
        n_all = sum(b.shape[0] for b in batches)
        n_sub = min(n_all, max(4, n_all // 8))
    try:
        with ex.phase("capture"):
            captured = capture(model, adapter, batches, dev, offload=config.run.offload, subset=n_sub, ex=ex)
        timings["capture_seconds"] = time.perf_counter() - t_prune
        t0 = time.perf_counter()
        with ex.phase("allocation"):
            allocation = build_allocation(config, adapter, captured, ex, progress=progress)
        timings["allocation_seconds"] = time.perf_counter() - t0
        plan = Plan.make(config, allocation.per_linear, adapter.full_name, make_scorer(config.scorer, ex),
                         captured.exec_device, ex)
        records = _walk(model, adapter, captured, plan, config, ex, progress)
    finally:
        ex.close()
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)
    ph = ex.phases.totals
    timings.update(prune_seconds=time.perf_counter() - t_prune, trim_search_seconds=ph.get("trim search", 0.0),
                   mask_and_update_seconds=ph.get("masks", 0.0), block_safeguard_seconds=ph.get("block safeguard", 0.0),
                   total_seconds=time.perf_counter() - t_start)
    if dev.type == "cuda":
        timings["peak_gpu_memory_gb"] = torch.cuda.max_memory_allocated(dev) / 2**30
    notes = [f"{name}: SparseGPT {r.scorer_info.fallback}" for name, r in records.layers.items()
             if r.scorer_info is not None and r.scorer_info.fallback]
    return PruneResult(config=config, layers=records.layers, allocation=allocation, masks=records.masks,
                       timings=timings, block_safeguard=records.guard, phases=ex.phases, notes=notes,
                       calibration_shape=(sum(b.shape[0] for b in batches), batches[0].shape[1]))
