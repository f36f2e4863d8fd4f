"""One decoder block: statistics -> groups -> TRIM -> masks -> safeguards -> a `BlockDecision`.

In a block, linears that read the same input form a group (q/k/v, gate/up) and share one set of
statistics. Each linear gets the scorer's own outcome ("scorer alone"); with TRIM, a search first
chooses per-row sparsities (batched over the block's linears of equal shape), the scorer builds the
mask with those row counts (SparseGPT also reconstructs), and the safeguards keep TRIM only where it
does not lose to the scorer alone (`trim.safeguard`). The decision is final when `prune_block`
returns: weights are set, and the records are a `Deferred` the executor resolves (its host copy may
still be under way).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import Any, cast

import torch

from trimprune.algo.masks import pack_mask, row_ranks
from trimprune.algo.scorers import Member, Outcome, Scorer, Target
from trimprune.algo.stats import InputStats, StatsNeeds
from trimprune.algo.trim.evaluators import ExplicitSpec, GramSpec, ObsEvaluator, ObsSpec
from trimprune.algo.trim.results import SearchTensors, summarize
from trimprune.algo.trim.safeguard import (
    BlockSafeguard,
    Found,
    TrimChoice,
    block_safeguard,
    linear_safeguard,
)
from trimprune.algo.trim.search import PendingSearch, SearchBatch, TrimSearch, TrimSettings
from trimprune.algo.trim.steer import steer_groups
from trimprune.config import PruneConfig
from trimprune.core.model import set_weight_2d, weight_2d
from trimprune.core.ranks import SOLO, Ranks
from trimprune.core.records import (
    BlockChoice,
    BlockSafeguardRecord,
    Kept,
    LinearRecord,
    Reconstruction,
    TrimRecord,
)
from trimprune.core.runtime import EAGER, Deferred, Executor
from trimprune.errors import TrimpruneError

# scorer-alone masks of mask scorers are made while the searches run for blocks up to this many
# weights (their outcomes are held until used)
EARLY_ALONE_MAX_WEIGHTS = 2**26
# the groups of a block are decided in parts of consecutive groups of about this many weights at
# most (`_parts`): one scorer call per part (`Scorer.prune_groups`) bounds the float32 copies and
# outcomes held at once
PART_WEIGHTS = 2**29
# TRIM candidates (rates x weights) of the searches in flight at once: more are launched only once
# these are collected (a Llama-8B block: 2.2e9; a Qwen3-30B-A3B block's 384 experts: 6e9)
WAVE_ELEMENTS = 2**32


@dataclass
class Plan:
    """What every block of one prune shares: the config, the per-linear targets (the allocation),
    the scorer, the TRIM search and the statistics they need."""

    config: PruneConfig
    targets: dict[str, float]  # full linear name -> target sparsity
    full_name: Callable[[int, str], str]
    scorer: Scorer
    search: TrimSearch | None
    needs: StatsNeeds
    device: torch.device  # where the blocks are computed
    ranks: Ranks = SOLO  # the processes of a data-parallel run

    @classmethod
    def make(
        cls,
        config: PruneConfig,
        targets: dict[str, float],
        full_name,
        scorer: Scorer,
        device,
        ex: Executor = EAGER,
        ranks: Ranks = SOLO,
    ) -> Plan:
        trim, mode = config.trim, config.trim.input_mode
        needs = StatsNeeds(
            sqnorm=True,
            gram=scorer.needs_gram or (trim.enabled and mode.mode == "all"),
            last_token=trim.enabled and mode.mode == "last-token",
            sample=(mode.sample or 0) if trim.enabled and mode.mode == "sample" else 0,
            seed=config.calib.seed,
        )
        search = TrimSearch(TrimSettings.from_config(trim), ex) if trim.enabled else None
        return cls(config, targets, full_name, scorer, search, needs, torch.device(device), ranks)

    def owners(self, run, groups: list[list[str]]) -> list[int]:
        """The rank that decides each group of a block (all 0 in one process), balanced by
        weights."""
        return self.ranks.assign([sum(run.linears[n].weight.numel() for n in g) for g in groups])

    @property
    def steers(self) -> bool:
        """TRIM steers a reconstructing scorer's selection (`trim.steer`) instead of fixing its row
        counts."""
        return (
            self.search is not None
            and self.scorer.reconstructs
            and self.config.trim.sparsegpt == "steer"
        )

    def searched(self, target: float) -> bool:
        """Whether TRIM searches the row sparsities of a linear with this target (strictly inside
        the bounds)."""
        return self.search is not None and 0.0 < target < self.config.trim.max_row_sparsity

    def searches(self, target: float, stats: InputStats) -> bool:
        """`searched`, and TRIM has tokens to measure on: a routed expert that saw no last token
        (or no sampled token) keeps the scorer's outcome."""
        return self.searched(target) and stats.kept_tokens(self.config.trim.input_mode.mode) > 0


