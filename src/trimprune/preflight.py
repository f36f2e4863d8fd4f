"""What the command line checks before the model loads, in order, cheapest first.

Every input is checked before the expensive work: a bad one ends in one line (`TrimpruneError`) and
exit code 2, with nothing written. Each check lives where its data is handled; this module only runs
them in order:

1. the config: every flag and recipe value has its type and range (`config`, when it is made);
2. the outputs: `--output` is new, an empty folder, or with `--overwrite` a folder trimprune wrote,
   and a file can be made beside it (a missing parent folder is made, as `save_pretrained` does;
   a file in the way is refused) (`io.export.check_output_dir`: a probe file is created and
   removed); partial outputs of killed runs beside it are reported (removed with `--overwrite`);
   `--checkpoint-dir`, `--alpha-cache-dir` and `--log-json` can be written;
3. the model: a GGUF file, a folder with a config.json, or a hub id that the cache holds or the Hub
   can serve, failing at once offline (`io.models.check_model_source`);
4. the data: the calibration file and every evaluation file exist, are readable and their first rows
   parse (`calib.data.check_source`, `io.evaluate.check_eval_sources`); a set from the Hub needs a
   reachable Hub; the zero-shot tasks exist (`io.zeroshot.check_tasks`);
5. an allocation file parses and holds numbers in [0, 1) (`algo.allocation.read_allocation_file`);
   `--allocation search` has Optuna, and a `--search-storage` sqlite file can be written.

Once the model is loaded, before any evaluation or calibration: the sequence lengths fit its
context, a resume state to resume matches, and an allocation file matches its linears and
`--sparsity` (`algo.allocation.resolve_sparsity`). Every block's weights are checked
before the first block is pruned (`session.check_dense_weights`), and each block's dense outputs
in its first pass, before its weights change.
"""

from __future__ import annotations

from pathlib import Path

from trimprune.errors import OutputError


def check_prune_inputs(args, cfg, eval_data: dict[str, str]) -> list[str]:
    """Steps 2-5 for `trimprune prune` (the config is made and the evaluation flags checked
    already). Returns the warnings to print (partial outputs of killed runs)."""
    from trimprune.algo.allocation.base import read_allocation_file
    from trimprune.calib.data import check_calibration_source
    from trimprune.io.evaluate import check_eval_sources
    from trimprune.io.export import (
        acquire_output_lock,
        check_folder_writable,
        check_free_space,
        check_output_dir,
        check_output_file,
        check_output_location,
        handle_partial_outputs,
        model_bytes,
    )
    from trimprune.io.models import check_model_source

    check_counts(args, cfg)
    check_output_location(args.output, args.model)
    check_output_dir(args.output, args.overwrite)
    acquire_output_lock(args.output)
    warnings = [w for w in [handle_partial_outputs(args.output, remove=args.overwrite)] if w]
    if cfg.run.checkpoint_dir:
        out, state_dir = Path(args.output).resolve(), Path(cfg.run.checkpoint_dir).resolve()
        if state_dir == out or out in state_dir.parents:
            raise OutputError(
                f"{{checkpoint_dir}} {cfg.run.checkpoint_dir!r} is inside --output "
                f"{args.output!r}, which is written at the end: give a folder outside it"
            )
        check_folder_writable(cfg.run.checkpoint_dir, "{checkpoint_dir}")
    alpha = cfg.allocation.method == "alphapruning" or (
        cfg.allocation.method == "expert" and cfg.allocation.expert_layerwise == "alphapruning"
    )
    if alpha and cfg.allocation.alpha_cache_dir:
        check_folder_writable(cfg.allocation.alpha_cache_dir, "{alpha_cache_dir}")
    if args.log_json:
        check_output_file(args.log_json, "--log-json")
    check_model_source(args.model, args.gguf_file)
    check_calibration_source(cfg.calib)
    check_eval_sources(args.eval or [], eval_data)
    check_tasks_data(args)
    values = (
        read_allocation_file(cfg.allocation.method[5:])
        if cfg.allocation.method.startswith("file:")
        else None
    )
    check_keeps_weights(cfg, values, _config_in_features(args.model, cfg))
    if cfg.allocation.method == "search":
        check_search(cfg.search)
    if not args.no_save_model:
        check_free_space(args.output, model_bytes(args.gguf_file or args.model))
    return warnings


