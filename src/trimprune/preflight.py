"""What the command line checks before the model loads, in order, cheapest first.

Every input is checked before the expensive work: a bad one ends in one line (`TrimpruneError`) and
exit code 2, with nothing written. Each check lives where its data is handled; this module only runs
them in order:

1. the config: every flag and recipe value has its type and range (`config`, when it is made);
2. the outputs: `--output` is new, an empty folder, or with `--overwrite` a folder trimprune wrote,
   and a file can be made beside it (`io.export.check_output_dir`: a probe file is created and
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
`--sparsity` (`algo.allocation.resolve_sparsity`). The dense model's outputs on the first
calibration batch are checked before the first block is pruned (`session.check_dense_batch`).
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
        check_folder_writable,
        check_output_dir,
        check_output_file,
        handle_partial_outputs,
    )
    from trimprune.io.models import check_model_source

    check_output_dir(args.output, args.overwrite)
    warnings = [w for w in [handle_partial_outputs(args.output, remove=args.overwrite)] if w]
    if cfg.run.checkpoint_dir:
        out, state_dir = Path(args.output).resolve(), Path(cfg.run.checkpoint_dir).resolve()
        if state_dir == out or out in state_dir.parents:
            raise OutputError(
                f"--checkpoint-dir {cfg.run.checkpoint_dir!r} is inside --output {args.output!r}, "
                "which is written at the end: give a folder outside it"
            )
        check_folder_writable(cfg.run.checkpoint_dir, "--checkpoint-dir")
    if cfg.allocation.method == "alphapruning" and cfg.allocation.alpha_cache_dir:
        check_folder_writable(cfg.allocation.alpha_cache_dir, "--alpha-cache-dir")
    if args.log_json:
        check_output_file(args.log_json, "--log-json")
    check_model_source(args.model, args.gguf_file)
    check_calibration_source(cfg.calib)
    check_eval_sources(args.eval or [], eval_data)
    if cfg.allocation.method.startswith("file:"):
        read_allocation_file(cfg.allocation.method[5:])
    if cfg.allocation.method == "search":
        check_search(cfg.search)
    return warnings


def check_search(search) -> None:
    """`--allocation search`: Optuna is installed; an sqlite `--search-storage` names a file that
    can be written (a new one in a folder that takes files)."""
    import importlib.util

    from trimprune.errors import ConfigError
    from trimprune.io.export import check_output_file

    if importlib.util.find_spec("optuna") is None:
        raise ConfigError(
            "--allocation search needs Optuna: pip install 'trimprune[search]' (optuna==5.0.0)"
        )
    url = search.storage or ""
    if url.startswith("sqlite:///"):
        path = url[len("sqlite:///") :].split("?", 1)[0]
        if path and path != ":memory:":
            check_output_file(path, "--search-storage")


def check_eval_inputs(args, eval_data: dict[str, str]) -> None:
    """Steps 2-4 for `trimprune eval`: --output, the model, the evaluation files."""
    from trimprune.io.evaluate import check_eval_sources
    from trimprune.io.export import check_output_file
    from trimprune.io.models import check_model_source

    if args.output:
        check_output_file(args.output, "--output")
    check_model_source(args.model, args.gguf_file)
    check_eval_sources(args.eval or [], eval_data)


def check_export_inputs(args) -> list[str]:
    """`trimprune export`: RUN_DIR is a prune's output, OUT_DIR can be written. Returns the
    warnings."""
    from trimprune.errors import InputFileError
    from trimprune.io.compact import COMPACT_FILE
    from trimprune.io.export import check_output_dir, handle_partial_outputs

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
    check_output_dir(args.out_dir, args.overwrite, flag="OUT_DIR")
    return [
        w
        for w in [handle_partial_outputs(args.out_dir, remove=args.overwrite, flag="OUT_DIR")]
        if w
    ]
