"""`prune(model, tokenizer, config, calibration)`: the one call that applies a PruneConfig.

Calibration inputs are captured once; then the engine walks the decoder blocks. In each block the
hooks gather the statistics the scorer / TRIM need, every group of linears that reads the same
input is pruned (TRIM first chooses per-row sparsities, then the scorer builds the mask and, for
SparseGPT, reconstructs), and the block's outputs are recomputed with the pruned weights.
"""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field, replace

import torch
from torch import nn

from . import engine
from .allocation.base import Allocation, from_file, uniform
from .config import PruneConfig, parse_trim_inputs
from .data import get_calibration
from .errors import TrimpruneError
from .graphs import GRAPHS, mm_out_dtype_ok
from .masks import pack_mask, row_ranks, unpack_mask
from .models import ModelAdapter, model_device, set_weight_2d, weight_2d
from .quality import ExplicitEvaluator, GramEvaluator, ObsEvaluator, layer_metric
from .scorers import Member, Outcome, SparseGPT, Target, make_scorer
from .stats import BlockHooks, StatsNeeds
from .trim import TrimSearch, TrimSettings

log = logging.getLogger("trimprune")


@dataclass
class PruneResult:
    """What `prune` did: per-linear records, the allocation, masks and timings."""

    config: PruneConfig
    layers: dict[str, dict]                      # full linear name -> record
    allocation: Allocation
    masks: dict[str, torch.Tensor] = field(repr=False, default_factory=dict)  # bit-packed (masks.pack_mask)
    timings: dict[str, float] = field(default_factory=dict)
    calibration_shape: tuple = ()
    notes: list[str] = field(default_factory=list)
    block_safeguard: list[dict] = field(default_factory=list)

    def mask(self, name: str) -> torch.Tensor:
        """The bool mask (True = pruned) of one linear, unpacked."""
        return unpack_mask(self.masks[name], self.layers[name]["shape"])

    @property
    def global_sparsity(self) -> float:
        z = sum(r["zeros"] for r in self.layers.values())
        n = sum(r["numel"] for r in self.layers.values())
        return z / n if n else 0.0

    def block_sparsity(self) -> list[float]:
        nb = max(r["block"] for r in self.layers.values()) + 1
        z, n = [0] * nb, [0] * nb
        for r in self.layers.values():
            z[r["block"]] += r["zeros"]
            n[r["block"]] += r["numel"]
        return [a / b if b else 0.0 for a, b in zip(z, n)]