@dataclass
class LinearChoice:
    """A linear's outcome in its block, once its weight is set: the chosen mask and solver info, and
    the TRIM choice when it was searched."""

    name: str
    full: str
    shape: tuple[int, int]
    target: float
    group: tuple[str, ...]
    mask: torch.Tensor
    info: Reconstruction | None
    trim: TrimChoice | None = None


@dataclass
class BlockDecision:
    """What `prune_block` decided: the block's weights are set; `records` resolves to
    `BlockRecords`; the block safeguard's outputs on its subset streams, for the next block."""

    index: int
    records: Deferred
    subset_dense: list[torch.Tensor] | None = None
    subset_pruned: list[torch.Tensor] | None = None


@dataclass
class BlockRecords:
    block: int
    linears: dict[str, LinearRecord]  # full linear name -> record
    safeguard: BlockSafeguardRecord | None  # the block safeguard's record
    masks: dict[str, torch.Tensor]  # full linear name -> bit-packed mask (host)

    @classmethod
    def merge(cls, parts: list[BlockRecords], order: list[str]) -> BlockRecords:
        """One block's records from the ranks that decided its linears, in model order (`order`:
        full linear names). The block safeguard's record names the linears kept TRIM on any rank."""
        linears = {k: v for p in parts for k, v in p.linears.items()}
        masks = {k: v for p in parts for k, v in p.masks.items()}
        safeguards = [p.safeguard for p in parts if p.safeguard is not None]
        safeguard = None
        if safeguards:
            names = tuple(sorted({n for g in safeguards for n in g.linears}))
            safeguard = replace(safeguards[0], linears=names)
        return cls(
            parts[0].block,
            {k: linears[k] for k in order if k in linears},
            safeguard,
            {k: masks[k] for k in order if k in masks},
        )