def check_search(search) -> None:
    """`--allocation search`: Optuna is installed; an sqlite `--search-storage` names a file that
    can be written (a new one in a folder that takes files)."""
    import importlib.util

    from trimprune.errors import ConfigError
    from trimprune.io.export import check_output_file

    if importlib.util.find_spec("optuna") is None:
        raise ConfigError(
            "{allocation} search needs Optuna: pip install 'trimprune[search]' (optuna==5.0.0)"
        )
    url = search.storage or ""
    if url.startswith("sqlite:///"):
        path = url[len("sqlite:///") :].split("?", 1)[0]
        if path and path != ":memory:":
            check_output_file(path, "{search_storage}")


def check_eval_inputs(args, eval_data: dict[str, str]) -> None:
    """Steps 2-4 for `trimprune eval`: --output, the model, the evaluation files."""
    from trimprune.io.evaluate import check_eval_sources
    from trimprune.io.export import check_output_file
    from trimprune.io.models import check_model_source

    check_counts(args)
    if args.output:
        check_output_file(args.output, "--output")
    check_model_source(args.model, args.gguf_file)
    check_eval_sources(args.eval or [], eval_data)
    check_tasks_data(args)


def check_export_inputs(args) -> list[str]:
    """`trimprune export`: RUN_DIR is a prune's output, OUT_DIR can be written. Returns the
    warnings."""
    from trimprune.errors import InputFileError
    from trimprune.io.compact import COMPACT_FILE
    from trimprune.io.export import (
        acquire_output_lock,
        check_free_space,
        check_output_dir,
        check_output_location,
        handle_partial_outputs,
        model_bytes,
    )

    run = Path(args.run_dir)
    if not run.is_dir():
        raise InputFileError(
            f"RUN_DIR {args.run_dir!r} is not a folder: give the --output folder of a prune"
        )
    if not (run / COMPACT_FILE).is_file() and not (run / "config.json").is_file():
        raise InputFileError(
            f"RUN_DIR {args.run_dir!r} holds no model (no config.json / {COMPACT_FILE}): give the "
            "--output folder of a prune that saved its model"
        )
    from trimprune.io.compact import LOAD_FIX
    from trimprune.io.integrity import check_model_folder

    check_model_folder(run, LOAD_FIX)  # its safetensors are whole, before OUT_DIR is made
    check_output_location(args.out_dir, args.run_dir, flag="OUT_DIR")
    check_output_dir(args.out_dir, args.overwrite, flag="OUT_DIR")
    acquire_output_lock(args.out_dir, flag="OUT_DIR")
    check_free_space(args.out_dir, model_bytes(args.run_dir), flag="OUT_DIR")
    return [
        w
        for w in [handle_partial_outputs(args.out_dir, remove=args.overwrite, flag="OUT_DIR")]
        if w
    ]


def check_counts(args, cfg=None) -> None:
    """The integer flags are in their documented ranges (`trimprune.limits`): `prune` (with its
    config `cfg`) and `eval`."""
    from trimprune.limits import MAX_COUNT, MAX_LIMIT, MAX_SEED, MAX_SEQLEN, check_count

    if cfg is not None:
        check_count("--nsamples", cfg.calib.nsamples, 1, MAX_COUNT)
        check_count("--seqlen", cfg.calib.seqlen, 2, MAX_SEQLEN)
        check_count("--seed", cfg.calib.seed, 0, MAX_SEED)
        check_count("--search-seed", cfg.search.seed, 0, MAX_SEED)
        check_count("--batch-size", cfg.run.batch_size, 0, MAX_COUNT, " (0 = automatic)")
        check_count("--eval-seqlen", args.eval_seqlen, 2, MAX_SEQLEN)
        tasks_flag = "--tasks-batch-size"
    else:
        check_count("--seqlen", args.seqlen, 2, MAX_SEQLEN)
        check_count("--seed", args.seed, 0, MAX_SEED)
        tasks_flag = "--batch-size/--tasks-batch-size"
    check_count("--eval-batch-size", args.eval_batch_size, 1, MAX_COUNT)
    check_count(
        "--self-eval-samples", args.self_eval_samples, 1, MAX_COUNT, ": --eval self needs a window"
    )
    check_count(tasks_flag, args.tasks_batch_size, 1, MAX_COUNT)
    check_count("--eval-limit", args.eval_limit, 1, MAX_LIMIT)
    check_count("--tasks-limit", args.tasks_limit, 1, MAX_LIMIT)


