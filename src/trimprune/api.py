"""`prune(model, tokenizer, config, calibration)`: the one call that applies a `PruneConfig`.

Calibration -> capture of the block inputs -> layer-wise allocation -> the walk over the decoder
blocks, each pruned by `algo.block.prune_block` -> a `PruneResult` with typed records.
With `config.run.checkpoint_dir`, every finished block is committed to a checkpoint
(`io.checkpoint`), and `config.run.resume` continues an interrupted run after its last one.
"""
from __future__ import annotations

import contextlib
import dataclasses
import time
from dataclasses import dataclass, field
from typing import Callable

import torch
from torch import nn

from .algo.allocation import Allocation, build_allocation, resolve_sparsity
from .algo.block import BlockRecords, Plan, prune_block
from .algo.executor import Deferred
from .algo.masks import unpack_mask
from .algo.ranks import Ranks
from .algo.records import BlockGuardRecord, LinearRecord
from .algo.scorers import make_scorer
from .calib.capture import Captured, Streams, StreamUpdate, capture, walk
from .calib.data import get_calibration
from .config import PruneConfig
from .errors import NonFiniteError, TrimpruneError
from .exec import Phases, make_executor
from .exec.memory import usable_bytes
from .io.checkpoint import Checkpoint
from .io.diskmodel import check_disk_prune
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
    resumed_from_block: int | None = None        # the last block restored from a checkpoint (None: not resumed)
    search: dict | None = None          # --allocation search: trials, best, held-out objectives, profiles
    trim_guard: dict | None = None      # --trim-guard model: both held-out objectives and the choice

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
    return int(max(1, min(config.calib.nsamples, 64, (0.25 * usable_bytes(device)) // max(per_sample, 1))))


def activations_fit(adapter: ModelAdapter, n_sequences: int, n_subset: int, seqlen: int, device: torch.device,
                    dtype: torch.dtype) -> bool:
    """With offload: whether the hidden-state streams (each block's inputs and outputs of this rank's
    calibration sequences, and the block safeguard's four subset streams) fit in half of the free GPU
    memory, after room for two blocks (the current one and the one copied ahead)."""
    if device.type != "cuda":
        return True
    per_token = adapter.hidden_size() * torch.finfo(dtype).bits // 8
    streams = (2 * n_sequences + 4 * n_subset) * seqlen * per_token
    block = sum(p.numel() * p.element_size() for p in adapter.blocks[0].parameters())
    return streams <= 0.5 * (usable_bytes(device) - 2 * block)


def _as_ids(calibration) -> torch.Tensor:
    """The calibration sequences as one (nsamples, seqlen) tensor of token ids."""
    if isinstance(calibration, torch.Tensor):
        if calibration.dim() != 2:
            raise TrimpruneError(f"calibration must be a (nsamples, seqlen) tensor of token ids, got shape "
                                 f"{tuple(calibration.shape)}")
        return calibration
    seqs = list(calibration)
    if not seqs:
        raise TrimpruneError("calibration is empty: give at least one sequence")
    return torch.stack([torch.as_tensor(s) for s in seqs])


class _Records:
    """The blocks' deferred records, resolved in block order as their host copies complete (and reported
    to `blocks`: the JSON line of each block). In a data-parallel run every block's records are gathered
    from the ranks that decided its linears as soon as it is done (every rank then holds all records)."""

    def __init__(self, blocks: BlockProgress, ranks: Ranks, order: Callable[[int], list[str]]):
        self.blocks, self.ranks, self.order = blocks, ranks, order
        self.pending: list[Deferred] = []
        self.layers: dict[str, LinearRecord] = {}
        self.masks: dict[str, torch.Tensor] = {}
        self.guard: list[BlockGuardRecord] = []
        self.by_block: dict[int, BlockRecords] = {}

    def add(self, records: Deferred) -> None:
        self.pending.append(records)

    def restore(self, rec: BlockRecords) -> None:
        """A block's records read back from a checkpoint (reported by the run that made them)."""
        self.layers.update(rec.linears)
        self.masks.update(rec.masks)
        if rec.guard is not None:
            self.guard.append(rec.guard)
        self.by_block[rec.block] = rec

    def collect(self, wait: bool) -> None:
        while self.pending and (wait or self.pending[0].ready()):
            rec: BlockRecords = self.pending.pop(0).result()
            if self.ranks.parallel:
                rec = BlockRecords.merge(self.ranks.gather(rec), self.order(rec.block))
            self.restore(rec)
            self.blocks.record(rec.block, list(rec.linears.values()), rec.guard)


def _placed(streams: Streams, sizes: list[int], captured, ex) -> Streams:
    """Streams read from a checkpoint, split like this run's batches and stored like its captured inputs."""
    main = streams.main
    if [m.shape[0] for m in main] != sizes:
        main = list(torch.cat(main).split(sizes[0], 0))
    want = [tuple(h.shape) for h in captured.hidden]
    if [tuple(m.shape) for m in main] != want:
        raise TrimpruneError(f"--resume: the checkpoint's hidden states {[tuple(m.shape) for m in main][:1]} do not "
                             f"fit this run's {want[:1]}: remove the checkpoint folder and start afresh")

    def put(hs):
        out = [h.to(captured.store_device) for h in hs]
        if captured.store_device.type == "cpu" and captured.exec_device.type == "cuda":
            out = [ex.pinned(h) for h in out]
        return out

    return Streams(put(main), put(streams.subset_dense), put(streams.subset_pruned))


def _walk(model, adapter: ModelAdapter, captured, plan: Plan, config: PruneConfig, ex, progress: Progress,
          ckpt: Checkpoint | None = None, timings: dict | None = None) -> _Records:
    """Every block through `prune_block`; the records of earlier blocks are collected as their host
    copies complete. With a checkpoint, blocks it holds are restored (weights, masks, records) and the
    walk starts after them; every finished block is committed to it."""
    blocks = progress.blocks(adapter.num_blocks, f"{config.scorer.name}{'+trim' if config.trim.enabled else ''}")
    records = _Records(blocks, plan.ranks, lambda i: [adapter.full_name(i, n) for n in adapter.linears(i)])
    subset = [captured.subset] if captured.subset is not None else []
    streams, start, after = Streams(captured.hidden, subset, list(subset)), 0, None
    if ckpt is not None:
        t0 = time.perf_counter()
        if ckpt.last_block >= 0:
            for rec in ckpt.restore_blocks(adapter):
                records.restore(rec)
            saved, _ = ckpt.load_streams()
            streams = _placed(saved, [h.shape[0] for h in captured.hidden], captured, ex)
            start = ckpt.last_block + 1
            blocks.resume_at(start)

        def after(i: int, streams: Streams) -> None:
            with ex.phase("records"):
                records.collect(wait=True)
            t = time.perf_counter()
            if captured.exec_device.type == "cuda":      # offloaded weights copied back to host memory, streams
                torch.cuda.synchronize(captured.exec_device)
            with ex.phase("checkpoint"):
                ckpt.commit_block(i, adapter, records.by_block[i], streams)
            timings["checkpoint_seconds"] += time.perf_counter() - t

        timings["checkpoint_seconds"] += time.perf_counter() - t0

    def visit(run) -> StreamUpdate:
        with ex.phase("block"):
            decision = prune_block(run, plan, ex)
        records.add(decision.records)
        with ex.phase("records"):
            records.collect(wait=plan.ranks.parallel)     # the ranks gather every block in step
        return StreamUpdate(subset_dense=decision.subset_dense, subset_pruned=decision.subset_pruned)

    use_cache = getattr(model.config, "use_cache", None)
    model.config.use_cache = False
    try:
        with torch.no_grad():
            walk(adapter, captured, streams, visit, offload=config.run.offload, progress=blocks, ex=ex, start=start,
                 after_block=after)
            with ex.phase("records"):
                records.collect(wait=True)
    finally:
        blocks.close()
        if use_cache is not None:
            model.config.use_cache = use_cache
    return records


def check_dense_batch(adapter: ModelAdapter, captured: Captured, offload, ex) -> None:
    """Before any weight changes: the dense model's blocks on the first calibration batch, every block's
    outputs checked (`calib.finite.check_walk_step`). Activations that overflow (float16's range is
    65504) stop the run here, before the first block is pruned, with the error naming the block and
    the dtype to use; one batch through the blocks is all it costs (with --offload disk, one more read of
    the blocks)."""
    first = dataclasses.replace(captured, hidden=captured.hidden[:1], subset=None)
    try:
        with ex.phase("dense check"):
            walk(adapter, first, Streams(list(first.hidden)), lambda run: None, offload=offload, progress=False,
                 ex=ex)
    except NonFiniteError as e:
        raise NonFiniteError(f"before pruning, the dense model on the first calibration batch: {e}") from None


class Session:
    """What every prune of one model from one calibration set shares, prepared once: the adapter, the
    calibration sequences (less the held-out ones of a search, `holdout`), the checkpoint of
    `config.run.checkpoint_dir`, the executor and the captured block inputs. `allocate(config)` builds an
    allocation from them (a resumed run's is read from its checkpoint) and `run(config, allocation)` walks
    the blocks through `prune_block`; `snapshot()` / `restore()` keep and put back the dense weights of the
    prunable linears (a host copy) so that several prunes can start from the same dense model (the search
    and `--trim-guard model`; a session with a checkpoint prunes once). `prune` is `open` + `allocate` +
    `run` + `close`."""

    def __init__(self, model, adapter: ModelAdapter, config: PruneConfig, ranks: Ranks, progress: Progress,
                 dev: torch.device, ids: torch.Tensor, holdout: torch.Tensor | None, ex, profile: str,
                 t_start: float, timings: dict, batch_size: int, ckpt: Checkpoint | None = None,
                 notes: list[str] | None = None, storage=None):
        self.model, self.adapter, self.config, self.ranks = model, adapter, config, ranks
        self.progress, self.dev, self.ids, self.holdout = progress, dev, ids, holdout
        self.ex, self.profile, self.t_start, self.timings = ex, profile, t_start, timings
        self.batch_size, self.ckpt, self.notes = batch_size, ckpt, list(notes or [])
        self.storage = storage              # --offload disk: the blocks' files (`io.diskmodel.DiskBlocks`), else None
        # the last block restored from the checkpoint (None: not resumed)
        self.resumed_from_block = ckpt.last_block if ckpt is not None and ckpt.last_block >= 0 else None
        self.t_prune = 0.0
        self.captured = None
        self.dense: dict[str, torch.Tensor] | None = None
        self.last_allocation_seconds = 0.0
        self.runs = 0

    @classmethod
    def open(cls, model: nn.Module, tokenizer, config: PruneConfig, calibration=None, *, device=None, progress=True,
             profile: str = "time", holdout: int = 0, guard_subset: bool | None = None) -> "Session":
        """Calibration (built from `config.calib` when None), the checkpoint (checked against this run; a
        resumed run takes the interrupted run's automatic batch size) and the capture of the block inputs.
        `holdout`: the last sequences, kept out of the statistics (`Session.holdout`). `guard_subset`: whether
        to capture the block safeguard's subset (default: when `config.trim.block_guard`)."""
        t_start = time.perf_counter()
        ranks = Ranks.current()
        progress = Progress.of(progress if ranks.main else False)
        adapter = ModelAdapter.from_model(model)
        storage = check_disk_prune(model, config, ranks, sampling=calibration is None)   # None unless offload disk
        dev = torch.device(device) if device is not None else model_device(model)
        if config.run.offload and dev.type == "cpu" and torch.cuda.is_available():
            dev = torch.device("cuda")
        if calibration is None:
            adapter.check_context(config.calib.seqlen, "--seqlen")
            calibration = get_calibration(config.calib, tokenizer, model, progress=progress)
        timings = {"calibration_data_seconds": time.perf_counter() - t_start}
        ids = _as_ids(calibration)
        adapter.check_context(ids.shape[1], "--seqlen")
        held = None
        if holdout:
            if holdout >= ids.shape[0]:
                raise TrimpruneError(f"--search-holdout {holdout} leaves none of the {ids.shape[0]} calibration "
                                     "sequences to prune with: use more --nsamples or a smaller --search-holdout")
            ids, held = ids[: ids.shape[0] - holdout], ids[ids.shape[0] - holdout:]
        if ids.shape[0] < ranks.world:
            raise TrimpruneError(f"{ids.shape[0]} calibration sequences cannot be shared by {ranks.world} processes: "
                                 f"use --nsamples {ranks.world} or more, or fewer processes")
        batch_size = auto_batch_size(adapter, config, dev, next(model.parameters()).dtype)
        ckpt, notes = None, []
        if config.run.checkpoint_dir:
            if ranks.parallel:
                raise TrimpruneError("--checkpoint-dir is not supported with several processes (torchrun) yet: run "
                                     "one process, or leave --checkpoint-dir out")
            t0 = time.perf_counter()
            ckpt = Checkpoint.open(config.run.checkpoint_dir, config, adapter, ids, resume=config.run.resume)
            timings["checkpoint_seconds"] = time.perf_counter() - t0
            notes = _resume_notes(ckpt, config, dev, progress)
            if ckpt.batch_size and not config.run.batch_size:
                batch_size = ckpt.batch_size          # automatic: the interrupted run's split (same summation order)
        if dev.type == "cuda":
            torch.cuda.reset_peak_memory_stats(dev)
        ex = make_executor(dev, profile, storage=storage)
        self = cls(model, adapter, config, ranks, progress, dev, ids, held, ex, profile, t_start, timings, batch_size,
                   ckpt, notes, storage)
        try:
            self._capture(config.trim.block_guard if guard_subset is None else guard_subset)
            t0 = time.perf_counter()
            check_dense_batch(adapter, self.captured, config.run.offload, ex)
            timings["dense_check_seconds"] = time.perf_counter() - t0
        except BaseException:
            ex.close()
            raise
        return self

    def _capture(self, guard: bool) -> None:
        """This rank's share of the calibration batches (and the block safeguard's subset with `guard`)
        through the model up to every block: `self.captured`."""
        config, ids, ranks, model, adapter, dev = self.config, self.ids, self.ranks, self.model, self.adapter, self.dev
        batches = list(ids[ranks.share(ids.shape[0])].split(self.batch_size, 0))
        self.t_prune = time.perf_counter()
        subset = None
        if guard:    # the block safeguard's subset: 1/8 of the calibration sequences (at least 4)
            n_sub = min(ids.shape[0], max(4, ids.shape[0] // 8))
            subset = ids[:n_sub][ranks.share(n_sub)]
        on_device = config.run.offload and activations_fit(
            adapter, sum(b.shape[0] for b in batches), 0 if subset is None else subset.shape[0], ids.shape[1], dev,
            next(model.parameters()).dtype)
        with self.ex.phase("capture"):
            self.captured = capture(model, adapter, batches, dev, offload=config.run.offload, subset=subset, ex=self.ex,
                                    ranks=ranks, keep_on_device=on_device)
        self.timings["capture_seconds"] = time.perf_counter() - self.t_prune

    # ------------------------------------------------------------------ dense weights
    def linears(self) -> dict[str, nn.Module]:
        """Every prunable linear, by full name."""
        return {self.adapter.full_name(i, n): m for i in range(self.adapter.num_blocks)
                for n, m in self.adapter.linears(i).items()}

    def snapshot(self) -> None:
        """A host copy of the prunable linears' (dense) weights, for `restore`."""
        if self.storage is not None:
            raise TrimpruneError("--offload disk prunes once (each pruned block goes to the output as it is done): "
                                 "--allocation search and --trim-guard model need --offload cpu")
        self.dense = {k: m.weight.data.to("cpu", copy=True) for k, m in self.linears().items()}

    def restore(self) -> None:
        """The weights of `snapshot` back into the model (in place: offloaded blocks keep their pinned memory)."""
        if self.dense is None:
            raise RuntimeError("Session.restore() needs a snapshot() first")
        for k, m in self.linears().items():
            m.weight.data.copy_(self.dense[k])

    # ------------------------------------------------------------------ prunes
    def allocate(self, config: PruneConfig) -> Allocation:
        """The allocation `config.allocation` names (OWL walks the captured activations through the model,
        which must be dense then); a resumed run's is the one its checkpoint saved. In a data-parallel run,
        rank 0's."""
        t0 = time.perf_counter()
        with self.ex.phase("allocation"):
            allocation = self.ckpt.allocation() if self.ckpt is not None else None
            if allocation is None:
                allocation = build_allocation(config, self.adapter, self.captured, self.ex, progress=self.progress)
            if self.ranks.parallel:      # rank 0's (computed alike on every rank; one copy rules out any drift)
                allocation = self.ranks.gather(allocation)[0]
        self.last_allocation_seconds = time.perf_counter() - t0
        return allocation

    def run(self, config: PruneConfig, allocation: Allocation) -> PruneResult:
        """Prune the model in place with `allocation` (the walk of `prune_block` over the captured inputs).
        With a checkpoint: the allocation is saved first (unless the checkpoint holds it), blocks it holds
        are restored instead of pruned, and every finished block is committed."""
        ex, ckpt = self.ex, self.ckpt
        if (ckpt is not None or self.storage is not None) and (self.runs or config != self.config):
            raise RuntimeError("a Session with a checkpoint or --offload disk prunes once, with the config it was "
                               "opened with")
        if ckpt is not None:
            t0 = time.perf_counter()
            ckpt.begin(self.batch_size, self.dev)
            if ckpt.state.get("allocation") is None:
                ckpt.save_allocation(allocation, self.batch_size, self.dev)
            self.timings["checkpoint_seconds"] += time.perf_counter() - t0
        self.runs += 1
        plan = Plan.make(config, allocation.per_linear, self.adapter.full_name, make_scorer(config.scorer, ex),
                         self.captured.exec_device, ex, self.ranks)
        with self.storage.pruning() if self.storage is not None else contextlib.nullcontext():   # blocks written as done
            records = _walk(self.model, self.adapter, self.captured, plan, config, ex, self.progress, ckpt,
                            self.timings)
        if self.dev.type == "cuda":
            torch.cuda.synchronize(self.dev)
        ph = ex.phases.totals
        timings = dict(self.timings, allocation_seconds=self.last_allocation_seconds)
        timings.update(prune_seconds=time.perf_counter() - self.t_prune, trim_search_seconds=ph.get("trim search", 0.0),
                       mask_and_update_seconds=ph.get("masks", 0.0),
                       block_safeguard_seconds=ph.get("block safeguard", 0.0),
                       total_seconds=time.perf_counter() - self.t_start)
        if self.dev.type == "cuda":
            timings["peak_gpu_memory_gb"] = torch.cuda.max_memory_allocated(self.dev) / 2**30
        notes = self.notes + [f"{name}: SparseGPT {r.scorer_info.fallback}" for name, r in records.layers.items()
                              if r.scorer_info is not None and r.scorer_info.fallback]
        return PruneResult(config=config, layers=records.layers, allocation=allocation, masks=records.masks,
                           timings=timings, block_safeguard=records.guard, phases=ex.phases,
                           calibration_shape=tuple(self.ids.shape), notes=notes,
                           resumed_from_block=self.resumed_from_block)

    def close(self) -> None:
        self.ex.close()
        self.dense = None


def prune(model: nn.Module, tokenizer, config: PruneConfig, calibration=None, *, device=None,
          progress=True, profile: str = "time") -> PruneResult:
    """Prune `model` in place following `config`; returns a `PruneResult`.

    `calibration`: a (nsamples, seqlen) LongTensor of token ids, or None to build it from
    `config.calib` (`tokenizer` is then needed). `device`: where blocks are computed (default: the
    model's device; with `config.run.offload` the model may live on CPU and blocks visit `device`).
    `progress`: a `io.progress.Progress` (bars, log lines, --log-json) or True / False.
    `profile`: the phases' mode (`exec.profiling`), for benchmarks.
    `config.run.offload == "disk"`: the model comes from `load_model(..., offload="disk")` and
    `model.trimprune_storage.write_to(FOLDER)` names the folder where each block is written as it
    finishes (`io.diskmodel`); `io.export.write_outputs` completes that folder.
    `config.run.checkpoint_dir`: commit every finished block there (`io.checkpoint`); with
    `config.run.resume`, first restore the blocks it holds and continue after them. The checkpoint is
    left in place (the command line removes it once the output is written).

    `--allocation search` and `--trim-guard model` prune several times from one capture and keep the
    best on held-out calibration sequences (`trimprune.search`; `PruneResult.search` / `.trim_guard`);
    they run in one process and without a checkpoint.

    In a process group (`torchrun`, `torch.distributed` initialised) every rank calls `prune` with the same
    arguments: each runs the blocks on its share of the calibration sequences, the per-linear work is
    split across ranks, and every rank ends with the same pruned weights and the same `PruneResult`
    (`algo.ranks`). Only rank 0 shows progress.

    NaN / Inf in the weights, activations or statistics raises `NonFiniteError` (a `TrimpruneError`)
    naming the block and the tensor (`calib.finite`); blocks before it are already pruned in place.
    Before the first block is pruned, the dense model runs on the first calibration batch
    (`check_dense_batch`): activations that overflow the dtype (float16) stop the run there.

    `config.allocation` "file:PATH" is read against the model first (`algo.allocation.resolve_sparsity`):
    its parameter-weighted mean must be `config.sparsity` within 1e-4; with `config.sparsity` None the
    mean is the target (the result's config holds it, its notes say so)."""
    file_target = config.sparsity is None
    config = resolve_sparsity(config, ModelAdapter.from_model(model))
    if config.holdout is not None:
        from .search import search_prune

        return search_prune(model, tokenizer, config, calibration, device=device, progress=progress, profile=profile)
    session = Session.open(model, tokenizer, config, calibration, device=device, progress=progress, profile=profile)
    try:
        result = session.run(config, session.allocate(config))
    finally:
        session.close()
    if file_target:
        result.notes.insert(0, f"no --sparsity given: the target is the parameter-weighted mean of "
                               f"{config.allocation.method}, {config.sparsity:.6g}")
    return result


def _resume_notes(ckpt: Checkpoint, config: PruneConfig, dev, progress: Progress) -> list[str]:
    """What a run with a checkpoint says (the log line and the report's notes)."""
    where, n = config.run.checkpoint_dir, ckpt.identity["model"]["num_blocks"]
    notes = []
    if config.run.resume and ckpt.state is None:
        notes.append(f"--resume: no checkpoint in {where}; started from block 0")
    elif ckpt.state is not None and ckpt.last_block < 0:
        notes.append(f"--resume: the checkpoint in {where} held the allocation only; started from block 0")
    elif ckpt.state is not None:
        k = ckpt.last_block
        rest = f"blocks {k + 1}..{n - 1} pruned now" if k + 1 < n else "none left to prune"
        notes.append(f"resumed from the checkpoint in {where}: blocks 0..{k} of {n} restored (pruned by an earlier "
                     f"process), {rest}; timings cover this process only")
        if config.run.batch_size and ckpt.batch_size and config.run.batch_size != ckpt.batch_size:
            notes.append(f"--batch-size {config.run.batch_size} differs from the interrupted run's {ckpt.batch_size}: "
                         "results equal an uninterrupted run up to floating-point summation order")
        dnote = ckpt.note_device(dev)
        if dnote:
            notes.append(dnote)
    for line in notes[:1]:
        progress.message(line)
    return notes
