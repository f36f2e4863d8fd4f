"""One prune's resolved inputs and the session that prunes with them.

`check_against_model` runs the checks that need the loaded model (once: a `Checked` config carries
that they ran); `resolve_inputs` turns a checked config, the model and the calibration into one
`RunInputs` value (device, calibration and hold-out split, batches, resume state, executor);
`Session` captures the block inputs once, and walks the blocks through `algo.block.prune_block` as
often as its caller asks (`run`), from the same dense weights (`snapshot` / `restore`).

Calibration -> capture of the block inputs -> layer-wise allocation -> the walk over the decoder
blocks -> a `PruneResult` with typed records. With `config.run.checkpoint_dir`, every finished
block is committed to the resume state (`io.resume`), and `config.run.resume` continues an
interrupted run after its last block.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import nn

from trimprune.algo.allocation import Allocation, resolve_sparsity
from trimprune.algo.block import BlockRecords, Plan, prune_block
from trimprune.algo.masks import unpack_mask
from trimprune.algo.scorers import make_scorer
from trimprune.calib.data import CalibrationData, load_calibration
from trimprune.config import PruneConfig
from trimprune.core.coverage import Coverage, check_coverage
from trimprune.core.finite import check_weights
from trimprune.core.model import ExcludedModule, ModelAdapter, model_device
from trimprune.core.moe import expert_sets, routed_experts
from trimprune.core.progress import BlockProgress, Progress
from trimprune.core.ranks import Ranks
from trimprune.core.records import BlockSafeguardRecord, LinearRecord
from trimprune.core.runtime import Deferred, Executor
from trimprune.engine.allocate import build_allocation
from trimprune.engine.capture import Captured, capture
from trimprune.engine.walk import Streams, StreamUpdate, moe_calibration, walk
from trimprune.errors import TrimpruneError
from trimprune.exec import Phases, make_executor
from trimprune.exec.memory import usable_bytes
from trimprune.io.diskmodel import DiskBlocks, check_disk_prune
from trimprune.io.resume import ResumeState, precheck_resume_state


@dataclass
class PruneResult:
    """What `prune` did: per-linear records, the allocation, masks, timings and the block
    safeguard."""

    config: PruneConfig
    layers: dict[str, LinearRecord]  # full linear name -> record, in model order
    allocation: Allocation
    masks: dict[str, torch.Tensor] = field(
        repr=False, default_factory=dict
    )  # bit-packed (masks.pack_mask)
    timings: dict[str, float] = field(default_factory=dict)
    calibration_shape: tuple = ()
    notes: list[str] = field(default_factory=list)
    block_safeguard: list[BlockSafeguardRecord] = field(default_factory=list)
    phases: Phases | None = field(
        repr=False, default=None
    )  # the profiling phases (benchmarks read them)
    resumed_from_block: int | None = (
        None  # the last block restored from the resume state (None: not resumed)
    )
    search: dict | None = None  # --allocation search: trials, best, held-out objectives, profiles
    trim_guard: dict | None = None  # --trim-guard model: both held-out objectives and the choice
    # experts routed fewer than --moe-min-tokens tokens (their statistics came from every token):
    # full linear name -> routed calibration tokens
    moe_fallback: dict[str, int] = field(default_factory=dict)
    # which of the blocks' weights were pruned, per kind, and what was left dense or excluded
    coverage: Coverage | None = None
    # a multimodal model's towers beside its language model, not pruned (vision tower, projector)
    excluded: tuple[ExcludedModule, ...] = ()
    # where the calibration sequences came from (None: the caller gave them)
    calibration_data: CalibrationData | None = None

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


# The automatic batch of a dense model: a batch's forward working memory is kept within BATCH_BYTES
# unless that leaves fewer than BUSY_TOKENS tokens, below which the GPU's matrix products slow down
# (the 8B shape's batch against 64: docs' results page, "Speed at scale").
BATCH_BYTES = 3 << 30
BUSY_TOKENS = 16384


def auto_batch_size(
    adapter: ModelAdapter, config: PruneConfig, device: torch.device, dtype: torch.dtype
) -> int:
    """Calibration sequences per forward: --batch-size, else on the CPU 8, else on a GPU the most
    that fit in a quarter of the free memory (at most 64), capped for a dense model by
    BATCH_BYTES of working memory (never below BUSY_TOKENS tokens). A mixture-of-experts block's
    statistics pass runs every expert once per batch, so its batches are not capped."""
    if config.run.batch_size:
        return config.run.batch_size
    if device.type != "cuda":
        return min(config.calib.nsamples, 8)
    cfg = adapter.model.config
    cfg = getattr(cfg, "text_config", None) or cfg
    hidden = adapter.hidden_size()
    inter = getattr(cfg, "intermediate_size", None) or getattr(cfg, "ffn_dim", None) or 4 * hidden
    top_k = getattr(cfg, "num_experts_per_tok", None) or getattr(cfg, "moe_topk", None)
    moe = bool(top_k and expert_sets(adapter.model))
    if moe:  # each token computes in top_k experts at once
        moe_inter = getattr(cfg, "moe_intermediate_size", None) or inter
        inter = max(inter, 2 * int(top_k) * moe_inter)
    seqlen = config.calib.seqlen
    per_sample = max(1, seqlen * (10 * hidden + 4 * inter) * torch.finfo(dtype).bits // 8)
    fits = int(0.25 * usable_bytes(device)) // per_sample
    if not moe:
        fits = min(fits, max(BATCH_BYTES // per_sample, -(-BUSY_TOKENS // seqlen)))
    return int(max(1, min(config.calib.nsamples, 64, fits)))


def activations_fit(
    adapter: ModelAdapter,
    n_sequences: int,
    n_subset: int,
    seqlen: int,
    device: torch.device,
    dtype: torch.dtype,
) -> bool:
    """With offload: whether the hidden-state streams (each block's inputs and outputs of this
    rank's calibration sequences, and the block safeguard's four subset streams) fit in half of the
    free GPU memory, after room for two blocks (the current one and the one copied ahead)."""
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
            raise TrimpruneError(
                f"calibration must be a (nsamples, seqlen) tensor of token ids, got shape "
                f"{tuple(calibration.shape)}"
            )
        return calibration
    seqs = list(calibration)
    if not seqs:
        raise TrimpruneError("calibration is empty: give at least one sequence")
    return torch.stack([torch.as_tensor(s) for s in seqs])


class _Records:
    """The blocks' deferred records, resolved in block order as their host copies complete (and
    reported to `blocks`: the JSON line of each block). In a data-parallel run every block's records
    are gathered from the ranks that decided its linears as soon as it is done (every rank then
    holds all records)."""

    def __init__(self, blocks: BlockProgress, ranks: Ranks, order: Callable[[int], list[str]]):
        self.blocks, self.ranks, self.order = blocks, ranks, order
        self.pending: list[Deferred] = []
        self.layers: dict[str, LinearRecord] = {}
        self.masks: dict[str, torch.Tensor] = {}
        self.block_safeguard: list[BlockSafeguardRecord] = []
        self.by_block: dict[int, BlockRecords] = {}
        self.moe_fallback: dict[str, int] = {}  # experts given every token's statistics
        self.fallback_of: dict[int, dict[str, int]] = {}  # the same, per block

    def add(self, records: Deferred, block: int, moe_fallback: dict[str, int]) -> None:
        self.pending.append(records)
        self.moe_fallback |= moe_fallback
        self.fallback_of[block] = moe_fallback

    def restore(self, rec: BlockRecords, moe_fallback: dict[str, int] | None = None) -> None:
        """A block's records read back from the resume state (reported by the run that made
        them), with the experts whose statistics fell back to every token (`moe_fallback`)."""
        if moe_fallback is not None:
            self.moe_fallback |= moe_fallback
            self.fallback_of[rec.block] = moe_fallback
        self.layers.update(rec.linears)
        self.masks.update(rec.masks)
        if rec.safeguard is not None:
            self.block_safeguard.append(rec.safeguard)
        self.by_block[rec.block] = rec

    def collect(self, wait: bool) -> None:
        while self.pending and (wait or self.pending[0].ready()):
            rec: BlockRecords = self.pending.pop(0).result()
            if self.ranks.parallel:
                rec = BlockRecords.merge(self.ranks.gather(rec), self.order(rec.block))
            self.restore(rec)
            self.blocks.record(rec.block, list(rec.linears.values()), rec.safeguard)


def _full_names(adapter: ModelAdapter, block: int, by_name: dict) -> dict:
    return {adapter.full_name(block, n): v for n, v in by_name.items()}


def _placed(streams: Streams, sizes: list[int], captured, ex) -> Streams:
    """Streams read from the resume state, split like this run's batches and stored like its
    captured inputs."""
    main = streams.main
    if [m.shape[0] for m in main] != sizes:
        main = list(torch.cat(main).split(sizes[0], 0))
    want = [tuple(h.shape) for h in captured.hidden]
    if [tuple(m.shape) for m in main] != want:
        raise TrimpruneError(
            f"{{resume}}: the resume state's hidden states {[tuple(m.shape) for m in main][:1]} "
            f"do not fit this run's {want[:1]}: remove the {{checkpoint_dir}} folder and start "
            "afresh"
        )

    def put(hs):
        out = [h.to(captured.store_device) for h in hs]
        if captured.store_device.type == "cpu" and captured.exec_device.type == "cuda":
            out = [ex.pinned(h) for h in out]
        return out

    return Streams(put(main), put(streams.subset_dense), put(streams.subset_pruned))


def _walk(
    model,
    adapter: ModelAdapter,
    captured,
    plan: Plan,
    config: PruneConfig,
    ex,
    progress: Progress,
    resume: ResumeState | None = None,
    timings: dict | None = None,
    after_block: Callable[[int, Streams], None] | None = None,
) -> _Records:
    """Every block through `prune_block`, records collected as their host copies complete. With a
    resume state, its blocks are restored and each finished block committed (else `after_block`)."""
    blocks = progress.blocks(
        adapter.num_blocks, f"{config.scorer.name}{'+trim' if config.trim.enabled else ''}"
    )
    records = _Records(
        blocks, plan.ranks, lambda i: [adapter.full_name(i, n) for n in adapter.linears(i)]
    )
    subset = [captured.subset] if captured.subset is not None else []
    streams, start, after = Streams(captured.hidden, subset, list(subset)), 0, after_block
    if resume is not None:
        t0 = time.perf_counter()
        if resume.last_block >= 0:
            for rec in resume.restore_blocks(adapter):
                records.restore(rec, resume.moe_fallback.get(rec.block, {}))
            saved, _ = resume.load_streams()
            streams = _placed(saved, [h.shape[0] for h in captured.hidden], captured, ex)
            start = resume.last_block + 1
            blocks.resume_at(start)

        def after(i: int, streams: Streams) -> None:
            with ex.phase("records"):
                records.collect(wait=True)
            t = time.perf_counter()
            if (
                captured.exec_device.type == "cuda"
            ):  # offloaded weights copied back to host memory, streams
                torch.cuda.synchronize(captured.exec_device)
            with ex.phase("resume state"):
                fallback = records.fallback_of.get(i, {})
                resume.commit_block(i, adapter, records.by_block[i], streams, fallback)
            timings["checkpoint_seconds"] += time.perf_counter() - t

        timings["checkpoint_seconds"] += time.perf_counter() - t0

    def visit(run) -> StreamUpdate:
        with ex.phase("block"):
            decision = prune_block(run, plan, ex)
        records.add(decision.records, run.index, _full_names(adapter, run.index, run.moe_fallback))
        with ex.phase("records"):
            records.collect(wait=plan.ranks.parallel)  # the ranks gather every block in step
        return StreamUpdate(
            subset_dense=decision.subset_dense, subset_pruned=decision.subset_pruned
        )

    use_cache = getattr(model.config, "use_cache", None)
    model.config.use_cache = False
    try:
        with torch.no_grad():
            walk(
                adapter,
                captured,
                streams,
                visit,
                offload=config.run.offload,
                progress=blocks,
                ex=ex,
                start=start,
                after_block=after,
                moe=moe_calibration(config),
            )
            with ex.phase("records"):
                records.collect(wait=True)
    finally:
        blocks.close()
        if use_cache is not None:
            model.config.use_cache = use_cache
    return records


def check_dense_weights(adapter: ModelAdapter, ex) -> None:
    """Before any weight changes: every loaded block's parameters are finite
    (`core.finite.check_weights`; no forward). Activations that overflow the dtype (float16) are
    caught in each block's first, dense pass, before its weights change
    (`engine.walk.BlockRun.statistics`)."""
    with ex.phase("finite checks"):
        check_weights(adapter.blocks, adapter.blocks_name)


# ------------------------------------------------------------------------------------------ checks
def refuse_several_processes(config: PruneConfig, ranks: Ranks) -> None:
    """A search and `--trim-guard model` run in one process: under torchrun, a one-line error on
    every rank (before any collective, so no rank waits for another). Several processes search
    together as Optuna intends: independent single-process searches sharing one
    `--search-storage`."""
    if not ranks.parallel:
        return
    if config.allocation.method == "search":
        raise TrimpruneError(
            f"{{allocation}} search runs in one process, not under torchrun ({ranks.world} "
            "processes): "
            "to search with several processes, start several single-process searches that share "
            "one {search_storage} (e.g. sqlite:///study.db; the same config gives the same study), "
            "then prune with the best allocation.json under torchrun through {allocation} file:PATH"
        )
    if config.trim.guard == "model":
        raise TrimpruneError(
            f"{{trim_guard}} model runs in one process, not under torchrun ({ranks.world} "
            "processes): run it in one process, or use {trim_guard} block under torchrun"
        )


@dataclass(frozen=True)
class Checked:
    """A config whose checks against the loaded model ran (`check_against_model`): `prune` takes it
    in place of a `PruneConfig` and does not run them again. `file_target`: the sparsity is the
    parameter-weighted mean of an allocation file (no sparsity was given)."""

    config: PruneConfig
    model_id: int
    file_target: bool = False


def check_before_load(config: PruneConfig, ranks: Ranks) -> None:
    """The checks that need neither the model nor the data: the modes that run in one process."""
    refuse_several_processes(config, ranks)


def check_against_model(
    config: PruneConfig,
    model: nn.Module,
    *,
    seqlens: tuple[int, ...] = (),
    loaded_ranks: bool = False,
    sampling: bool = True,
) -> Checked:
    """The checks that need the loaded model, each once: the sequence lengths against its context
    (`config.calib.seqlen` when the calibration is built from the config, `sampling`; `seqlens`,
    e.g. the evaluation's), the blocks' weights trimprune cannot prune (`core.coverage`: refused
    above 1 % of a block unless `config.run.allow_unpruned`), an allocation file against its linears
    (`algo.allocation.resolve_sparsity`; without a sparsity the file's mean is the target), and an
    existing resume state against this config and model (`io.resume.precheck_resume_state`). With
    `loaded_ranks` False the process-count check of `check_before_load` runs here too."""
    if not loaded_ranks:
        check_before_load(config, Ranks.current())
    adapter = ModelAdapter.from_model(model)
    if sampling:
        adapter.check_context(config.calib.seqlen, "{seqlen}")
    for n in seqlens:
        adapter.check_context(n, "--eval-seqlen")
    check_coverage(Coverage.of(adapter), config.run.allow_unpruned)
    file_target = config.sparsity is None
    config = resolve_sparsity(config, adapter)
    precheck_resume_state(config, model)
    return Checked(config, id(model), file_target and config.sparsity is not None)


def _checked(config: PruneConfig | Checked, model: nn.Module, sampling: bool) -> Checked:
    if isinstance(config, Checked):
        if config.model_id != id(model):
            raise ValueError("a Checked config prunes the model it was checked against")
        return config
    return check_against_model(config, model, sampling=sampling)


# ------------------------------------------------------------------------------------------ inputs
@dataclass
class RunInputs:
    """The resolved inputs of one prune: where it computes, what it calibrates on, how it batches,
    the resume state and the executor. Made once by `resolve_inputs`; a `Session` prunes with it."""

    adapter: ModelAdapter
    device: torch.device
    ranks: Ranks
    progress: Progress
    ids: torch.Tensor  # the calibration sequences the statistics see (nsamples - holdout, seqlen)
    holdout: torch.Tensor | None  # the held-out sequences of a search / model safeguard
    batch_size: int
    executor: Executor
    resume: ResumeState | None = None
    storage: DiskBlocks | None = None  # --offload disk: the blocks' files
    notes: list[str] = field(default_factory=list)
    timings: dict[str, float] = field(default_factory=dict)
    t_start: float = 0.0
    calibration_data: CalibrationData | None = None  # None: the caller gave the sequences


def _compute_device(model: nn.Module, config: PruneConfig, device) -> torch.device:
    dev = torch.device(device) if device is not None else model_device(model)
    if config.run.offload and dev.type == "cpu" and torch.cuda.is_available():
        dev = torch.device("cuda")
    return dev


def _split_holdout(ids: torch.Tensor, holdout: int, ranks: Ranks):
    """(sequences to prune with, the last `holdout` held out or None), each rank given one or
    more."""
    held = None
    if holdout:
        if holdout >= ids.shape[0]:
            raise TrimpruneError(
                f"{{search_holdout}} {holdout} leaves none of the {ids.shape[0]} calibration "
                "sequences to prune with: use more {nsamples} or a smaller {search_holdout}"
            )
        ids, held = ids[: ids.shape[0] - holdout], ids[ids.shape[0] - holdout :]
    if ids.shape[0] < ranks.world:
        raise TrimpruneError(
            f"{ids.shape[0]} calibration sequences cannot be shared by {ranks.world} processes: "
            f"use {{nsamples}} {ranks.world} or more, or fewer processes"
        )
    return ids, held


def _open_resume(config: PruneConfig, adapter, ids, dev, ranks: Ranks, progress: Progress):
    """The resume state of `config.run.checkpoint_dir` checked against this run, and what it
    says."""
    if not config.run.checkpoint_dir:
        return None, []
    if ranks.parallel:
        raise TrimpruneError(
            "{checkpoint_dir} is not supported with several processes (torchrun) yet: run one "
            "process, or leave {checkpoint_dir} out"
        )
    state = ResumeState.open(
        config.run.checkpoint_dir, config, adapter, ids, resume=config.run.resume
    )
    return state, _resume_notes(state, config, dev, progress)


def resolve_inputs(
    model: nn.Module,
    tokenizer,
    config: PruneConfig,
    calibration=None,
    *,
    device=None,
    progress=True,
    profile: str = "time",
    holdout: int = 0,
    storage: DiskBlocks | None = None,
) -> RunInputs:
    """Everything a prune of `model` needs before its first forward: the compute device, the
    calibration sequences (built from `config.calib` when `calibration` is None) less the last
    `holdout`, the batch size, the resume state (a resumed run takes the interrupted run's automatic
    batch size) and the executor. `storage`: the `DiskBlocks` of a model loaded with
    offload="disk" (`LoadedModel.storage`), checked against `config.run.offload`."""
    t_start = time.perf_counter()
    ranks = Ranks.current()
    shown = Progress.of(progress if ranks.main else False)
    adapter = ModelAdapter.from_model(model)
    storage = check_disk_prune(model, config, ranks, calibration is None, storage)
    dev = _compute_device(model, config, device)
    calibration_data = None
    if calibration is None:
        c = config.calib
        what = "sampling" if c.source == "self" else "reading"
        with shown.stage(
            f"calibration: {what} {c.nsamples} sequences of {c.seqlen} tokens ({c.source})"
        ):
            calibration, calibration_data = load_calibration(c, tokenizer, model, progress=shown)
    else:
        adapter.check_context(_as_ids(calibration).shape[1], "{seqlen}")
    timings = {"calibration_data_seconds": time.perf_counter() - t_start}
    ids, held = _split_holdout(_as_ids(calibration), holdout, ranks)
    batch_size = auto_batch_size(adapter, config, dev, next(model.parameters()).dtype)
    t0 = time.perf_counter()
    resume, notes = _open_resume(config, adapter, ids, dev, ranks, shown)
    if resume is not None:
        timings["checkpoint_seconds"] = time.perf_counter() - t0
        if resume.batch_size and not config.run.batch_size:
            batch_size = resume.batch_size  # the interrupted run's split (same summation order)
    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats(dev)
    ex = make_executor(dev, profile, storage=storage)
    return RunInputs(
        adapter,
        dev,
        ranks,
        shown,
        ids,
        held,
        batch_size,
        ex,
        resume,
        storage,
        notes,
        timings,
        t_start,
        calibration_data,
    )


class Session:
    """What every prune of one model from one calibration set shares, prepared once: the resolved
    inputs (`RunInputs`) and the captured block inputs. `allocate(config)` builds an allocation from
    them (a resumed run's is read from its resume state) and `run(config, allocation)` walks the
    blocks through `prune_block`; `snapshot()` / `restore()` keep and put back the dense weights of
    the prunable linears (a host copy) so that several prunes can start from the same dense model
    (the search and the model safeguard; a session with a resume state prunes once)."""

    def __init__(self, model: nn.Module, config: PruneConfig, inputs: RunInputs):
        self.model, self.config, self.inputs = model, config, inputs
        self.adapter, self.ranks, self.dev = inputs.adapter, inputs.ranks, inputs.device
        self.progress, self.ids, self.holdout = inputs.progress, inputs.ids, inputs.holdout
        self.ex, self.timings, self.t_start = inputs.executor, inputs.timings, inputs.t_start
        self.batch_size, self.resume, self.storage = (
            inputs.batch_size,
            inputs.resume,
            inputs.storage,
        )
        self.notes = list(inputs.notes)
        r = inputs.resume
        self.resumed_from_block = r.last_block if r is not None and r.last_block >= 0 else None
        self.t_prune = 0.0
        self.captured: Captured | None = None
        self.dense: dict[str, torch.Tensor] | None = None
        self.last_allocation_seconds = 0.0
        self.runs = 0
        # fused experts compute through their per-expert linears while the session is open
        self._experts = contextlib.ExitStack()
        self._experts.enter_context(routed_experts(model))

    @classmethod
    def open(
        cls,
        model: nn.Module,
        tokenizer,
        config: PruneConfig,
        calibration=None,
        *,
        device=None,
        progress=True,
        profile: str = "time",
        holdout: int = 0,
        safeguard_subset: bool | None = None,
        storage: DiskBlocks | None = None,
    ) -> Session:
        """`resolve_inputs`, then the capture of the block inputs and the weights check. `holdout`:
        the last sequences, kept out of the statistics (`Session.holdout`). `safeguard_subset`:
        whether to capture the block safeguard's subset (default: when
        `config.trim.runs_block_safeguard`)."""
        inputs = resolve_inputs(
            model,
            tokenizer,
            config,
            calibration,
            device=device,
            progress=progress,
            profile=profile,
            holdout=holdout,
            storage=storage,
        )
        self = cls(model, config, inputs)
        try:
            with self.progress.stage("calibration: capturing the inputs of the first block"):
                self.capture(
                    config.trim.runs_block_safeguard
                    if safeguard_subset is None
                    else safeguard_subset
                )
            check_dense_weights(self.adapter, self.ex)
        except BaseException:
            self.close()
            raise
        return self

    def capture(self, block_safeguard: bool) -> None:
        """This rank's share of the calibration batches (and the block safeguard's subset with
        `block_safeguard`) through the model up to every block: `self.captured`."""
        config, ids, ranks, model, dev = self.config, self.ids, self.ranks, self.model, self.dev
        batches = list(ids[ranks.share(ids.shape[0])].split(self.batch_size, 0))
        self.t_prune = time.perf_counter()
        subset = None
        if (
            block_safeguard
        ):  # the block safeguard's subset: 1/8 of the calibration sequences (at least 4)
            n_sub = min(ids.shape[0], max(4, ids.shape[0] // 8))
            subset = ids[:n_sub][ranks.share(n_sub)]
        n_subset = 0 if subset is None else subset.shape[0]
        dtype = next(model.parameters()).dtype
        on_device = config.run.offload and activations_fit(
            self.adapter, sum(b.shape[0] for b in batches), n_subset, ids.shape[1], dev, dtype
        )
        with self.ex.phase("capture"):
            self.captured = capture(
                model,
                self.adapter,
                batches,
                dev,
                offload=config.run.offload,
                subset=subset,
                ex=self.ex,
                ranks=ranks,
                keep_on_device=on_device,
            )
        self.timings["capture_seconds"] = time.perf_counter() - self.t_prune

    # ------------------------------------------------------------------ dense weights
    def linears(self) -> dict[str, nn.Module]:
        """Every prunable linear, by full name."""
        return {
            self.adapter.full_name(i, n): m
            for i in range(self.adapter.num_blocks)
            for n, m in self.adapter.linears(i).items()
        }

    def snapshot(self) -> None:
        """A host copy of the prunable linears' (dense) weights, for `restore`."""
        if self.storage is not None:
            raise TrimpruneError(
                "{offload} disk prunes once (each pruned block goes to the output as it is done): "
                "{allocation} search and {trim_guard} model need {offload} cpu"
            )
        self.dense = {k: m.weight.data.to("cpu", copy=True) for k, m in self.linears().items()}

    def restore(self) -> None:
        """The weights of `snapshot` back into the model (in place: offloaded blocks keep their
        pinned memory)."""
        if self.dense is None:
            raise RuntimeError("Session.restore() needs a snapshot() first")
        for k, m in self.linears().items():
            m.weight.data.copy_(self.dense[k])

    # ------------------------------------------------------------------ prunes
    def allocate(self, config: PruneConfig) -> Allocation:
        """The allocation `config.allocation` names (OWL walks the captured activations through the
        model, which must be dense then); a resumed run's is the one its resume state saved. In a
        data-parallel run, rank 0's."""
        t0 = time.perf_counter()
        with self.ex.phase("allocation"):
            allocation = self.resume.allocation() if self.resume is not None else None
            if allocation is None:
                allocation = build_allocation(
                    config,
                    self.adapter,
                    self.captured,
                    self.ex,
                    progress=self.progress,
                    model=self.model,
                    ids=self.ids,
                )
                if allocation.details.get("warning"):
                    self.progress.message(allocation.details["warning"])
            if (
                self.ranks.parallel
            ):  # rank 0's (computed alike on every rank; one copy rules out any drift)
                allocation = self.ranks.gather(allocation)[0]
        self.last_allocation_seconds = time.perf_counter() - t0
        return allocation

    def run(
        self,
        config: PruneConfig,
        allocation: Allocation,
        after_block: Callable[[int], None] | None = None,
    ) -> PruneResult:
        """Prune the model in place with `allocation` (the walk of `prune_block` over the captured
        inputs). With a resume state: the allocation is saved first (unless it holds it), blocks
        it holds are restored, and every finished block is committed. `after_block(i)`: called
        once block i is pruned (no resume state); what it raises ends the walk there."""
        ex, resume = self.ex, self.resume
        if (resume is not None or self.storage is not None) and (
            self.runs or config != self.config
        ):
            raise RuntimeError(
                "a Session with a resume state or --offload disk prunes once, with the config it "
                "was opened with"
            )
        if resume is not None:
            t0 = time.perf_counter()
            resume.begin(self.batch_size, self.dev)
            if resume.state.get("allocation") is None:
                resume.save_allocation(allocation, self.batch_size, self.dev)
            self.timings["checkpoint_seconds"] += time.perf_counter() - t0
        self.runs += 1
        plan = Plan.make(
            config,
            allocation.per_linear,
            self.adapter.full_name,
            make_scorer(config.scorer, ex),
            self.captured.exec_device,
            ex,
            self.ranks,
        )
        with (
            self.storage.pruning() if self.storage is not None else contextlib.nullcontext()
        ):  # blocks written as done
            records = _walk(
                self.model,
                self.adapter,
                self.captured,
                plan,
                config,
                ex,
                self.progress,
                resume,
                self.timings,
                (lambda i, _s: after_block(i)) if after_block and resume is None else None,
            )
        timings = self._timings()
        warning = allocation.details.get("warning")
        notes = (
            self.notes
            + ([warning] if warning else [])
            + [
                f"{name}: SparseGPT {r.scorer_info.fallback}"
                for name, r in records.layers.items()
                if r.scorer_info is not None and r.scorer_info.fallback
            ]
        )
        return PruneResult(
            config=config,
            layers=records.layers,
            allocation=allocation,
            masks=records.masks,
            timings=timings,
            block_safeguard=records.block_safeguard,
            phases=ex.phases,
            calibration_shape=tuple(self.ids.shape),
            notes=notes,
            resumed_from_block=self.resumed_from_block,
            moe_fallback=dict(records.moe_fallback),
            coverage=Coverage.of(self.adapter),
            excluded=self.adapter.excluded,
            calibration_data=self.inputs.calibration_data,
        )

    def _timings(self) -> dict:
        """The run's timings so far (synchronised with the device first)."""
        if self.dev.type == "cuda":
            torch.cuda.synchronize(self.dev)
        ph = self.ex.phases.totals
        timings = dict(self.timings, allocation_seconds=self.last_allocation_seconds)
        timings.update(
            prune_seconds=time.perf_counter() - self.t_prune,
            trim_search_seconds=ph.get("trim search", 0.0),
            mask_and_update_seconds=ph.get("masks", 0.0),
            block_safeguard_seconds=ph.get("block safeguard", 0.0),
            total_seconds=time.perf_counter() - self.t_start,
        )
        if self.dev.type == "cuda":
            timings["peak_gpu_memory_gb"] = torch.cuda.max_memory_allocated(self.dev) / 2**30
        return timings

    def prune_all(self, config: PruneConfig, allocation: Allocation | None) -> PruneResult:
        """The final prune of a search or model safeguard: from the dense weights, with the
        selected `config` and `allocation`, on every calibration sequence (the held-out ones
        joined back: the selection was made on them, the model is pruned with them). The captured
        inputs are replaced by those of all sequences. `allocation` None: `config`'s, computed
        from all of them (OWL's outlier ratios see every sequence, as in a plain prune)."""
        if self.holdout is not None:
            self.restore()
            self.captured = None  # freed before the larger capture
            self.ids, self.holdout = torch.cat([self.ids, self.holdout]), None
            self.capture(config.trim.runs_block_safeguard)
        return self.run(config, allocation if allocation is not None else self.allocate(config))

    def close(self) -> None:
        self.ex.close()
        self.dense = None
        self._experts.close()


def _resume_notes(resume: ResumeState, config: PruneConfig, dev, progress: Progress) -> list[str]:
    """What a run with a resume state says (the log line and the report's notes)."""
    where, n = config.run.checkpoint_dir, resume.identity["model"]["num_blocks"]
    notes = []
    if config.run.resume and resume.state is None:
        notes.append(f"--resume: no resume state in {where}; started from block 0")
    elif resume.state is not None and resume.last_block < 0:
        notes.append(
            f"--resume: the resume state in {where} held the allocation only; started from block 0"
        )
    elif resume.state is not None:
        k = resume.last_block
        rest = f"blocks {k + 1}..{n - 1} pruned now" if k + 1 < n else "none left to prune"
        notes.append(
            f"resumed from the resume state in {where}: blocks 0..{k} of {n} restored (pruned by "
            f"an earlier process), {rest}; timings cover this process only"
        )
        if (
            config.run.batch_size
            and resume.batch_size
            and config.run.batch_size != resume.batch_size
        ):
            notes.append(
                f"--batch-size {config.run.batch_size} differs from the interrupted run's "
                f"{resume.batch_size}: "
                "results equal an uninterrupted run up to floating-point summation order"
            )
        dnote = resume.note_device(dev)
        if dnote:
            notes.append(dnote)
    for line in notes[:1]:
        progress.message(line)
    return notes