# ----------------------------------------------------------------------------------------- the step
def prune_block(run, plan: Plan, ex: Executor = EAGER) -> BlockDecision:
    """Prune one block (`run`: a `engine.walk.BlockRun`): statistics, TRIM searches, masks,
    safeguards."""
    if plan.config.calib.input_recalc:
        return _prune_block_recalc(run, plan, ex)
    block_safeguarded = plan.config.trim.runs_block_safeguard
    with ex.phase("statistics"):
        hooks = run.statistics(plan.needs, ex)
    groups = [g for g in hooks.groups if g]
    owners = plan.owners(run, groups)
    mine = [g for g, o in zip(groups, owners) if o == plan.ranks.rank]  # every group in one process
    # without TRIM the float32 working copies of the groups exist only while their part (`_parts`)
    # is decided
    lazy = plan.search is None
    members = {} if lazy else {n: _member(run, plan, n) for g in mine for n in g}
    with ex.phase("trim search"):
        searches = Searches.launch(plan, members, {n: hooks.stats_for(n) for n in members})
    dense_sub = alone_sub = None
    if block_safeguarded:
        with ex.phase("block safeguard"):
            dense_sub = run.dense_subset()  # the block is still dense
    alone: dict[str, Outcome] = {}
    # mask scorers select row by row: their scorer-alone masks do not depend on the searches, so
    # they are made (and, for the block safeguard, the scorer-alone block run) while the searches
    # run
    if (
        not lazy
        and not plan.scorer.reconstructs
        and sum(m.weight.numel() for m in members.values()) <= EARLY_ALONE_MAX_WEIGHTS
    ):
        with ex.phase("masks"):
            alone = _scorer_alone(
                plan, searches, [([members[n] for n in g], hooks.stats_for(g[0])) for g in mine]
            )
        if (
            block_safeguarded
            and searches.names
            and all(n in alone for n in members)
            and not plan.ranks.parallel
        ):
            with ex.phase("block safeguard"):
                for n in members:
                    set_weight_2d(run.linears[n], alone[n].weight)
                alone_sub = run.pruned_subset()
    with ex.phase("trim search"):
        found = searches.finish(plan)
    choices = []
    # a scorer that solves groups together (SparseGPT) gets parts of many groups; the others one
    # group at a time, so that without TRIM one group's working copies exist at once
    for part in _parts(run, mine) if plan.scorer.reconstructs else [[g] for g in mine]:
        ms = {n: _member(run, plan, n) for g in part for n in g} if lazy else members
        groups_ms = [([ms[n] for n in g], hooks.stats_for(g[0])) for g in part]
        choices += _decide_groups(run, plan, groups_ms, searches, found, alone, ex)
    shared: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
    for g, o in zip(groups, owners):
        shared |= _share(run, plan, g, o, choices, hooks.stats_for)
    return _conclude(run, plan, choices, dense_sub, alone_sub, shared, ex)


def _prune_block_recalc(run, plan: Plan, ex: Executor) -> BlockDecision:
    """Input recalculation: each group's statistics are gathered with the earlier groups pruned."""
    dense_sub = None
    if plan.config.trim.runs_block_safeguard:
        with ex.phase("block safeguard"):
            dense_sub = run.dense_subset()
    with ex.phase("statistics"):
        hooks = run.statistics(plan.needs, ex)
    groups = [g for g in hooks.groups if g]
    choices: list[LinearChoice] = []
    shared: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
    for k, (g, owner) in enumerate(zip(groups, plan.owners(run, groups))):
        if k:
            with ex.phase("statistics"):
                hooks = run.statistics(plan.needs, ex, only=set(g), stop=True)
        if owner == plan.ranks.rank:
            members = {n: _member(run, plan, n) for n in g}
            with ex.phase("trim search"):
                searches = Searches.launch(plan, members, {n: hooks.stats_for(n) for n in g})
                found = searches.finish(plan)
            group = (list(members.values()), hooks.stats_for(g[0]))
            choices += _decide_groups(run, plan, [group], searches, found, {}, ex)
        # the next group's statistics see these weights
        shared |= _share(run, plan, g, owner, choices, hooks.stats_for)
    return _conclude(run, plan, choices, dense_sub, None, shared, ex)


# ------------------------------------------------------------------------------------------ parts
def _member(run, plan: Plan, name: str) -> Member:
    """A linear to prune: a float32 (float64 for float64 models) copy of its weight on the compute
    device (a copy: the module's weight is overwritten while this one is still the dense reference),
    its target."""
    nm = plan.config.nm
    w = weight_2d(run.linears[name])
    W = w.to(plan.device, torch.float64 if w.dtype == torch.float64 else torch.float32, copy=True)
    full = plan.full_name(run.index, name)
    if nm is not None and W.shape[1] % nm[1]:
        raise TrimpruneError(
            f"{full} has {W.shape[1]} inputs, not a multiple of M={nm[1]}: {{mask_structure}} "
            f"{plan.config.mask_structure} cannot be applied"
        )
    return Member(name, W, Target(sparsity=plan.targets[full], nm=nm))


def _measure_spec(plan: Plan, stats: InputStats):
    """The evaluator (spec, source) that measures candidate weights of a linear reading `stats`."""
    trim = plan.config.trim
    mode = trim.input_mode
    if mode.mode == "all":
        return GramSpec(stats.n_tokens, trim.precision), stats.gram
    return ExplicitSpec(), stats.explicit_inputs(mode.mode)


