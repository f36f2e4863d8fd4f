"""`--allocation search` and `--trim-guard model`: several prunes from one capture, judged on
held-out calibration sequences.

Both split the last `--search-holdout` sequences off the calibration set: the statistics (and OWL's
outlier ratios) see only the others, and the held-out ones score a pruned model, by
KL(dense || pruned) per predicted token (`--search-objective kl`; the dense model's hidden states
entering the output head are computed once, before any pruning, and kept in the model's dtype:
holdout x seqlen x hidden values, on the compute device, in host memory with `--offload`; the
dense logits are recomputed from them a slice at a time, `Holdout`) or by the NLL of the next
token.

The search (Optuna's TPE, `--search-trials`, `--search-timeout`, `--search-seed`,
`--search-storage`, `--search-study`; `--search-seeds K`: K studies, seeds seed .. seed + K - 1,
each warm-started and run for the trials and timeout given, the best held-out trial of all wins and
report.json keeps every seed's best and their spread) runs its trials here, in one process
(`torchrun` is refused: several processes search together as Optuna intends, as independent
single-process searches sharing one `--search-storage`, and the winner's allocation.json then
prunes under torchrun with `--allocation file:PATH`): the block inputs are captured once
(`api.Session`), the dense weights of the prunable linears are copied to host memory once (as much
memory as those weights), and every trial restores them, builds its allocation
(`algo.allocation.search`), walks the blocks through
`prune_block` and measures the held-out objective. A trial that raises or gives a non-finite
objective is told to Optuna as pruned and the search goes on. OWL's outlier ratios come from one
dense walk for every M of the grid (before the first trial; with the `experts` space the same walk
counts every expert's routed tokens), and AlphaPruning's metrics from the weights (cached per
model). A new study's first trials are uniform and OWL / AlphaPruning / ATP with
the config's parameters (`algo.allocation.search.warm_starts`). The best trial's allocation is then
applied (with `--trim-guard model` and TRIM, model-safeguarded as below) in the final prune.

`--trim-guard model`: the same allocation is pruned without and with TRIM from the same captured
activations, and the one with the lower held-out objective is kept (TRIM on ties), so TRIM is
never worse than its scorer alone on that objective; both objectives go to report.json.

Selecting on the held-out sequences, the final model is then pruned with the choice on every
calibration sequence (`Session.prune_all`: the held-out ones joined back, captured again). Under
the model safeguard, an allocation read from the activations (OWL, expert) is computed again from
them, so the final model equals a plain prune of the choice; a search's winning allocation and a
learned one (Lua-LLM, LayerIF) are kept as selected.

Neither takes `--checkpoint-dir` (`PruneConfig` refuses it): a search resumes from its Optuna
storage instead, and its allocation.json can be pruned again with a resume state.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import time
import warnings
from collections.abc import Callable

import torch

from trimprune.algo.allocation import Allocation, linear_sizes
from trimprune.algo.allocation.alphapruning import layer_metrics, model_fingerprint
from trimprune.algo.allocation.atp import atp_block_sparsities, block_numels_of
from trimprune.algo.allocation.base import uniform
from trimprune.algo.allocation.expert import Expert
from trimprune.algo.allocation.owl import owl_from_ratios
from trimprune.algo.allocation.search import OWL_M_GRID, allocation_for, suggest, warm_starts
from trimprune.config import PruneConfig
from trimprune.core.progress import Progress
from trimprune.engine.allocate import FROM_ACTIVATIONS, dense_scores, layerif_scores_of
from trimprune.engine.walk import moe_calibration
from trimprune.errors import TrimpruneError
from trimprune.io.diskmodel import DiskBlocks
from trimprune.io.evaluate import head_is_exact, head_logits, logits_batches
from trimprune.session import PruneResult, Session


def _optuna():
    try:
        import optuna
    except ImportError:
        raise TrimpruneError(
            "{allocation} search needs Optuna: pip install 'trimprune[search]' (optuna==5.0.0)"
        ) from None
    return optuna


# ------------------------------------------------------------------------------------------
# objective
HEAD_CHUNK_BYTES = 1 << 26  # float32 logits made at once by the held-out objective (64 MiB)


class Holdout:
    """The held-out objective of `model`: `measure()` -> {"nll": ..., "kl": ...} per predicted token
    of the sequences `ids` (KL only for the objective kl). Made while the model is dense (the dense
    pass happens here).

    Logits are never held whole: each batch runs up to the output head (`io.evaluate.head_input`)
    and the head is applied `HEAD_CHUNK_BYTES` of float32 logits at a time. For KL the dense
    model's hidden states entering the head are kept (holdout x seqlen x hidden values, in the
    model's dtype) and the dense logits recomputed from them (the head is never pruned), exactly
    those of the dense forward. A family whose logits `io.evaluate.head_logits` cannot reproduce
    bit for bit (`head_is_exact`) keeps the dense log-probabilities whole instead (holdout x
    (seqlen - 1) x vocab values)."""

    def __init__(
        self,
        model,
        ids: torch.Tensor,
        kind: str,
        device,
        offload: bool = False,
        batch_size: int | None = None,
        ex=None,
        storage: DiskBlocks | None = None,
    ):
        self.model, self.kind, self.dev, self.offload, self.ex = (
            model,
            kind,
            torch.device(device),
            offload,
            ex,
        )
        self.storage = storage
        self.holdout_sequences = int(ids.shape[0])
        self.batches = list(ids.split(batch_size or (1 if offload else 4), 0))
        self.tokens = ids.shape[0] * (ids.shape[1] - 1)
        self.store = torch.device("cpu") if offload else self.dev
        self.chunked = head_is_exact(
            model, ids[:1, : min(16, ids.shape[1])], self.dev, offload, ex, storage
        )
        self.dense_hidden: list[torch.Tensor] = []  # chunked
        self.dense_logp: list[torch.Tensor] = []  # not chunked
        self.dense = self._measure(keep=kind == "kl")

    @classmethod
    def of(cls, session: Session, kind: str) -> Holdout:
        """On the session's held-out sequences, computed like its prunes."""
        run = session.config.run
        return cls(
            session.model,
            session.holdout,
            kind,
            session.dev,
            run.offload,
            run.batch_size or None,
            session.ex,
            session.storage,
        )

    @torch.no_grad()
    def _measure(self, keep: bool = False) -> dict:
        nll = torch.zeros((), dtype=torch.float64, device=self.dev)
        kl = torch.zeros((), dtype=torch.float64, device=self.dev)
        batches = logits_batches(
            self.model,
            self.batches,
            self.dev,
            self.offload,
            ex=self.ex,
            storage=self.storage,
            head=not self.chunked,
        )
        for b, (ids, out) in enumerate(batches):
            if self.chunked:
                dense = None if keep or not self.dense_hidden else self.dense_hidden[b].to(self.dev)
                n, k = self._chunked(ids, out, dense)
                if keep:
                    self.dense_hidden.append(out.to(self.store))
            else:
                n, k = self._whole(b, ids, out, keep)
            nll -= n
            kl += k
            del out
        res = {"nll": float(nll) / self.tokens}
        if (self.dense_hidden or self.dense_logp) and not keep:
            res["kl"] = float(kl) / self.tokens
        return res

    def _chunked(
        self, ids: torch.Tensor, hidden: torch.Tensor, dense: torch.Tensor | None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Sum of log p(next token) and of KL(dense || model) over a batch, from the hidden states
        entering the head (`dense`: the dense model's), a slice of positions at a time."""
        head = self.model.get_output_embeddings()
        vocab = head.weight.shape[0]
        step = max(1, HEAD_CHUNK_BYTES // (4 * vocab * ids.shape[0]))
        logp = torch.zeros((), dtype=torch.float64, device=self.dev)
        kl = torch.zeros((), dtype=torch.float64, device=self.dev)
        for a in range(0, ids.shape[1] - 1, step):
            e = min(a + step, ids.shape[1] - 1)
            lp = torch.log_softmax(head_logits(self.model, hidden[:, a:e]).float(), -1)
            logp += lp.gather(-1, ids[:, a + 1 : e + 1, None]).sum(dtype=torch.float64)
            if dense is not None:
                d = torch.log_softmax(head_logits(self.model, dense[:, a:e]).float(), -1)
                kl += (d.exp() * (d - lp)).sum(dtype=torch.float64)
                del d
            del lp
        return logp, kl

    def _whole(
        self, b: int, ids: torch.Tensor, logits: torch.Tensor, keep: bool
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """As `_chunked`, from whole logits; `keep`: the dense log-probabilities are kept."""
        lp = torch.log_softmax(logits[:, :-1].float(), -1)
        logp = lp.gather(-1, ids[:, 1:, None]).sum(dtype=torch.float64)
        kl = torch.zeros((), dtype=torch.float64, device=self.dev)
        if keep:
            self.dense_logp.append(lp.to(logits.dtype).to(self.store))
        elif self.dense_logp:
            d = self.dense_logp[b].to(self.dev).float()
            kl = (d.exp() * (d - lp)).sum(dtype=torch.float64)
        return logp, kl

    def measure(self) -> dict:
        return self._measure()

    def value(self, metrics: dict) -> float:
        return metrics[self.kind]


# ------------------------------------------------------------------------------------------ rules
class _Sources:
    """OWL's outlier ratios (every M of the grid from one dense walk), AlphaPruning's metrics and,
    with the `layerif` space, LayerIF's scores (from the sequences the statistics see; their last
    `--layerif-holdout` are its validation set), with the `lua` space Lua-LLM's thresholds (trained
    on the sequences the statistics see), computed once while the model is dense
    (`algo.allocation.search.RuleSources`)."""

    def __init__(self, session: Session, config: PruneConfig):
        self.session, self.config = session, config
        a = config.allocation
        ms = list(dict.fromkeys([*OWL_M_GRID, float(a.owl_m)]))
        s = session
        self.ratios, self.blocks = dense_scores(
            ms,
            s.adapter,
            s.captured,
            config.run.offload,
            s.ex,
            progress=s.progress,
            moe=moe_calibration(config),
            experts_m=float(a.owl_m),
            experts="experts" in config.search_spaces,
        )
        self.metrics, self.cached = layer_metrics(s.adapter, s.captured.exec_device, a, s.progress)
        self.layerif: dict[str, float] | None = None
        if "layerif" in config.search_spaces:
            self.layerif, self.layerif_details = layerif_scores_of(
                config, s.model, s.adapter, s.ids, s.captured.exec_device, s.progress
            )
        self.lua: dict[str, float] | None = None
        if "lua" in config.search_spaces:
            from trimprune.engine.lua import importance_ranks, train_thresholds

            ranks = importance_ranks(config, s.adapter, s.captured, s.ex, s.progress)
            self.lua, self.lua_details = train_thresholds(
                config, s.model, s.adapter, ranks, s.ids, s.captured.exec_device, s.progress
            )
            del ranks

    def owl_ratios(self, m: float) -> list[float]:
        if float(m) not in self.ratios:
            raise ValueError(f"OWL M {m} is not in the grid of the dense walk")
        return self.ratios[float(m)]

    def alpha_metrics(self) -> dict[str, dict]:
        return self.metrics

    def experts(self) -> list[list[Expert]]:
        return self.blocks

    def layerif_scores(self) -> dict[str, float]:
        if self.layerif is None:
            raise ValueError("LayerIF's scores are computed only with the layerif search space")
        return self.layerif

    def lua_thresholds(self) -> dict[str, float]:
        if self.lua is None:
            raise ValueError("Lua-LLM's thresholds are trained only with the lua search space")
        return self.lua

    @property
    def moe(self) -> bool:
        """Whether any block has experts (the `experts` space has parameters to search)."""
        return any(self.blocks)

    def profiles(self, config: PruneConfig, numels, block_of) -> dict[str, list[float]]:
        """Per-block sparsities of the closed-form allocations with the config's parameters (for the
        plot)."""
        from trimprune.algo.allocation.alphapruning import alpha_from_metrics
        from trimprune.algo.allocation.layerif import layerif_allocation as layerif_from_scores
        from trimprune.algo.allocation.lua import lua_allocation

        a, s = config.allocation, config.sparsity
        blocks = block_numels_of(numels, block_of)
        owl = owl_from_ratios(self.owl_ratios(a.owl_m), a.owl_m, a.owl_lambda, s, numels, block_of)
        return (
            {
                "uniform": uniform(s, numels, block_of).per_block(),
                "owl": owl.per_block(),
                "alphapruning": alpha_from_metrics(
                    self.metrics, a.alpha_metric, a.alpha_eps, a.alpha_mapping, s, numels, block_of
                ).per_block(),
                "atp": atp_block_sparsities(len(blocks), s, a.atp_beta, blocks),
            }
            | (
                {
                    "layerif": layerif_from_scores(
                        self.layerif, a.alpha_eps, a.alpha_mapping, s, numels, block_of
                    ).per_block()
                }
                if self.layerif is not None
                else {}
            )
            | (
                {"lua": lua_allocation(self.lua, s, numels, block_of).per_block()}
                if self.lua is not None
                else {}
            )
        )


# ------------------------------------------------------------------------------------------ prunes
def _with_trim(config: PruneConfig, enabled: bool) -> PruneConfig:
    if config.trim.enabled == enabled:
        return config
    trim = dataclasses.replace(
        config.trim, enabled=enabled, **({} if enabled else {"guard": "block"})
    )
    return dataclasses.replace(config, trim=trim)


def _prune(
    session: Session,
    config: PruneConfig,
    allocation: Allocation,
    after_block: Callable[[int], None] | None = None,
) -> PruneResult:
    session.restore()
    return session.run(config, allocation, after_block)


class _Stopped(Exception):
    """A trial stopped by the multi-fidelity stage at its rung."""

    def __init__(self, block: int, value: float):
        super().__init__(f"stopped after block {block}: partial held-out objective {value:.6g}")
        self.block, self.value = block, value


def rung_block(num_blocks: int, rung: float) -> int:
    """The block after which `--search-pruner` measures the partial objective: the last of the
    first round(rung x blocks) (at least the first, at most the one before the last)."""
    return min(max(round(rung * num_blocks), 1), max(num_blocks - 1, 1)) - 1


def _pruner(optuna, sc, warm: int):
    """Optuna's pruner for `--search-pruner` (None: every trial whole). The warm starts (and at
    least 5 trials) complete before any trial is stopped."""
    if sc.pruner == "none":
        return None
    return optuna.pruners.MedianPruner(n_startup_trials=max(5, warm), n_warmup_steps=0)


def _rung_check(trial, holdout: Holdout, block: int) -> Callable[[int], None]:
    """The `after_block` of a trial under `--search-pruner`: at `block`, the held-out objective of
    the model as it is (blocks up to `block` pruned, the later ones dense) is reported to Optuna as
    step block + 1, and the walk stops if Optuna's pruner says so."""

    def after(i: int) -> None:
        if i != block:
            return
        metrics = holdout.measure()
        value = holdout.value(metrics)
        trial.set_user_attr("partial", {"block": i, "metrics": metrics})
        if math.isfinite(value):
            trial.report(value, step=i + 1)
        if not math.isfinite(value) or trial.should_prune():
            raise _Stopped(i, value)

    return after


def model_safeguard_choice(
    session: Session,
    config: PruneConfig,
    allocation: Allocation,
    holdout: Holdout,
) -> tuple[PruneConfig, dict | None, dict | None]:
    """With TRIM and `--trim-guard model` (the model safeguard): `allocation` pruned from the dense
    weights without and with TRIM, the lower held-out objective chosen (TRIM on ties). Returns
    (the config chosen, its held-out metrics, the model safeguard's record); without the model
    safeguard (config, None, None) and nothing is pruned."""
    if not (config.trim.enabled and config.trim.guard == "model"):
        return config, None, None
    alone_cfg = _with_trim(config, False)
    _prune(session, alone_cfg, allocation)
    m_alone = holdout.measure()
    _prune(session, config, allocation)
    m_trim = holdout.measure()
    v_trim, v_alone = holdout.value(m_trim), holdout.value(m_alone)
    if not math.isfinite(v_alone):
        keep_trim = True
    elif not math.isfinite(v_trim):
        keep_trim = False
    else:
        keep_trim = v_trim <= v_alone
    record = {
        "objective": holdout.kind,
        "holdout_sequences": holdout.holdout_sequences,
        "trim": m_trim,
        "scorer_alone": m_alone,
        "kept": "trim" if keep_trim else "scorer_alone",
    }
    return (config if keep_trim else alone_cfg), (m_trim if keep_trim else m_alone), record


def _final(
    session: Session, config: PruneConfig, allocation: Allocation | None, holdout: Holdout
) -> tuple[PruneResult, dict]:
    """The selected `config` and `allocation` (None: `config`'s, computed again on every
    sequence) pruned from the dense weights on every calibration sequence (`Session.prune_all`),
    and its metrics on the sequences that were held out (now in its calibration: no longer a
    held-out measure)."""
    res = session.prune_all(config, allocation)
    return res, holdout.measure()


def _study_name(config: PruneConfig, session: Session) -> str:
    """A name from what decides the trials' values: the config (less the search's run settings), the
    model's weights and the calibration sequences."""
    d = config.to_dict()
    for k in ("trials", "timeout", "seed", "seeds", "storage", "study", "pruner", "rung"):
        d["search"].pop(k, None)
    for k in ("batch_size", "checkpoint_dir", "resume", "keep_checkpoint", "allow_unpruned"):
        d["run"].pop(k, None)
    if d["allocation"].get("method") != "expert":  # unused: names stay those of earlier releases
        for k in ("expert_layerwise", "expert_lambda", "expert_beta"):
            d["allocation"].pop(k, None)
    if "layerif" not in config.search_spaces:  # unused: names stay those of earlier releases
        for k in ("layerif_hessian", "layerif_damping", "layerif_per_linear", "layerif_holdout"):
            d["allocation"].pop(k, None)
    if "lua" not in config.search_spaces:  # likewise
        for k in ("lua_steps", "lua_lr", "lua_temperature", "lua_batch"):
            d["allocation"].pop(k, None)
    if d["calib"].get("moe") == "routed" and d["calib"].get("moe_min_tokens") == 64:
        d["calib"].pop("moe")
        d["calib"].pop("moe_min_tokens")
    h = hashlib.sha256(json.dumps(d, sort_keys=True, default=str).encode())
    h.update(model_fingerprint(session.adapter).encode())
    for t in (session.ids, session.holdout):
        h.update(str(tuple(t.shape)).encode() + t.cpu().numpy().tobytes())
    return f"trimprune-{config.scorer.name}-{config.sparsity:g}-{h.hexdigest()[:16]}"


def _state(t) -> str:
    """complete, pruned (failed: `error`), stopped (by --search-pruner at its rung: `partial`)."""
    attrs = t.user_attrs
    if t.state.name == "PRUNED" and "partial" in attrs and "error" not in attrs:
        return "stopped"
    return t.state.name.lower()


def _value(t) -> float | None:
    """A completed trial's held-out objective (a stopped trial's value is Optuna's partial one)."""
    return t.value if t.state.name == "COMPLETE" else None


def _trial_record(t) -> dict:
    seconds = t.user_attrs.get("seconds")
    if seconds is None and t.datetime_start is not None and t.datetime_complete is not None:
        seconds = (t.datetime_complete - t.datetime_start).total_seconds()
    rec = {
        "number": t.number,
        "state": _state(t),
        "params": dict(t.params),
        "value": _value(t),
        "seconds": seconds,
        "metrics": t.user_attrs.get("metrics"),
        "per_block": t.user_attrs.get("per_block"),
    }
    if "error" in t.user_attrs:
        rec["error"] = t.user_attrs["error"]
    if "partial" in t.user_attrs:  # --search-pruner: the objective at the rung
        rec["partial"] = t.user_attrs["partial"]
    return rec


def _open(model, tokenizer, config: PruneConfig, calibration, **kwargs) -> tuple[Session, int]:
    """A session whose last calibration sequences are held out (the block safeguard's subset
    captured when any prune may need it), and the number of calibration sequences."""
    n = (
        config.calib.nsamples
        if calibration is None
        else (calibration.shape[0] if isinstance(calibration, torch.Tensor) else len(calibration))
    )
    safeguard_subset = (
        config.trim.block_safeguard
        and config.trim.safeguard
        and (config.trim.enabled or "trim" in config.search_spaces)
    )
    session = Session.open(
        model,
        tokenizer,
        config,
        calibration,
        holdout=config.search.holdout_for(n),
        safeguard_subset=safeguard_subset,
        **kwargs,
    )
    return session, n


def _held_out(
    model, tokenizer, config: PruneConfig, calibration, prunes: Callable, **kwargs
) -> PruneResult:
    """`prunes(session, holdout)` on a session with held-out sequences, the dense weights kept."""
    session, n = _open(model, tokenizer, config, calibration, **kwargs)
    try:
        t0 = time.perf_counter()
        holdout = Holdout.of(session, config.search.objective)
        session.snapshot()
        timings = {"holdout_dense_seconds": time.perf_counter() - t0}
        k = holdout.holdout_sequences
        res = prunes(session, holdout)
        res.timings.update(timings)
        res.notes.append(
            f"the last {k} of the {n} calibration sequences were held out for the "
            f"{holdout.kind} objective, on which the choice was made (statistics from the first "
            f"{n - k}); the final model was then pruned on all {n}"
        )
        return res
    finally:
        session.close()


def model_safeguard_prune(
    model,
    tokenizer,
    config: PruneConfig,
    calibration=None,
    *,
    device=None,
    progress=True,
    profile: str = "time",
    storage: DiskBlocks | None = None,
) -> PruneResult:
    """`prune` for `--trim-guard model` (the model safeguard) with a rule's allocation (see the
    module's docstring)."""

    def prunes(session: Session, holdout: Holdout) -> PruneResult:
        allocation = session.allocate(config)
        kept, _, record = model_safeguard_choice(session, config, allocation, holdout)
        # a rule read from the activations is computed again from every sequence; learned
        # allocations (Lua-LLM, LayerIF) keep what they learned (training again doubles their cost)
        again = config.allocation.method in FROM_ACTIVATIONS
        res, final = _final(session, kept, None if again else allocation, holdout)
        res.trim_guard = (record or {}) | {"final_sequences": int(session.ids.shape[0])}
        res.trim_guard["final"] = final
        return res

    return _held_out(
        model,
        tokenizer,
        config,
        calibration,
        prunes,
        device=device,
        progress=progress,
        profile=profile,
        storage=storage,
    )


def search_prune(
    model,
    tokenizer,
    config: PruneConfig,
    calibration=None,
    *,
    device=None,
    progress=True,
    profile: str = "time",
    on_trial: Callable | None = None,
    storage: DiskBlocks | None = None,
) -> PruneResult:
    """`prune` for `--allocation search` (see the module's docstring). `on_trial(number, params,
    value, metrics, model)`: called after every completed trial, the trial's pruned model in place
    (benchmarks evaluate it)."""
    optuna = _optuna()

    def prunes(session: Session, holdout: Holdout) -> PruneResult:
        return _search(optuna, session, config, holdout, on_trial)

    return _held_out(
        model,
        tokenizer,
        config,
        calibration,
        prunes,
        device=device,
        progress=progress,
        profile=profile,
        storage=storage,
    )


def _search(
    optuna, session: Session, config: PruneConfig, holdout: Holdout, on_trial
) -> PruneResult:
    sc, spaces, verbose = config.search, config.search_spaces, session.progress
    t0 = time.perf_counter()
    sources = _Sources(session, config)
    numels, block_of = linear_sizes(session.adapter)
    name = sc.study or _study_name(config, session)
    level = optuna.logging.get_verbosity()
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    runs = []  # one study per seed: (seed, name, study, trials asked, best trial)
    try:
        for seed in range(sc.seed, sc.seed + sc.seeds):
            run_sc = dataclasses.replace(sc, seed=seed)
            run_name = name if sc.seeds == 1 else f"{name}-seed{seed}"
            study = _open_study(optuna, run_sc, run_name, spaces, config, sources.moe)
            label = "" if sc.seeds == 1 else f"seed {seed}: "
            asked = _trials(
                optuna, study, session, config, holdout, sources, numels, block_of, on_trial, label
            )
            runs.append((seed, run_name, study, asked, _best_trial(optuna, study)))
    finally:
        optuna.logging.set_verbosity(level)
    seed, name, study, trials, best = min(runs, key=lambda r: (r[4].value, r[0]))
    params = dict(best.params)
    params.setdefault("trim", config.trim.enabled)
    final_cfg = _with_trim(config, bool(params["trim"]))
    allocation = allocation_for(
        params, config.sparsity, numels, block_of, sources, config.allocation.alpha_mapping
    )
    allocation.details.update(
        trial=best.number,
        objective=config.search.objective,
        value=best.value,
        study=name,
        seed=seed,
    )
    seconds = time.perf_counter() - t0
    holdout_n, prune_n = int(session.holdout.shape[0]), int(session.ids.shape[0])
    kept, selected, record = model_safeguard_choice(session, final_cfg, allocation, holdout)
    res, final = _final(session, kept, allocation, holdout)
    res.trim_guard = record
    res.search = {
        "objective": holdout.kind,
        "holdout_sequences": holdout_n,
        "prune_sequences": prune_n,
        "final_sequences": int(session.ids.shape[0]),
        "space": list(spaces),
        "study": name,
        "storage": sc.storage,
        "seed": seed,
        "seeds": [_seed_record(*r) for r in runs],
        "spread": _spread([r[4].value for r in runs]),
        "trials_requested": sc.trials,
        "timeout": sc.timeout,
        "trials_run": trials,
        **_pruner_record(sc, session, runs),
        "trials": [
            _trial_record(t)
            for t in study.get_trials(deepcopy=False)
            if t.state != optuna.trial.TrialState.WAITING
        ],  # enqueued warm starts not run yet
        "best": {"number": best.number, "params": params, "value": best.value},
        # the held-out metrics of the configuration kept (the best trial's, or the model
        # safeguard's choice)
        "selected": selected if selected is not None else best.user_attrs.get("metrics"),
        "final": final,  # the final model on the sequences held out, now in its calibration
        "final_objective": holdout.value(final),
        "dense": holdout.dense,
        "profiles": sources.profiles(config, numels, block_of) | {"search": allocation.per_block()},
        "alpha_from_cache": sources.cached,
        "seconds": seconds,
    }
    res.timings["search_seconds"] = seconds
    verbose.message(
        f"search: best trial {best.number}{'' if sc.seeds == 1 else f' of seed {seed}'} "
        f"({params['family']}) held-out {holdout.kind} "
        f"{best.value:.6g}; final model pruned on all {session.ids.shape[0]} sequences"
    )
    return res


def _pruner_record(sc, session: Session, runs: list) -> dict:
    """With --search-pruner: the rung's block and how many trials it stopped (all seeds)."""
    if sc.pruner == "none":
        return {"pruner": "none"}
    stopped = sum(_state(t) == "stopped" for r in runs for t in r[2].get_trials(deepcopy=False))
    rung = rung_block(session.adapter.num_blocks, sc.rung)
    return {"pruner": sc.pruner, "rung_block": rung, "trials_stopped": stopped}


def _best_trial(optuna, study):
    """The study's best completed trial; an error naming the first failure when none completed."""
    finished = [t for t in study.get_trials(deepcopy=False) if t.state.is_finished()]
    if not any(t.state == optuna.trial.TrialState.COMPLETE for t in finished):
        first = next((t.user_attrs["error"] for t in finished if "error" in t.user_attrs), "-")
        raise TrimpruneError(
            f"no trial of the search completed ({len(finished)} failed or were pruned; first "
            f"error: {first}): check the configuration with {{allocation}} uniform"
        )
    return study.best_trial


def _seed_record(seed: int, name: str, study, asked: int, best) -> dict:
    return {
        "seed": seed,
        "study": name,
        "trials_run": asked,
        # every trial's held-out objective in trial order (None: pruned or failed)
        "values": [_value(t) for t in study.get_trials(deepcopy=False) if t.state.is_finished()],
        "best": {
            "number": best.number,
            "family": best.params.get("family"),
            "trim": best.params.get("trim"),
            "value": best.value,
        },
    }


def _spread(values: list[float]) -> dict:
    """Minimum, median and maximum of the seeds' best held-out objectives."""
    v = sorted(values)
    mid = len(v) // 2
    median = v[mid] if len(v) % 2 else (v[mid - 1] + v[mid]) / 2
    return {"seeds": len(v), "min": v[0], "median": median, "max": v[-1]}


def _open_study(optuna, sc, name: str, spaces, config: PruneConfig, moe: bool = False):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        sampler = optuna.samplers.TPESampler(seed=sc.seed, multivariate=True, group=True)
    starts = warm_starts(spaces, config.allocation, config.trim.enabled, moe)
    study = optuna.create_study(
        storage=sc.storage,
        sampler=sampler,
        pruner=_pruner(optuna, sc, len(starts)),
        study_name=name,
        direction="minimize",
        load_if_exists=True,
    )
    if not study.get_trials(
        deepcopy=False
    ):  # a new study starts from uniform and the rules as configured
        for params in starts:
            study.enqueue_trial(params, skip_if_exists=True)
    return study


def _trials(
    optuna,
    study,
    session: Session,
    config: PruneConfig,
    holdout: Holdout,
    sources,
    numels,
    block_of,
    on_trial,
    label: str = "",
) -> int:
    """Run this process's trials (ask / tell); returns how many were asked. `label` starts each
    trial's progress line (the seed, with several)."""
    sc, spaces = config.search, config.search_spaces
    shown, quiet = session.progress, Progress("off")
    states = optuna.trial.TrialState
    t_start, n = time.perf_counter(), 0
    block = rung_block(session.adapter.num_blocks, sc.rung)  # of --search-pruner
    session.progress = quiet  # no per-block lines for every trial
    try:
        while n < sc.trials and not (sc.timeout and time.perf_counter() - t_start >= sc.timeout):
            trial = study.ask()
            n += 1
            t0 = time.perf_counter()
            rung = _rung_check(trial, holdout, block) if sc.pruner != "none" else None
            try:
                params = suggest(trial, spaces, config.trim.enabled, sources.moe)
                cfg = _with_trim(config, bool(params["trim"]))
                allocation = allocation_for(
                    params,
                    config.sparsity,
                    numels,
                    block_of,
                    sources,
                    config.allocation.alpha_mapping,
                )
                trial.set_user_attr("per_block", allocation.per_block())
                _prune(session, cfg, allocation, rung)
                metrics = holdout.measure()
                value = holdout.value(metrics)
                if not math.isfinite(value):
                    raise FloatingPointError(f"the held-out {holdout.kind} is {value}")
            except (KeyboardInterrupt, SystemExit):
                study.tell(trial, state=states.FAIL)
                raise
            except _Stopped as e:
                trial.set_user_attr("seconds", time.perf_counter() - t0)
                study.tell(trial, state=states.PRUNED)
                shown.message(
                    f"search: {label}trial {trial.number} ({n}/{sc.trials}) {params['family']}"
                    f"{' +trim' if params['trim'] else ''} {e} ({sc.pruner} pruner), "
                    f"{time.perf_counter() - t0:.1f} s"
                )
                continue
            except Exception as e:  # noqa: BLE001 - a failing trial is pruned; the search goes on
                why = f"{type(e).__name__}: {' '.join(str(e).split())[:300]}"
                trial.set_user_attr("error", why)
                trial.set_user_attr("seconds", time.perf_counter() - t0)
                study.tell(trial, state=states.PRUNED)
                shown.message(f"search: {label}trial {trial.number} pruned ({why[:160]})")
                continue
            trial.set_user_attr("seconds", time.perf_counter() - t0)
            trial.set_user_attr("metrics", metrics)
            study.tell(trial, value)
            if on_trial is not None:
                on_trial(trial.number, params, value, metrics, session.model)
            shown.message(
                f"search: {label}trial {trial.number} ({n}/{sc.trials}) {params['family']}"
                f"{' +trim' if params['trim'] else ''} held-out {holdout.kind} {value:.6g} "
                f"(best {study.best_value:.6g}), {time.perf_counter() - t0:.1f} s"
            )
    finally:
        session.progress = shown
    return n