def check_tasks_data(args) -> None:
    """--tasks-data, when given with --tasks, is a folder with files (an empty one would send every
    task to the Hub)."""
    from trimprune.errors import InputFileError

    folder = getattr(args, "tasks_data", None)
    if not folder or not getattr(args, "tasks", None):
        return
    p = Path(folder)
    if not p.is_dir():
        raise InputFileError(
            f"--tasks-data {folder!r} is not a folder: give a folder laid out like shared/data "
            "(boolq/validation.jsonl, ...)"
        )
    if not any(f.is_file() for f in p.rglob("*")):
        raise InputFileError(
            f"--tasks-data {folder!r} is empty: give a folder laid out like shared/data "
            "(boolq/validation.jsonl, ...), or leave --tasks-data out to use the Hub"
        )


def check_keeps_weights(cfg, values=None, in_features: dict[str, int] | None = None) -> None:
    """A sparsity that would prune every weight of a row (or, for magnitude, of a matrix) is
    refused, unless N:M. Before the model loads: the largest value of an allocation file (`values`)
    against 1; with the model's `in_features` (name -> columns), the rounding of each row."""
    from trimprune.errors import ConfigError

    if cfg.nm is not None:
        return
    if isinstance(values, dict):
        values = list(values.values())
    top = max([cfg.sparsity or 0.0] + list(values or []))
    if not in_features:
        return
    name, cols = min(in_features.items(), key=lambda kv: kv[1])
    if round(top * cols) >= cols:
        raise ConfigError(
            f"sparsity {top:g} prunes every weight of each row of {name} ({cols} columns): "
            f"give a sparsity below {(cols - 0.5) / cols:.6g}, so that a row keeps a weight"
        )


def check_model_keeps_weights(cfg, model) -> None:
    """`check_keeps_weights` with the model's prunable linears (once it is loaded, before
    pruning); magnitude prunes per matrix, the other scorers per row."""
    from trimprune.core.model import ModelAdapter, weight_2d

    shapes = {
        n: tuple(weight_2d(m).shape)
        for n, m in ModelAdapter.from_model(model).all_linears().items()
    }
    if not shapes:
        return
    if cfg.scorer.name == "magnitude":
        cols = {n: r * c for n, (r, c) in shapes.items()}
    else:
        cols = {n: c for n, (r, c) in shapes.items()}
    values = None
    if cfg.allocation.method.startswith("file:"):
        from trimprune.algo.allocation.base import read_allocation_file

        values = read_allocation_file(cfg.allocation.method[5:])
    check_keeps_weights(cfg, values, cols)


def _config_in_features(model: str, cfg) -> dict[str, int] | None:
    """Before the load, from a local model folder's config.json: the input widths of its linears
    (hidden_size, intermediate_size; their product for magnitude's per-matrix count), else None."""
    import json

    f = Path(model) / "config.json"
    try:
        c = json.loads(f.read_text(encoding="utf-8")) if f.is_file() else None
    except (OSError, ValueError):
        return None
    if not isinstance(c, dict):
        return None
    c = c.get("text_config", c) if isinstance(c.get("text_config"), dict) else c
    widths = {
        k: v
        for k in ("hidden_size", "intermediate_size")
        if isinstance(v := c.get(k), int) and not isinstance(v, bool) and v > 0
    }
    if not widths:
        return None
    if cfg.scorer.name == "magnitude":
        h = widths.get("hidden_size", 1)
        return {f"a {k} x hidden_size matrix": v * h for k, v in widths.items()}
    return {f"a linear reading {k}": v for k, v in widths.items()}
