"""Several prunes of one model from one calibration capture: `sweep(model, tokenizer, configs)`.

The configs may differ in their sparsity, scorer, TRIM and allocation settings, and share their
calibration (`PruneConfig.calib`) and execution (`PruneConfig.run`) settings. One `Session` samples
the calibration sequences once and captures the block inputs once; the dense weights of the
prunable linears are kept as a host copy (`Session.snapshot`) and put back before every prune after
the first (`Session.restore`), so each result is the one a separate `prune` with its config gives
(the allocation, e.g. OWL's outlier ratios, is computed on the restored dense model too).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence

from torch import nn

from trimprune.config import PruneConfig
from trimprune.errors import TrimpruneError
from trimprune.session import Checked, PruneResult, Session

# the phases whose totals `Session.run` reports, by the timing key they go to
_PHASES = {
    "trim search": "trim_search_seconds",
    "masks": "mask_and_update_seconds",
    "block safeguard": "block_safeguard_seconds",
}


def check_sweep_configs(configs: Sequence[PruneConfig | Checked]) -> None:
    """What one capture can serve: at least one config, each a plain prune (no allocation search,
    no `--trim-guard model`: they hold calibration sequences out), all with the same calibration
    and execution settings, none with a resume state or disk offload."""
    if not configs:
        raise TrimpruneError("a sweep needs at least one config")
    plain = [c.config if isinstance(c, Checked) else c for c in configs]
    first = plain[0]
    for c in plain:
        if c.mode != "plain":
            what = "{allocation} search" if c.mode == "search" else "{trim_guard} model"
            raise TrimpruneError(
                f"a sweep runs plain prunes; {what} holds calibration sequences out and prunes "
                "several times itself: run it with `trimprune prune`"
            )
        if c.calib != first.calib or c.run != first.run:
            raise TrimpruneError(
                "the configs of a sweep share one calibration capture: give them the same "
                "calibration and execution settings"
            )
    if first.run.offload == "disk":
        raise TrimpruneError(
            "{offload} disk prunes once (each block is written out as it is done): a sweep "
            "needs {offload} cpu or none"
        )
    if first.run.checkpoint_dir:
        raise TrimpruneError(
            "{checkpoint_dir} keeps the resume state of one prune: leave it out of a sweep"
        )


def sweep(
    model: nn.Module,
    tokenizer,
    configs: Sequence[PruneConfig | Checked],
    calibration=None,
    *,
    on_result: Callable[[int, PruneResult], None] | None = None,
    device=None,
    progress=True,
    profile: str = "time",
) -> list[PruneResult]:
    """Prune `model` once per config, each time from its dense weights, from one calibration
    capture; returns the results in order (their masks bit-packed). After config i is pruned,
    `on_result(i, result)` runs with the model holding that pruned model (e.g. to evaluate it or
    write it out); the model holds the last config's pruned weights when `sweep` returns.

    The configs must share `calib` and `run` and be plain prunes (`check_sweep_configs`); each is
    checked against the model (`session.check_against_model`) as `prune` does, unless it is a
    `Checked` config already. `calibration`,
    `device`, `progress` and `profile` are those of `api.prune`. Memory: a host copy of the
    prunable linears' dense weights is kept while more than one config remains."""
    from trimprune.session import _checked

    check_sweep_configs(configs)
    checked = [_checked(c, model, sampling=calibration is None).config for c in configs]
    block_safeguard = any(c.trim.runs_block_safeguard for c in checked)
    session = Session.open(
        model,
        tokenizer,
        checked[0],
        calibration,
        device=device,
        progress=progress,
        profile=profile,
        safeguard_subset=block_safeguard,
    )
    results = []
    try:
        if len(checked) > 1:
            session.snapshot()
        for i, config in enumerate(checked):
            if i:
                session.restore()
            before = dict(session.ex.phases.totals)
            t0 = session.t_prune = time.perf_counter()
            result = session.run(config, session.allocate(config))
            totals = session.ex.phases.totals
            for phase, key in _PHASES.items():  # this prune's share of the session's phases
                result.timings[key] = totals.get(phase, 0.0) - before.get(phase, 0.0)
            result.timings["prune_seconds"] = time.perf_counter() - t0
            if i:
                result.notes.append(
                    f"sweep: the calibration capture of the sweep's first prune was reused "
                    f"(prune {i + 1} of {len(checked)}), the dense weights restored"
                )
            if i == len(checked) - 1:
                session.dense = None  # the host copy is not needed any more
            if on_result is not None:
                on_result(i, result)
            results.append(result)
    finally:
        session.close()
    return results
