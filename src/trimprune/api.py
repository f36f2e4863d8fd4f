"""`prune(model, tokenizer, config, calibration)`: the one call that applies a `PruneConfig`.

A facade: the config's mode (`PruneConfig.mode`) picks the plain prune (`session.Session`), the
allocation search or the model safeguard (`search`)."""

from __future__ import annotations

from torch import nn

from trimprune.config import PruneConfig
from trimprune.io.diskmodel import DiskBlocks
from trimprune.search import model_safeguard_prune, search_prune
from trimprune.session import Checked, PruneResult, Session, _checked

__all__ = ["Checked", "PruneResult", "prune"]


def prune(
    model: nn.Module,
    tokenizer,
    config: PruneConfig | Checked,
    calibration=None,
    *,
    storage: DiskBlocks | None = None,
    device=None,
    progress=True,
    profile: str = "time",
) -> PruneResult:
    """Prune `model` in place following `config`; returns a `PruneResult`.

    `calibration`: a (nsamples, seqlen) LongTensor of token ids, or None to build it from
    `config.calib` (`tokenizer` is then needed). `device`: where blocks are computed (default: the
    model's device; with `config.run.offload` the model may live on CPU and blocks visit `device`).
    `progress`: a `core.progress.Progress` (bars, log lines, --log-json) or True / False. `profile`:
    the phases' mode (`exec.profiling`), for benchmarks. `config.run.offload == "disk"`: the model
    comes from `loaded = load_model(..., offload="disk")` and `storage` is `loaded.storage` (its
    blocks' `io.diskmodel.DiskBlocks`; refused with another offload, and offload "disk" is refused
    without it); `loaded.storage.write_to(FOLDER)` names the folder where each block is written as
    it finishes and `io.export.write_outputs(..., storage=loaded.storage)` completes that folder.
    `config.run.checkpoint_dir`: commit every finished block there (`io.resume`); with
    `config.run.resume`, first restore the blocks it holds and continue after them. The resume
    state is left in place (the command line removes it once the output is written).

    `--allocation search` and `--trim-guard model` prune several times from one capture and keep the
    best on held-out calibration sequences (`trimprune.search`; `PruneResult.search` /
    `.trim_guard`); they run in one process and without a resume state.

    In a process group (`torchrun`, `torch.distributed` initialised) every rank calls `prune` with
    the same arguments: each runs the blocks on its share of the calibration sequences, the
    per-linear work is split across ranks, and every rank ends with the same pruned weights and the
    same `PruneResult` (`core.ranks`). Only rank 0 shows progress.

    NaN / Inf in the weights, activations or statistics raises `NonFiniteError` (a `TrimpruneError`)
    naming the block and the tensor (`core.finite`); blocks before it are already pruned in place.
    Before the first block is pruned, every block's weights are checked
    (`session.check_dense_weights`); activations that overflow the dtype (float16) stop the run in
    the first, dense pass over the block where they appear, before its weights change.

    `config.allocation` "file:PATH" is read against the model first
    (`algo.allocation.resolve_sparsity`): its parameter-weighted mean must be `config.sparsity`
    within 1e-4; with `config.sparsity` None the mean is the target (the result's config holds it,
    its notes say so). A `Checked` config (`session.check_against_model`, as the command line makes
    before its dense evaluation) skips the checks that already ran."""
    checked = _checked(config, model, sampling=calibration is None)
    config = checked.config
    kwargs = dict(device=device, progress=progress, profile=profile, storage=storage)
    if config.mode == "search":
        result = search_prune(model, tokenizer, config, calibration, **kwargs)
    elif config.mode == "model-safeguard":
        result = model_safeguard_prune(model, tokenizer, config, calibration, **kwargs)
    else:
        session = Session.open(model, tokenizer, config, calibration, **kwargs)
        try:
            result = session.run(config, session.allocate(config))
        finally:
            session.close()
    if checked.file_target:
        result.notes.insert(
            0,
            f"no --sparsity given: the target is the parameter-weighted mean of "
            f"{config.allocation.method}, {config.sparsity:.6g}",
        )
    return result