def _search_spec(plan: Plan, stats: InputStats, weight: torch.Tensor, importance: torch.Tensor):
    """The evaluator of the search: the measuring one, except that with a reconstructing scorer
    (SparseGPT) on all tokens the search uses the OBS prediction of the reconstructed weights'
    quality."""
    if plan.config.trim.input_mode.mode == "all" and plan.scorer.reconstructs:
        return ObsSpec(stats.n_tokens), ObsEvaluator.table_for(
            weight, importance, cast(torch.Tensor, stats.gram)
        )
    return _measure_spec(plan, stats)


def _search_class(plan: Plan, member: Member, tokens: int) -> tuple:
    """Linears searched in one batch share this key: their shape, and the number of tokens
    measured (experts see fewer) where it matters: explicit inputs, or a metric normalised by it
    (on the Gram matrix, the cosines do not read it)."""
    t = plan.config.trim
    counts = t.input_mode.mode != "all" or t.metric in ("mse", "mse_dim", "snr")
    counts = counts or t.dim_metric == "mse"
    return (tuple(member.weight.shape), member.weight.dtype, tokens if counts else 0)


@dataclass
class Searches:
    """The TRIM searches of a block (of a group, with input recalculation): batches of same-shape
    linears, launched together so that they overlap on the device."""

    launched: list[tuple[list[Member], PendingSearch]]
    ranks: dict[str, torch.Tensor]  # row ranks of a mask scorer's importance, reused for the masks
    names: set[str]  # the searched linears
    found: dict[str, Found] = field(default_factory=dict)  # the results of finished waves

    @classmethod
    def launch(
        cls, plan: Plan, members: dict[str, Member], stats: dict[str, InputStats]
    ) -> Searches:
        if plan.search is None:
            return cls([], {}, set())
        mode = plan.config.trim.input_mode.mode
        tokens = {n: stats[n].kept_tokens(mode) for n in members}
        todo = [m for m in members.values() if plan.searches(m.target.sparsity, stats[m.name])]
        if plan.steers:  # searched while the scorer solves (`_decide_steered`)
            return cls([], {}, {m.name for m in todo})
        classes: dict = {}
        for m in todo:
            classes.setdefault(_search_class(plan, m, tokens[m.name]), []).append(m)
        out = cls([], {}, {m.name for m in todo})
        per_matrix = len(plan.search.all_lrs)
        in_flight = 0
        for ms in classes.values():
            step = max(1, int(2**28 // (per_matrix * ms[0].weight.numel())))
            for chunk in (ms[a : a + step] for a in range(0, len(ms), step)):
                size = per_matrix * sum(m.weight.numel() for m in chunk)
                if in_flight and in_flight + size > WAVE_ELEMENTS:  # e.g. the many experts of a
                    out.found |= out._collect(plan)  # MoE block: a wave is collected first
                    in_flight = 0
                out.launched.append((chunk, plan.search.launch(out._batch(plan, chunk, stats))))
                in_flight += size
        return out

    def _batch(self, plan: Plan, chunk: list[Member], stats: dict[str, InputStats]) -> SearchBatch:
        scorer = plan.scorer
        importance = [scorer.importance(m.weight, stats[m.name]) for m in chunk]
        specs = [
            _search_spec(plan, stats[m.name], m.weight, imp) for m, imp in zip(chunk, importance)
        ]
        srcs = [src for _, src in specs]
        same = all(x is srcs[0] for x in srcs)
        src = srcs[0].unsqueeze(0).expand(len(chunk), *srcs[0].shape) if same else torch.stack(srcs)
        ranks = torch.stack([row_ranks(imp) for imp in importance])
        if scorer.selects_by_row_ranks and not scorer.reconstructs:
            self.ranks.update(
                {m.name: ranks[j] for j, m in enumerate(chunk)}
            )  # reused for the masks
        return SearchBatch(
            specs[0][0],
            torch.stack([m.weight for m in chunk]),
            src,
            ranks,
            [m.target.sparsity for m in chunk],
            [
                scorer.pruned_count(m.weight.shape[0], m.weight.shape[1], m.target.sparsity)
                for m in chunk
            ],
        )

    def finish(self, plan: Plan) -> dict[str, Found]:
        found, self.found = self.found | self._collect(plan), {}
        return found

    def _collect(self, plan: Plan) -> dict[str, Found]:
        """The results of the searches in flight; their batches are released."""
        if not self.launched:
            return {}
        assert plan.search is not None  # searches were launched
        results = plan.search.finish([p for _, p in self.launched])
        found = {
            m.name: Found(res, j)
            for (chunk, _), res in zip(self.launched, results)
            for j, m in enumerate(chunk)
        }
        self.launched = []
        return found

    def with_ranks(self, members: list[Member]) -> list[Member]:
        """The members with the row ranks of their search, where there was one (reused for the
        masks)."""
        return [
            Member(m.name, m.weight, replace(m.target, ranks=self.ranks.get(m.name)))
            for m in members
        ]


def _needs_alone(plan: Plan, searches: Searches, name: str) -> bool:
    """Whether the scorer-alone outcome of a linear is needed: it is not searched, or the safeguard
    compares against it."""
    return name not in searches.names or plan.config.trim.safeguard


def _parts(run, groups: list[list[str]]) -> list[list[list[str]]]:
    """The groups in k = ceil(weights / `PART_WEIGHTS`) parts of consecutive groups, of about equal
    weights (each at most weights / k plus one group)."""
    sizes = [sum(run.linears[x].weight.numel() for x in g) for g in groups]
    total = max(1, sum(sizes))
    k = -(-total // PART_WEIGHTS)
    parts: list[list[list[str]]] = [[] for _ in range(k)]
    before = 0
    for g, n in zip(groups, sizes):
        parts[before * k // total].append(g)
        before += n
    return [p for p in parts if p]


def _scorer_alone(
    plan: Plan, searches: Searches, groups: list[tuple[list[Member], InputStats]]
) -> dict[str, Outcome]:
    """The scorer alone's outcomes of the groups' linears that need one, in one scorer call."""
    asked = [
        [m for m in searches.with_ranks(ms) if _needs_alone(plan, searches, m.name)]
        for ms, _ in groups
    ]
    outs = plan.scorer.prune_groups([(ms, st) for ms, (_, st) in zip(asked, groups)])
    return {m.name: o for ms, os in zip(asked, outs) for m, o in zip(ms, os)}


@dataclass
class _Asked:
    """What one group asks of the scorer: the scorer alone's outcomes not made yet (`need`) and
    TRIM's (`trim`: the searched linears with their row counts), solved together (SparseGPT solves
    the rows of a group as one problem)."""

    names: tuple[str, ...]
    members: list[Member]  # with the row ranks of their search
    need: list[Member]
    trim: list[Member]

    @classmethod
    def of(
        cls,
        plan: Plan,
        members: list[Member],
        searches: Searches,
        found: dict[str, Found],
        alone: dict[str, Outcome],
    ) -> _Asked:
        names = tuple(m.name for m in members)
        members = searches.with_ranks(members)
        trim = [
            Member(m.name, m.weight, replace(m.target, row_counts=found[m.name].counts))
            for m in members
            if m.name in found
        ]
        need = [m for m in members if _needs_alone(plan, searches, m.name) and m.name not in alone]
        return cls(names, members, need, trim)


def _decide_groups(
    run,
    plan: Plan,
    groups: list[tuple[list[Member], InputStats]],
    searches: Searches,
    found: dict[str, Found],
    alone: dict[str, Outcome],
    ex: Executor,
) -> list[LinearChoice]:
    """The outcomes of the groups (members, statistics) in one scorer call (`Scorer.prune_groups`:
    SparseGPT solves same-shape groups, e.g. a MoE block's experts, as one batch of Algorithm 1),
    then each group's decisions (`_decide_group`). Sets the chosen weights."""
    if plan.steers:
        return _decide_steered(run, plan, groups, searches, ex)
    asked = [_Asked.of(plan, ms, searches, found, alone) for ms, _ in groups]
    with ex.phase("masks"):
        outs = plan.scorer.prune_groups(
            [(a.need + a.trim, st) for a, (_, st) in zip(asked, groups)]
        )
    choices = []
    for a, (_, st), o in zip(asked, groups, outs):
        choices += _decide_group(run, plan, a, o, st, found, alone, ex)
    return choices


def _decide_group(
    run,
    plan: Plan,
    asked: _Asked,
    outs: list[Outcome],
    stats: InputStats,
    found: dict[str, Found],
    alone: dict[str, Outcome],
    ex: Executor,
) -> list[LinearChoice]:
    """One group's choices from the scorer's outcomes (`outs`, for `asked.need + asked.trim`): the
    scorer alone's outcome, or each searched linear's own safeguard between it and TRIM's. Sets the
    chosen weights."""
    names, members, need = asked.names, asked.members, asked.need
    base = {m.name: o for m, o in zip(need, outs[: len(need)])} | {
        n: alone[n] for n in names if n in alone
    }
    trim_out = {m.name: o for m, o in zip(asked.trim, outs[len(need) :])}
    evaluator: list[Any] = []

    def measure():  # one evaluator per group, made when first needed
        if not evaluator:
            spec, src = _measure_spec(plan, stats)
            evaluator.append(spec.build(src, ex))
        return evaluator[0]

    choices = []
    exact = plan.search is not None and plan.search.cfg.rounding == "exact"
    for m in members:
        trim = None
        chosen = base.get(m.name)
        if m.name in found:
            trim = linear_safeguard(
                m,
                found[m.name],
                trim_out[m.name],
                base.get(m.name),
                plan.config.trim,
                plan.scorer,
                exact,
                measure,
            )
            chosen = trim.chosen
        assert chosen is not None  # the scorer alone's outcome, or the safeguard's choice
        set_weight_2d(run.linears[m.name], chosen.weight)
        if trim is not None and not plan.config.trim.runs_block_safeguard:
            trim = trim.settled()  # the weights are needed no more
        choices.append(
            LinearChoice(
                m.name,
                plan.full_name(run.index, m.name),
                cast("tuple[int, int]", tuple(m.weight.shape)),
                m.target.sparsity,
                names,
                chosen.mask,
                chosen.info,
                trim,
            )
        )
    return choices


def _decide_steered(
    run,
    plan: Plan,
    groups: list[tuple[list[Member], InputStats]],
    searches: Searches,
    ex: Executor,
) -> list[LinearChoice]:
    """TRIM steering the scorer (`trim.steer.steer_groups`): the scorer alone's outcome of every
    linear and the steered search of the searched ones, which keep TRIM's outcome only where it
    beats the scorer alone's (the linear safeguard, on or off). Sets the chosen weights."""

    def measure(g: int):  # one evaluator per linear: `prepare` binds it to the linear's weight
        spec, src = _measure_spec(plan, groups[g][1])
        return spec.build(src, ex)

    assert plan.search is not None  # plan.steers
    with ex.phase("trim search"):
        alone, steered = steer_groups(
            plan.scorer, groups, lambda m: m.name in searches.names, measure, plan.search.cfg
        )
    choices = []
    for (ms, _), outs in zip(groups, alone):
        names = tuple(m.name for m in ms)
        for m, o in zip(ms, outs):
            trim, chosen = None, o
            st = steered.get(m.name)
            if st is not None:
                chosen = st.trim
                trim = TrimChoice(
                    Found(st.tensors, 0),
                    st.trim,
                    st.alone,
                    st.trim_metric,
                    st.alone_metric,
                    st.keep,
                    (st.trim.info, st.alone.info),
                )
                if not plan.config.trim.runs_block_safeguard:
                    trim = trim.settled()  # the weights are needed no more
            set_weight_2d(run.linears[m.name], chosen.weight)
            choices.append(
                LinearChoice(
                    m.name,
                    plan.full_name(run.index, m.name),
                    cast("tuple[int, int]", tuple(m.weight.shape)),
                    m.target.sparsity,
                    names,
                    chosen.mask,
                    chosen.info,
                    trim,
                )
            )
    return choices


def _share(
    run,
    plan: Plan,
    group: list[str],
    owner: int,
    choices: list[LinearChoice],
    stats_for: Callable[[str], InputStats],
) -> dict:
    """Every rank gets the weights of a group from the rank that decided it (nothing moves in one
    process). Returns, for the block safeguard, each searched linear's (chosen, scorer-alone)
    weights."""
    block_safeguarded = plan.config.trim.runs_block_safeguard
    mine = {c.name: c for c in choices if c.name in group}
    out = {}
    for n in group:
        c = mine.get(n)
        if plan.ranks.parallel:
            plan.ranks.broadcast_(run.linears[n].weight.data, owner)
        target = plan.targets[plan.full_name(run.index, n)]
        if not block_safeguarded or not plan.searches(target, stats_for(n)):
            continue
        if c is not None:
            # searched linears keep both outcomes while the block safeguard is on
            t = cast(TrimChoice, c.trim)
            out[n] = (cast(Outcome, t.chosen).weight, cast(Outcome, t.alone).weight)
        else:
            w = weight_2d(run.linears[n])
            alone = torch.empty(
                tuple(w.shape),
                dtype=torch.float64 if w.dtype == torch.float64 else torch.float32,
                device=w.device,
            )
            out[n] = (w.clone(), alone)
        if plan.ranks.parallel:
            plan.ranks.broadcast_(out[n][1], owner)
    return out


def _mask_stats(mask: torch.Tensor) -> torch.Tensor:
    """Pruned weights of the matrix and the min / max / std of the pruned weights per row (float64,
    (4,))."""
    row = mask.sum(1, dtype=torch.float64)
    return torch.stack(
        [row.sum(), row.min(), row.max(), row.std() if row.numel() > 1 else row.sum() * 0]
    )


def _conclude(
    run, plan: Plan, choices: list[LinearChoice], dense_sub, alone_sub, shared: dict, ex: Executor
) -> BlockDecision:
    """The block safeguard (over every searched linear of the block, `shared`), the final masks and
    the records (deferred) of this rank's linears."""
    safeguard, pruned_sub = None, None
    if plan.config.trim.runs_block_safeguard:
        with ex.phase("block safeguard"):
            pruned_sub, safeguard = block_safeguard(run, shared, dense_sub, alone_sub, plan.ranks)
    linears: dict[str, LinearTensors] = {}
    searches: dict[int, tuple[int, SearchTensors]] = {}
    for c in choices:
        mask = c.mask
        if safeguard is not None and c.trim is not None:
            mask = safeguard.choose(mask, cast(Outcome, c.trim.alone).mask)
        lin = LinearTensors(_mask_stats(mask), pack_mask(mask, to_cpu=False))
        if c.trim is not None:
            t = c.trim
            lin.trim_metric, lin.alone_metric, lin.keep = t.trim_metric, t.alone_metric, t.keep
            searches.setdefault(id(t.found.tensors), (len(searches), t.found.tensors))
        linears[c.full] = lin
    tensors = BlockTensors(linears, [res.summary_tensors() for _, res in searches.values()])
    if safeguard is not None:
        tensors.safeguard_errors = safeguard.errors
        if not isinstance(safeguard.keep, bool):
            tensors.safeguard_keep = safeguard.keep
    layout = _Layout.of(
        run.index, plan, choices, safeguard, {i: k for i, (k, _) in searches.items()}
    )
    return BlockDecision(run.index, ex.defer(tensors, layout.records), dense_sub, pruned_sub)


# ------------------------------------------------------------------------------------------ records
@dataclass
class LinearTensors:
    """One linear's results to read to the host: its final mask's statistics (`_mask_stats`), the
    bit-packed mask and, when searched, both layer metrics and its own safeguard's choice."""

    mask_stats: torch.Tensor  # float64 (4,)
    packed: torch.Tensor  # uint8, `pack_mask`
    trim_metric: torch.Tensor | None = None  # 0-dim float64
    alone_metric: torch.Tensor | None = None  # 0-dim float64
    keep: torch.Tensor | None = None  # 0-dim bool: the linear keeps TRIM


@dataclass
class BlockTensors:
    """A block's deferred results (device tensors, or their host copies once read back): one
    executor `defer` copies them all to the host (`Executor.defer`)."""

    linears: dict[str, LinearTensors]  # full linear name -> its results
    searches: list[dict[str, torch.Tensor]]  # each search's `SearchTensors.summary_tensors()`
    safeguard_errors: torch.Tensor | None = None  # the block safeguard's squared errors (2,)
    safeguard_keep: torch.Tensor | None = None  # its choice (0-dim bool) when made on the device


@dataclass
class _LinearLayout:
    full: str
    name: str
    shape: tuple[int, int]
    target_sparsity: float
    group: tuple[str, ...]
    info: Reconstruction | None  # the chosen outcome's solver info (not searched)
    search: tuple[int, int] | None = None  # (search key, index in it) when searched
    infos: tuple = (None, None)  # TRIM's and the scorer alone's solver info


@dataclass
class _Layout:
    """What the records need besides the values read back (host objects only: holding it keeps no
    device memory alive)."""

    block: int
    linears: list[_LinearLayout]
    safeguard_names: list[str] | None  # the block safeguard's linears, when it ran
    safeguard_keep: bool | None  # its choice, when made on the host
    settings: TrimSettings | None
    config: PruneConfig

    @classmethod
    def of(
        cls,
        block: int,
        plan: Plan,
        choices: list[LinearChoice],
        safeguard: BlockSafeguard | None,
        keys: dict[int, int],
    ) -> _Layout:
        lins = []
        for c in choices:
            lay = _LinearLayout(c.full, c.name, c.shape, c.target, c.group, c.info)
            if c.trim is not None:
                lay.search = (keys[id(c.trim.found.tensors)], c.trim.found.index)
                lay.infos = c.trim.infos
            lins.append(lay)
        return cls(
            block,
            lins,
            safeguard.names if safeguard is not None else None,
            safeguard.keep if safeguard is not None and isinstance(safeguard.keep, bool) else None,
            plan.search.cfg if plan.search else None,
            plan.config,
        )

    def records(self, host: BlockTensors) -> BlockRecords:
        block_keeps = True
        if self.safeguard_names is not None:
            block_keeps = (
                self.safeguard_keep
                if self.safeguard_keep is not None
                else bool(host.safeguard_keep)
            )
        linears, masks, kept_trim = {}, {}, []
        for lay in self.linears:
            got = host.linears[lay.full]
            zeros, rmin, rmax, rstd = got.mask_stats.tolist()
            cols = lay.shape[1]
            trim, info = None, lay.info
            if lay.search is not None:
                keep = bool(got.keep)
                if keep:
                    kept_trim.append(lay.name)
                k, j = lay.search
                assert self.settings is not None  # a search ran
                trim = TrimRecord(
                    summarize(host.searches[k], j, self.settings),
                    self.config.trim.metric,
                    float(cast(torch.Tensor, got.trim_metric)),
                    Kept.of(keep, block_keeps),
                    float(cast(torch.Tensor, got.alone_metric))
                    if self.config.trim.safeguard
                    else None,
                )
                info = lay.infos[0] if keep else lay.infos[1]
            linears[lay.full] = LinearRecord(
                self.block,
                lay.name,
                lay.shape,
                lay.target_sparsity,
                lay.group,
                int(zeros),
                rmin / cols,
                rmax / cols,
                rstd / cols,
                trim,
                info,
            )
            masks[lay.full] = got.packed
        safeguard = None
        if self.safeguard_names is not None and kept_trim:
            e_trim, e_alone = cast(torch.Tensor, host.safeguard_errors).tolist()
            safeguard = BlockSafeguardRecord(
                self.block,
                e_trim,
                e_alone,
                BlockChoice.TRIM if block_keeps else BlockChoice.SCORER_ALONE,
                tuple(n for n in self.safeguard_names if n in kept_trim),
            )
        return BlockRecords(self.block, linears, safeguard, masks)