def auto_batch_size(adapter: ModelAdapter, config: PruneConfig, device: torch.device, dtype: torch.dtype) -> int:
    if config.batch_size:
        return config.batch_size
    if device.type != "cuda":
        return min(config.nsamples, 8)
    cfg = adapter.model.config
    cfg = getattr(cfg, "text_config", None) or cfg
    hidden = adapter.hidden_size()
    inter = getattr(cfg, "intermediate_size", None) or getattr(cfg, "ffn_dim", None) or 4 * hidden
    per_sample = config.seqlen * (10 * hidden + 4 * inter) * torch.finfo(dtype).bits // 8
    free, _ = torch.cuda.mem_get_info(device)
    return int(max(1, min(config.nsamples, 64, (0.25 * free) // max(per_sample, 1))))


def _needs(config: PruneConfig, scorer) -> StatsNeeds:
    mode, n = parse_trim_inputs(config.trim_inputs)
    return StatsNeeds(sqnorm=True,
                      gram=scorer.needs_gram or (config.trim and mode == "all"),
                      last_token=config.trim and mode == "last-token",
                      sample=(n or 0) if config.trim and mode == "sample" else 0,
                      seed=config.seed)


def evaluator_source(config: PruneConfig, stats, search: bool = False, scorer=None, weight=None):
    """(factory, graph key, source tensor) of the TRIM metric: the Gram matrix over all tokens, or
    explicit input vectors (last tokens / a token sample). For the search with a reconstructing
    scorer (SparseGPT) on all tokens, the OBS prediction of the reconstructed weights' quality."""
    mode, _ = parse_trim_inputs(config.trim_inputs)
    if search and mode == "all" and scorer is not None and scorer.reconstructs:
        n = stats.n_tokens
        table = ObsEvaluator.table_for(weight, scorer.importance(weight, stats), stats.gram)
        return (lambda t: ObsEvaluator(t, n)), ("obs", n), table
    if mode == "all":
        n, prec = stats.n_tokens, config.trim_precision
        return (lambda g: GramEvaluator(g, n, precision=prec)), ("gram", n, prec), stats.gram
    return ExplicitEvaluator, ("explicit",), stats.explicit_inputs(mode)


class BlockPruner:
    """Prunes the groups of one block; keeps the per-linear records."""

    def __init__(self, config: PruneConfig, adapter: ModelAdapter, allocation: Allocation, captured, scorer,
                 progress: bool = False):
        self.cfg = config
        self.adapter = adapter
        self.alloc = allocation
        self.captured = captured
        self.scorer = scorer
        self.needs = _needs(config, scorer)
        self.trim = TrimSearch(TrimSettings.from_config(config)) if config.trim else None
        self.layers: dict[str, dict] = {}
        self.masks: dict[str, torch.Tensor] = {}
        self._queued: list = []
        self._staged = None
        self.t_trim = 0.0
        self.t_score = 0.0
        self.t_guard = 0.0
        # block-level safeguard: a calibration subset followed through the dense and the pruned model
        self.guard = False
        self.sub_dense: list = []
        self.sub_pruned: list = []
        self._alt: dict[str, tuple] = {}
        self._ranks: dict[str, torch.Tensor] = {}
        self._searching: set = set()
        self.block_guard: list[dict] = []

    # -------------------------------------------------------------- statistics
    def _collect(self, i: int, block: nn.Module, hidden, linears, only=None, stop=False) -> BlockHooks:
        hooks = BlockHooks(linears, self.needs, self.captured.exec_device, total_tokens=self.captured.n_tokens,
                           only=only)
        if stop and only is not None:
            hooks.stop_when_seen = set(only)
        with hooks:
            engine.forward_block_all(block, self.captured, i, hidden, on_batch_end=hooks.next_batch,
                                     keep_outputs=False)
        return hooks

    def set_guard_subset(self, sub: torch.Tensor) -> None:
        self.guard = True
        self.sub_dense, self.sub_pruned = [sub], [sub]

    def __call__(self, i: int, block: nn.Module, hidden) -> None:
        linears = self.adapter.linears(i)
        dense_out: list = []

        def meanwhile():           # work queued while this block's statistics / searches run on the device
            if self.guard:         # the subset through the still dense block (before any weight changes)
                t0 = time.perf_counter()
                dense_out.extend(engine.forward_block_all(block, self.captured, i, self.sub_dense))
                self.t_guard += time.perf_counter() - t0
            self._flush(wait=False)  # the previous block's records, if they are on the host already

        self._alt = {}
        alone_first: list = []     # the scorer-alone block's outputs on the subset, when made early
        if self.cfg.trim_input_recalc:
            meanwhile()
        hooks = self._collect(i, block, hidden, linears)
        groups = [g for g in hooks.groups if g]
        if not self.cfg.trim_input_recalc:
            members = {n: self._member(i, n, linears) for g in groups for n in g}
            pre: dict = {}

            def during():
                # while the TRIM searches run on the device: the dense subset forward, the previous
                # block's records, the scorer-alone masks (mask scorers select row by row, so they do
                # not depend on the searches; small blocks only: the outcomes are held until used) and
                # the block safeguard's forward of the scorer-alone block
                meanwhile()
                if not self.scorer.reconstructs and sum(m.weight.numel() for m in members.values()) <= 2**26:
                    for g in groups:
                        pre.update(self._base_outcomes([members[n] for n in g], hooks.stats_for(g[0])))
                    if self.guard and self._searching and all(n in pre for n in members):
                        t0 = time.perf_counter()
                        for n in members:
                            set_weight_2d(linears[n], pre[n].weight)
                        alone_first.append(engine.forward_block_all(block, self.captured, i, self.sub_pruned))
                        self.t_guard += time.perf_counter() - t0

            trim = self._trim(i, members, {n: hooks.stats_for(n) for n in members}, during=during)
            for g in groups:
                self._prune_group(i, [members[n] for n in g], linears, hooks.stats_for(g[0]), trim, pre)
        else:
            # recompute the inputs of each later group after the earlier groups are pruned
            for k, g in enumerate(groups):
                h = hooks if k == 0 else self._collect(i, block, hidden, linears, only=set(g), stop=True)
                members = {n: self._member(i, n, linears) for n in g}
                trim = self._trim(i, members, {n: h.stats_for(n) for n in g})
                self._prune_group(i, [members[n] for n in g], linears, h.stats_for(g[0]), trim)
                del h
            del hooks
        self._ranks = {}
        if isinstance(self.scorer, SparseGPT):
            self.scorer._cache = None
        if self.guard:
            t0 = time.perf_counter()
            self.sub_pruned = self._block_safeguard(i, block, linears, self.sub_pruned, dense_out,
                                                    alone_first[0] if alone_first else None)
            self.sub_dense = dense_out
            self.t_guard += time.perf_counter() - t0
        self._stage()         # copied to the host while the next block computes; read in its `meanwhile`

    def _block_safeguard(self, i: int, block: nn.Module, linears, sub: list, dense_out: list,
                         out_alone: list | None = None) -> list:
        """Keep TRIM in this block only if its output on the subset (`sub`: followed through the pruned
        model) is at least as close to the dense model's (`dense_out`: followed through the dense model;
        squared error in the residual stream) as with the scorer alone (`out_alone`: that block's
        outputs, when computed already). Returns the chosen outputs on the subset."""
        fwd = lambda: engine.forward_block_all(block, self.captured, i, sub)  # noqa: E731
        if not self._alt:
            return fwd()

        def err(out):
            return torch.stack([(o.float() - d.to(o.device).float()).square().sum(dtype=torch.float64)
                                for o, d in zip(out, dense_out)]).sum()

        out_trim = fwd()
        e_trim = err(out_trim)
        if out_alone is None:
            for name, (w_alone, _, _) in self._alt.items():
                set_weight_2d(linears[name], w_alone)
            out_alone = fwd()
        e_alone = err(out_alone)
        keep = e_trim <= e_alone
        names = sorted(self._alt)
        alone = [self._stats_of(self.adapter.full_name(i, n), self._alt[n][2]) for n in names]
        if all(o.device == keep.device for o in out_trim):
            # the choice stays on the device (no host round trip); `_flush` reads it with the statistics
            choose = lambda a, b: torch.where(keep, a, b)  # noqa: E731
        else:                                                     # outputs stored off the device: decide now
            keep_host = bool(keep)
            choose = lambda a, b: a if keep_host else b  # noqa: E731
        for name, (w_alone, w_trim, _) in self._alt.items():
            set_weight_2d(linears[name], choose(w_trim, w_alone))
        self._queued.append(("guard", i, names, torch.stack([e_trim, e_alone]), alone))
        return [choose(a, b) for a, b in zip(out_trim, out_alone)]

    # -------------------------------------------------------------- pruning
    def _member(self, i: int, name: str, linears) -> Member:
        cfg = self.cfg
        nm = cfg.nm
        w = weight_2d(linears[name])
        # always a copy: the module's weight is overwritten (scorer-alone weights for the block safeguard)
        # while this one is still the dense reference
        W = w.to(self.captured.exec_device, torch.float64 if w.dtype == torch.float64 else torch.float32, copy=True)
        if nm is not None and W.shape[1] % nm[1]:
            raise TrimpruneError(f"{self.adapter.full_name(i, name)} has {W.shape[1]} inputs, not a multiple of "
                                 f"M={nm[1]}: --mask-structure {cfg.mask_structure} cannot be applied")
        s = self.alloc.per_linear[self.adapter.full_name(i, name)]
        return Member(name, W, Target(sparsity=s, nm=nm))

    def _trim(self, i: int, members: dict[str, Member], stats: dict, during=None) -> dict:
        """TRIM row sparsities for every trimmable linear, batched over linears of equal shape.
        `during()` is called once the searches are queued on the device, before waiting for them."""
        if self.trim is None:
            self._searching = set()
            if during is not None:
                during()
            return {}
        t0 = time.perf_counter()
        cap = self.cfg.trim_max_row_sparsity
        todo = [m for m in members.values() if 0.0 < m.target.sparsity < cap]
        classes: dict = {}
        for m in todo:
            classes.setdefault((tuple(m.weight.shape), m.weight.dtype), []).append(m)
        self._ranks = {}
        self._searching = {m.name for m in todo}
        launched = []
        per_matrix = len(self.trim.all_lrs)
        for ms in classes.values():
            for chunk in _chunks(ms, max(1, int(2**28 // (per_matrix * ms[0].weight.numel())))):
                make_ev, key, srcs = None, None, []
                for m in chunk:
                    make_ev, key, src = evaluator_source(self.cfg, stats[m.name], True, self.scorer, m.weight)
                    srcs.append(src)
                same = all(x is srcs[0] for x in srcs)
                src = srcs[0].unsqueeze(0).expand(len(chunk), *srcs[0].shape) if same else torch.stack(srcs)
                W = torch.stack([m.weight for m in chunk])
                ranks = torch.stack([row_ranks(self.scorer.importance(m.weight, stats[m.name])) for m in chunk])
                if self.scorer.selects_by_row_ranks and not self.scorer.reconstructs:
                    self._ranks.update({m.name: ranks[j] for j, m in enumerate(chunk)})   # reused for the masks
                sp = [m.target.sparsity for m in chunk]
                totals = [self.scorer.pruned_count(*m.weight.shape, m.target.sparsity) for m in chunk]
                launched.append((chunk, self.trim.launch(make_ev, key, W, src, ranks, sp, totals)))
        if during is not None:
            t1 = time.perf_counter()
            during()
            t0 += time.perf_counter() - t1           # not TRIM's time
        # the searches of all shape classes run concurrently on the GPU; their results stay there (the
        # masks and choices that depend on them are queued after them) and are read with the masks
        out = {}
        for (chunk, _), res in zip(launched, self.trim.finish([p for _, p in launched], defer=True)):
            out.update({m.name: r for m, r in zip(chunk, res)})
        self.t_trim += time.perf_counter() - t0
        return out

    def _with_ranks(self, members: list[Member]) -> list[Member]:
        """The members with the row ranks of their TRIM search, where there was one (reused for masks)."""
        return [Member(m.name, m.weight, replace(m.target, ranks=self._ranks.get(m.name))) for m in members]

    def _needs_alone(self, name: str) -> bool:
        """Whether the scorer-alone outcome of a linear is needed: it is not searched, or the safeguard
        compares against it."""
        return name not in self._searching or self.cfg.trim_safeguard

    def _base_outcomes(self, members: list[Member], stats) -> dict:
        """The scorer-alone outcomes of a group that `_prune_group` will need."""
        t0 = time.perf_counter()
        ms = [m for m in self._with_ranks(members) if self._needs_alone(m.name)]
        out = dict(zip([m.name for m in ms], self.scorer.prune_group(ms, stats))) if ms else {}
        self.t_score += time.perf_counter() - t0
        return out

    def _prune_group(self, i: int, members: list[Member], linears, stats, trim_res: dict,
                     pre: dict | None = None) -> None:
        cfg = self.cfg
        names = [m.name for m in members]
        pre = pre or {}
        members = self._with_ranks(members)
        trim_members = [Member(m.name, m.weight, replace(m.target, row_counts=trim_res[m.name].counts))
                        for m in members if m.name in trim_res]
        t0 = time.perf_counter()
        need_base = [m for m in members if self._needs_alone(m.name) and m.name not in pre]
        outs = self.scorer.prune_group(need_base + trim_members, stats)
        base_out = {m.name: o for m, o in zip(need_base, outs[:len(need_base)])}
        base_out.update({n: pre[n] for n in names if n in pre})
        trim_out = {m.name: o for m, o in zip(trim_members, outs[len(need_base):])}
        self.t_score += time.perf_counter() - t0
        evaluator = None
        for m in members:
            full = self.adapter.full_name(i, m.name)
            rec = {"block": i, "name": m.name, "shape": list(m.weight.shape), "target_sparsity": m.target.sparsity,
                   "group": names}
            chosen = base_out.get(m.name)
            if m.name in trim_res:
                h = trim_res[m.name]
                # the TRIM mask is the scorer's own selection with TRIM's row counts: for mask-only scorers
                # its metric is the search's final metric; reconstructed weights are measured here
                same_rows = self.scorer.selects_by_row_ranks and not self.scorer.reconstructs
                base_is_uniform = self.scorer.alone_is_uniform_rows and self.trim.cfg.rounding == "exact"
                cand = [] if same_rows else [trim_out[m.name].weight]
                if cfg.trim_safeguard and not base_is_uniform:
                    cand.append(base_out[m.name].weight)
                vals = None
                if cand:
                    if evaluator is None:
                        make_ev, _, src = evaluator_source(cfg, stats)
                        evaluator = make_ev(src)
                    evaluator.prepare(m.weight)
                    vals = layer_metric(cfg.trim_metric, evaluator.stats_from_weight(torch.stack(cand)))
                t_metric = h.metric("final") if same_rows else vals[0]
                chosen, alone = trim_out[m.name], base_out.get(m.name)
                b_metric, keep = t_metric, torch.ones((), dtype=torch.bool, device=t_metric.device)
                if cfg.trim_safeguard:
                    # the per-linear safeguard, decided on the device: the host reads the choice later
                    b_metric = h.metric("baseline") if base_is_uniform else vals[-1]
                    keep = t_metric >= b_metric
                    chosen = Outcome(weight=torch.where(keep, chosen.weight, alone.weight),
                                     mask=torch.where(keep, chosen.mask, alone.mask), info=chosen.info)
                # the choice and its metrics, then (not read yet) the search's packed row, read with the masks
                vec = torch.stack([t_metric.double(), b_metric.double(), keep.double()])
                if h.result is None:
                    vec = torch.cat([vec, h.packed])
                self._queued.append(("trim", full, h, vec, (trim_out[m.name].info,
                                                            alone.info if alone is not None else {})))
                if self.guard:
                    self._alt[m.name] = (alone.weight, chosen.weight, alone.mask)
            set_weight_2d(linears[m.name], chosen.weight)
            if chosen.info and m.name not in trim_res:
                rec["scorer_info"] = chosen.info
            self.layers[full] = rec
            self._record(full, chosen.mask)

    @staticmethod
    def _stats_of(full: str, mask: torch.Tensor) -> tuple:
        row = mask.sum(1, dtype=torch.float64)
        st = torch.stack([row.sum(), row.min(), row.max(), row.std() if row.numel() > 1 else row.sum() * 0])
        return ("mask", full, mask.shape, st, pack_mask(mask, to_cpu=False))

    def _record(self, full: str, mask: torch.Tensor) -> None:
        """Queue the mask's statistics and bit-packed copy; `_flush` reads them back at once (a read
        per linear would stall the device once per linear)."""
        self._queued.append(self._stats_of(full, mask))

    def _stage(self) -> None:
        """Start copying the queued statistics and packed masks to the host (pinned memory, no wait)."""
        if not self._queued or self._staged is not None:
            return
        q = self._queued
        self._queued = []
        masks = [e for e in q if e[0] == "mask"] + [a for e in q if e[0] == "guard" for a in e[4]]
        order = [e for e in q if e[0] != "mask"] + masks
        # every entry's float64 vector (e[3], lengths differ), one transfer
        sizes = [e[3].numel() for e in order]
        dev_stats = torch.cat([e[3].reshape(-1).double() for e in order])
        dev_packed = torch.cat([e[4] for e in masks]) if masks else None
        if dev_stats.is_cuda:
            stats = torch.empty(dev_stats.shape, dtype=dev_stats.dtype, pin_memory=True)
            stats.copy_(dev_stats, non_blocking=True)
            packed = None
            if dev_packed is not None:
                packed = torch.empty(dev_packed.shape, dtype=dev_packed.dtype, pin_memory=True)
                packed.copy_(dev_packed, non_blocking=True)
            done = torch.cuda.Event()
            done.record()
        else:
            stats, packed, done = dev_stats, dev_packed, None
        self._staged = (q, masks, order, sizes, stats, packed, done)

    def _flush(self, wait: bool = True) -> None:
        """Read the staged mask statistics, packed masks, TRIM results and block-safeguard choices.
        `wait=False`: only if their copy is complete already (the host never waits for the device)."""
        if self._staged is None:
            self._stage()
        if self._staged is None:
            return
        q, masks, order, sizes, stats, packed, done = self._staged
        if done is not None and not wait and not done.query():
            return
        self._staged = None
        if done is not None:
            done.synchronize()
        flat, got, a = stats.tolist(), {}, 0
        for e, n in zip(order, sizes):
            got[id(e)] = flat[a:a + n]
            a += n
        # copies into pageable memory, by numpy: clone() of a pinned tensor allocates pinned memory,
        # which waits for the device, and torch's CPU copy_ wakes its thread pool, which took up to
        # tens of ms per block on the GPU machines (benchmarks/RESULTS.md, "host copies")
        parts = [torch.from_numpy(t.numpy().copy())
                 for t in packed.split([e[4].numel() for e in masks])] if masks else []
        packed = dict(zip([id(e) for e in masks], parts))

        def apply(e):
            _, full, shape, _, _ = e
            zeros, rmin, rmax, rstd = got[id(e)]
            cols = shape[1]
            numel = shape[0] * cols
            self.layers[full].update({"zeros": int(zeros), "numel": numel, "sparsity": zeros / numel,
                                      "row_sparsity_min": rmin / cols, "row_sparsity_max": rmax / cols,
                                      "row_sparsity_std": rstd / cols})
            self.masks[full] = packed[id(e)]

        def trim_record(e):
            _, full, handle, _, infos = e
            row = got[id(e)]
            t_metric, b_metric, keep = row[:3]
            info = self.trim.resolve(handle, row[3:]).summary()
            info["metric"] = self.cfg.trim_metric
            info["trim_weights_metric"] = t_metric
            info["kept"] = "trim" if keep else "scorer_alone (safeguard)"
            if self.cfg.trim_safeguard:
                info["scorer_alone_metric"] = b_metric
            rec = self.layers[full]
            rec["trim"] = info
            if infos[0 if keep else 1]:
                rec["scorer_info"] = infos[0 if keep else 1]

        for e in q:
            if e[0] == "mask":
                apply(e)
                continue
            if e[0] == "trim":
                trim_record(e)
                continue
            _, i, names, _, alone = e
            # the block safeguard concerns the linears that kept TRIM (the others were the scorer's alone)
            kept = [(n, a) for n, a in zip(names, alone) if self.layers[a[1]]["trim"]["kept"] == "trim"]
            if not kept:
                continue
            e_trim, e_alone = got[id(e)][:2]
            keep_trim = e_trim <= e_alone
            self.block_guard.append({"block": i, "err_trim": e_trim, "err_scorer_alone": e_alone,
                                     "kept": "trim" if keep_trim else "scorer_alone",
                                     "linears": [n for n, _ in kept]})
            if not keep_trim:
                for _, a in kept:
                    self.layers[a[1]]["trim"]["kept"] = "scorer_alone (block safeguard)"
                    apply(a)
        self._flush(wait)     # what was queued meanwhile, if anything


def _chunks(xs: list, k: int):
    for a in range(0, len(xs), k):
        yield xs[a:a + k]


def build_allocation(config: PruneConfig, model: nn.Module, adapter: ModelAdapter, captured=None,
                     progress: bool = False) -> Allocation:
    numels, block_of = {}, {}
    for i in range(adapter.num_blocks):
        for n, mod in adapter.linears(i).items():
            full = adapter.full_name(i, n)
            numels[full] = weight_2d(mod).numel()
            block_of[full] = i
    a = config.allocation
    if a == "uniform":
        return uniform(config.sparsity, numels, block_of)
    if a.startswith("file:"):
        return from_file(a[5:], config.sparsity, numels, block_of)
    if a == "owl":
        from .allocation.owl import owl_allocation
        return owl_allocation(config, model, adapter, captured, numels, block_of, progress=progress)
    if a == "alphapruning":
        from .allocation.alphapruning import alpha_allocation
        return alpha_allocation(config, model, adapter, numels, block_of, device=captured.exec_device)
    raise TrimpruneError(f"--allocation {a!r} is unknown")


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


def prune(model: nn.Module, tokenizer, config: PruneConfig, calibration=None, *, device=None,
          progress: bool = True) -> PruneResult:
    """Prune `model` in place following `config`; returns a `PruneResult`.

    `calibration`: a (nsamples, seqlen) LongTensor of token ids, or None to build it from
    `config.calib` (`tokenizer` is then needed). `device`: where blocks are computed (default: the
    model's device; with `config.offload` the model may live on CPU and blocks visit `device`)."""
    t_start = time.perf_counter()
    adapter = ModelAdapter.from_model(model)
    config.validate(max_context=adapter.max_context())
    dev = torch.device(device) if device is not None else model_device(model)
    if config.offload and dev.type == "cpu" and torch.cuda.is_available():
        dev = torch.device("cuda")
    timings = {}
    t0 = time.perf_counter()
    if calibration is None:
        calibration = get_calibration(config, tokenizer, model, progress=progress)
    timings["calibration_data_seconds"] = time.perf_counter() - t0
    dtype = next(model.parameters()).dtype
    bs = auto_batch_size(adapter, config, dev, dtype)
    batches = _as_batches(calibration, bs)
    n_ctx = adapter.max_context()
    if n_ctx is not None and batches[0].shape[1] > n_ctx:
        raise TrimpruneError(f"calibration sequences have {batches[0].shape[1]} tokens, above the model's "
                             f"context of {n_ctx}: use --seqlen {n_ctx} or less")
    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats(dev)
        mm_out_dtype_ok(dev)          # probe once, outside any CUDA-graph capture
    t_prune = time.perf_counter()
    guard = config.trim and config.trim_block_safeguard and config.trim_safeguard
    if guard:   # the block safeguard's subset: 1/8 of the calibration sequences (at least 4)
        n_all = sum(b.shape[0] for b in batches)
        n_sub = min(n_all, max(4, n_all // 8))
        batches = batches + [torch.cat(batches)[:n_sub]]
    captured = engine.capture(model, adapter, batches, dev, offload=config.offload)
    if guard:
        sub = captured.hidden.pop()
        batches.pop()
        captured.n_tokens -= sub.shape[0] * sub.shape[1]
    timings["capture_seconds"] = time.perf_counter() - t_prune
    t0 = time.perf_counter()
    allocation = build_allocation(config, model, adapter, captured, progress=progress)
    timings["allocation_seconds"] = time.perf_counter() - t0
    scorer = make_scorer(config)
    pruner = BlockPruner(config, adapter, allocation, captured, scorer, progress=progress)
    if guard:
        pruner.set_guard_subset(sub)
    use_cache = getattr(model.config, "use_cache", None)
    model.config.use_cache = False
    try:
        with torch.no_grad():
            engine.walk(model, adapter, captured, pruner, offload=config.offload, progress=progress,
                        desc=f"{config.scorer}{'+trim' if config.trim else ''}")
            pruner._flush()
    finally:
        if use_cache is not None:
            model.config.use_cache = use_cache
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)
    timings["prune_seconds"] = time.perf_counter() - t_prune
    timings["trim_search_seconds"] = pruner.t_trim
    timings["mask_and_update_seconds"] = pruner.t_score
    timings["block_safeguard_seconds"] = pruner.t_guard
    timings["total_seconds"] = time.perf_counter() - t_start
    if dev.type == "cuda":
        timings["peak_gpu_memory_gb"] = torch.cuda.max_memory_allocated(dev) / 2**30
    del captured
    GRAPHS.clear()
    return PruneResult(config=config, layers=pruner.layers, allocation=allocation, masks=pruner.masks,
                       timings=timings, block_safeguard=pruner.block_guard, calibration_shape=(sum(b.shape[0] for b in batches), batches[0].shape[1]))
