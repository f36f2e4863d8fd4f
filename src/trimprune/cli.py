"""Command line: `trimprune prune` and `trimprune eval`."""

from __future__ import annotations

import argparse
import logging
import sys
import time
import warnings

from trimprune.config import PruneConfig, flag_of
from trimprune.core.progress import Progress
from trimprune.errors import TrimpruneError


def _eval_names(s: str) -> list[str]:
    names = [x.strip() for x in s.split(",") if x.strip()]
    if not names:
        raise argparse.ArgumentTypeError("--eval needs at least one name, e.g. wikitext2,self")
    return names


def _add_model_args(p):
    g = p.add_argument_group("model")
    g.add_argument(
        "--model",
        required=True,
        help="hub id, local model directory, a .gguf file, or a built-in alias (smollm2-135m)",
    )
    g.add_argument("--gguf-file", help="GGUF file to load (path, or name inside --model directory)")
    g.add_argument(
        "--device", default=None, help="cpu, cuda or cuda:N (default: cuda if available, else cpu)"
    )
    g.add_argument(
        "--dtype",
        default=None,
        choices=["float32", "float16", "bfloat16"],
        help="weights dtype (default: the checkpoint's own when it is float16 or bfloat16, else "
        "bfloat16 on GPU, float32 on CPU)",
    )
    g.add_argument(
        "--trust-remote-code",
        action="store_true",
        help="allow model code from the model repository (off unless asked)",
    )


def _task_names(s: str) -> list[str]:
    names = [x.strip() for x in s.split(",") if x.strip()]
    if not names:
        raise argparse.ArgumentTypeError("--tasks needs at least one task, e.g. boolq,rte")
    return names


def _add_eval_args(p, batch_size_alias: bool = False):
    g = p.add_argument_group("evaluation")
    g.add_argument(
        "--eval",
        type=_eval_names,
        default=None,
        help="comma list of wikitext2, c4, ptb, self, or names given by --eval-data",
    )
    g.add_argument(
        "--eval-data",
        action="append",
        default=[],
        metavar="NAME=PATH",
        help="local file for an evaluation set (repeatable), e.g. wikitext2=wiki.test.raw",
    )
    g.add_argument(
        "--eval-limit",
        type=int,
        default=None,
        metavar="W",
        help="evaluate only the first W windows (quick check; the report says so)",
    )
    g.add_argument(
        "--eval-batch-size",
        type=int,
        default=4,
        help="perplexity windows (of --eval) per forward pass",
    )
    g.add_argument(
        "--self-eval-samples",
        type=int,
        default=16,
        help="number of held-out sequences sampled from the dense model for --eval self",
    )
    _add_task_args(g, batch_size_alias)


def _add_task_args(g, batch_size_alias: bool) -> None:
    g.add_argument(
        "--tasks",
        type=_task_names,
        default=None,
        metavar="T1,T2",
        help="zero-shot accuracy with lm-evaluation-harness (pip install 'trimprune[eval]'), "
        "0-shot unless --tasks-num-fewshot, e.g. boolq,rte,hellaswag,winogrande,arc_easy,"
        "arc_challenge,openbookqa (their mean acc is reported)",
    )
    g.add_argument(
        "--tasks-limit",
        type=int,
        default=None,
        metavar="N",
        help="only the first N examples of each task (quick check; the report says so)",
    )
    g.add_argument(
        *(["--tasks-batch-size", "--batch-size"] if batch_size_alias else ["--tasks-batch-size"]),
        dest="tasks_batch_size",
        type=int,
        default=8,
        help="lm-evaluation-harness requests (one answer choice of one example each) per forward "
        "pass in --tasks"
        + (
            " (--batch-size is its older name here; in `trimprune prune` --batch-size is the "
            "calibration batch)"
            if batch_size_alias
            else ""
        ),
    )
    g.add_argument(
        "--tasks-num-fewshot",
        type=int,
        default=0,
        metavar="K",
        help="solved examples shown before every question in --tasks (the harness's num_fewshot, "
        "drawn from the task's training split; from local --tasks-data files, from the evaluated "
        "split without the question itself); default 0, the papers' zero-shot",
    )
    g.add_argument(
        "--verbose",
        action="store_true",
        help="let lm-evaluation-harness print its own log lines and progress bars",
    )
    g.add_argument(
        "--tasks-data",
        default=None,
        metavar="DIR",
        help="local task files laid out like shared/data (offline); default: $TRIMPRUNE_DATA "
        "where it has them, else the Hugging Face Hub",
    )


# flag groups of the generated pruning flags: PruneConfig's own fields, then one group per part
GROUPS = {
    None: "pruning",
    "scorer": "scorer",
    "allocation": "allocation",
    "calib": "calibration",
    "trim": "TRIM",
    "run": "execution",
    "search": "allocation search",
}


def _add_config_args(p, skip: tuple[str, ...] = ()) -> None:
    """One flag per PruneConfig field (flag, type, choices and help from the field), default None: a
    flag that is not given leaves the recipe's value (or the default) in place. `skip`: flat names
    given no flag."""
    groups, defaults = {}, PruneConfig().to_flat()
    for key, (part, f) in PruneConfig.flat_fields().items():
        if key in skip:
            continue
        g = groups.get(part) or groups.setdefault(part, p.add_argument_group(GROUPS[part]))
        meta, default = f.metadata, defaults[key]
        shown = default is not None and not isinstance(default, bool)
        help_ = f"{meta['help']} (default {default})" if shown else meta["help"]
        if meta.get("const") is not None:  # --offload [cpu|disk]: the flag alone means `const`
            g.add_argument(
                flag_of(f),
                dest=key,
                nargs="?",
                const=meta["const"],
                choices=meta["choices"],
                default=None,
                metavar=meta["metavar"],
                help=help_,
            )
        elif isinstance(default, bool):
            g.add_argument(
                flag_of(f),
                dest=key,
                action="store_false" if default else "store_true",
                default=None,
                help=help_,
            )
        elif isinstance(default, list):
            g.add_argument(
                flag_of(f),
                dest=key,
                type=float,
                nargs="+",
                default=None,
                metavar=meta["metavar"],
                help=help_,
            )
        else:
            g.add_argument(
                flag_of(f),
                dest=key,
                type={int: int, float: float}.get(type(default), str),
                default=None,
                choices=meta["choices"],
                metavar=meta["metavar"],
                help=help_,
            )


class _Help(argparse.HelpFormatter):
    """Each flag's default shown once: "(default: X)" added only where the help text does not
    already say it and there is one to say (not None, False or empty)."""

    def _get_help_string(self, action):
        text = action.help or ""
        d = action.default
        if "default" in text or d is None or d is False or d == [] or d is argparse.SUPPRESS:
            return text
        if action.option_strings and action.nargs != 0:
            return text + " (default: %(default)s)"
        return text


class _Parser(argparse.ArgumentParser):
    """A usage error is one line naming the flag, with a pointer to --help (exit code 2)."""

    def error(self, message: str):
        text = " ".join(message.split())
        self.exit(2, f"trimprune: error: {text} (see `{self.prog} --help`)\n")


def build_parser() -> argparse.ArgumentParser:
    ap = _Parser(prog="trimprune", description="One-shot LLM pruning with TRIM, Wanda, SparseGPT.")
    ap.add_argument("--version", action="store_true", help="print the version and exit")
    sub = ap.add_subparsers(dest="command")

    _add_prune_parser(sub)
    _add_eval_parser(sub)
    _add_report_parser(sub)
    _add_export_parser(sub)
    _add_sweep_parser(sub)
    return ap


def _add_prune_parser(sub) -> None:
    p = sub.add_parser(
        "prune",
        help="prune a model and write a Hugging Face model directory + report",
        formatter_class=_Help,
    )
    _add_model_args(p)
    p.add_argument("--recipe", help="YAML file with PruneConfig fields; explicit flags override it")
    p.add_argument("--output", required=True, help="output directory (written atomically)")
    p.add_argument(
        "--overwrite",
        action="store_true",
        help="replace --output if it is a folder trimprune wrote (one with its report.json), and "
        "remove partial outputs of interrupted runs beside it",
    )
    p.add_argument(
        "--no-save-model",
        action="store_true",
        help="write only masks, allocation and report (no weights), e.g. for sweeps",
    )
    p.add_argument(
        "--save-format",
        choices=["dense", "compact"],
        default="dense",
        help="dense: a plain Hugging Face directory; compact: each pruned weight as a bitmask "
        "plus its kept values (trimprune.load_pruned or `trimprune export --dense` read it back)",
    )
    p.add_argument(
        "--quiet",
        action="store_true",
        help="only errors and the final result lines (else progress: bars that stay on a "
        "terminal; in a log, timestamped lines for the load, calibration, each block, each "
        "evaluation and the write)",
    )
    p.add_argument(
        "--log-json",
        default=None,
        metavar="FILE",
        help="append one JSON line per pruned block: block, seconds, sparsity, TRIM kept",
    )
    p.add_argument(
        "--eval-seqlen", type=int, default=None, help="eval window length (default: --seqlen)"
    )
    _add_config_args(p)
    _add_eval_args(p)
    p.add_argument(
        "--no-dense-eval", action="store_true", help="skip evaluating the dense model first"
    )


def _add_eval_parser(sub) -> None:
    e = sub.add_parser(
        "eval",
        help="evaluate a model's perplexity",
        formatter_class=_Help,
    )
    _add_model_args(e)
    _add_eval_args(e, batch_size_alias=True)
    e.add_argument("--seqlen", type=int, default=2048, help="tokens per evaluation window")
    e.add_argument("--seed", type=int, default=0, help="seed for --eval self sampling")
    e.add_argument(
        "--offload",
        nargs="?",
        const="cpu",
        choices=["cpu", "disk"],
        default=False,
        metavar="{cpu,disk}",
        help="evaluate block by block: cpu (the flag alone) from CPU memory, disk from the model's "
        "safetensors",
    )
    e.add_argument("--output", default=None, metavar="FILE", help="write the results as JSON")
    e.add_argument(
        "--quiet",
        action="store_true",
        help="only errors and the results (else progress: bars that stay on a terminal; in a "
        "log, timestamped lines for the load and each evaluation)",
    )


def _add_report_parser(sub) -> None:
    r = sub.add_parser(
        "report", help="one HTML page (plots embedded) and Markdown for one or more prune outputs"
    )
    r.add_argument(
        "run_dirs", nargs="+", metavar="RUN_DIR", help="--output folders of `trimprune prune`"
    )
    r.add_argument(
        "-o",
        "--output",
        default=None,
        metavar="OUT.html",
        help="the HTML file (default RUN_DIR/report.html for one run, else "
        "trimprune-report.html); the Markdown is written beside it",
    )


def _add_export_parser(sub) -> None:
    x = sub.add_parser(
        "export", help="write a plain Hugging Face model directory from a prune's output"
    )
    x.add_argument(
        "--dense",
        action="store_true",
        required=True,
        help="rebuild the dense weights (the only export format)",
    )
    x.add_argument("run_dir", help="--output folder of `trimprune prune` (compact or dense)")
    x.add_argument("out_dir", help="new folder for the Hugging Face directory (written atomically)")
    x.add_argument(
        "--overwrite", action="store_true", help="replace out_dir if it is a folder trimprune wrote"
    )
    x.add_argument(
        "--trust-remote-code",
        action="store_true",
        help="allow model code from the model repository (off unless asked)",
    )


def _eval_data(pairs: list[str]) -> dict[str, str]:
    out = {}
    for p in pairs:
        if "=" not in p or not p.split("=", 1)[0] or not p.split("=", 1)[1]:
            raise TrimpruneError(
                f"--eval-data {p!r} is malformed: use NAME=PATH, e.g. wikitext2=wiki.test.raw"
            )
        k, v = p.split("=", 1)
        out[k] = v
    return out


def config_from_args(args) -> PruneConfig:
    """The recipe's values (if any) with the flags given on the command line on top; validated once.
    A sparsity given by neither is the default (0.5, N/M with --mask-structure, an allocation file's
    mean)."""
    flat = PruneConfig.recipe_flat(args.recipe) if getattr(args, "recipe", None) else {}
    given = {
        k: getattr(args, k) for k in PruneConfig.flat_fields() if getattr(args, k, None) is not None
    }
    if "mask_structure" in given and "sparsity" not in given:
        flat.pop("sparsity", None)  # N:M fixes the sparsity (N/M)
    return PruneConfig.from_flat(flat | given)


def _check_eval_args(args, seqlen: int):
    if args.eval_limit is not None and args.eval_limit < 1:
        raise TrimpruneError(f"--eval-limit {args.eval_limit} must be >= 1")
    if seqlen < 2:
        raise TrimpruneError(f"--seqlen {seqlen} must be >= 2")
    for name in args.eval or []:
        if name not in ("wikitext2", "c4", "ptb", "self") and name not in _eval_data(
            args.eval_data
        ):
            raise TrimpruneError(
                f"--eval {name} is not a known dataset: use wikitext2, c4, ptb or self, or give "
                f"--eval-data {name}=PATH"
            )
    if args.tasks_num_fewshot < 0:
        raise TrimpruneError(
            f"--tasks-num-fewshot {args.tasks_num_fewshot} must be >= 0 (0: zero-shot, as in "
            "the pruning papers)"
        )
    if args.tasks:
        from trimprune.io.zeroshot import check_tasks

        if args.tasks_limit is not None and args.tasks_limit < 1:
            raise TrimpruneError(f"--tasks-limit {args.tasks_limit} must be >= 1")
        check_tasks(args.tasks, args.tasks_data)


def _device(args):
    """The device of this process: --device, or under torchrun the GPU of its LOCAL_RANK (the
    process group is joined here)."""
    from trimprune.exec.distributed import init_from_env, launched
    from trimprune.io.models import resolve_device

    dev = resolve_device(args.device)
    return init_from_env(dev) if launched() else dev


def _main_rank() -> bool:
    from trimprune.core.ranks import Ranks

    return Ranks.current().main


def _same_windows(sets: dict) -> dict:
    """Under torchrun: rank 0's evaluation windows on every rank (`self` samples from the model)."""
    from trimprune.core.ranks import Ranks

    ranks = Ranks.current()
    if ranks.parallel:
        for name in sets:
            sets[name]["windows"] = ranks.gather(sets[name]["windows"])[0]
    return sets


def _evaluate(
    model,
    tok,
    sets: dict,
    args,
    dev,
    offload: bool,
    progress,
    label: str = "the model",
    storage=None,
) -> dict:
    """Perplexity on the prepared sets and zero-shot accuracy on --tasks: {"eval": ..., "zero_shot":
    ...}. A perplexity that is not a finite number stops with an error naming the set and `label`
    (the model). Under torchrun the ranks share the perplexity windows; rank 0 alone runs the
    zero-shot tasks. `storage`: the `LoadedModel.storage` of --offload disk."""
    from trimprune.io.evaluate import evaluate_sets
    from trimprune.io.zeroshot import evaluate_tasks, mean_accuracy

    out = {}
    if sets:
        out["eval"] = evaluate_sets(
            model, sets, args.eval_batch_size, dev, offload, progress, label, storage
        )
        for k, v in sets.items():
            out["eval"][k] |= {key: v[key] for key in ("source", "files", "protocol") if key in v}
    if args.tasks and _main_rank():
        t0 = time.perf_counter()
        scores = evaluate_tasks(
            model,
            tok,
            args.tasks,
            limit=args.tasks_limit,
            batch_size=args.tasks_batch_size,
            tasks_data=args.tasks_data,
            device=dev,
            num_fewshot=args.tasks_num_fewshot,
            progress=progress,
            label=label,
            verbose=args.verbose,
        )
        out["zero_shot"] = {t: s.to_dict() for t, s in scores.items()}
        out["zero_shot_protocol"] = _tasks_protocol(args)
        out["zero_shot_mean"] = mean_accuracy(scores)
        out["zero_shot_seconds"] = time.perf_counter() - t0
    return out


def _tasks_protocol(args) -> dict:
    """How --tasks ran: report.json's `metrics.zero_shot_protocol`."""
    from importlib.metadata import version

    return {
        "harness": f"lm-eval {version('lm_eval')}",
        "tasks": list(args.tasks),
        "num_fewshot": args.tasks_num_fewshot,
        "limit": args.tasks_limit,
        "batch_size": args.tasks_batch_size,
    }


def _metrics(dense: dict, pruned: dict) -> dict:
    """report.json's metrics: per dataset / task, after pruning and (dense_*) before."""
    m = {
        "perplexity": {k: v["perplexity"] for k, v in pruned.get("eval", {}).items()},
        "dense_perplexity": {k: v["perplexity"] for k, v in dense.get("eval", {}).items()},
        "eval": pruned.get("eval", {}),
        "dense_eval": dense.get("eval", {}),
    }
    if "zero_shot" in pruned:
        m |= {
            "zero_shot": pruned["zero_shot"],
            "zero_shot_mean": pruned["zero_shot_mean"],
            "zero_shot_protocol": pruned.get("zero_shot_protocol"),
        }
    if "zero_shot" in dense:
        m |= {
            "dense_zero_shot": dense["zero_shot"],
            "dense_zero_shot_mean": dense["zero_shot_mean"],
        }
    if "self" in m["eval"] and "self" in m["dense_eval"]:
        d, p = m["dense_eval"]["self"]["nll"], m["eval"]["self"]["nll"]
        m["self_kl"] = {
            "dense_nll": d,
            "pruned_nll": p,
            "kl_estimate": p - d,
            "source": m["eval"]["self"]["source"],
        }
    return m


def _check_disk_args(args, offload, calib: str | None = None) -> None:
    """What `--offload disk` cannot do (it never holds the whole model in memory), before anything
    is loaded."""
    if offload != "disk":
        return
    from trimprune.exec.distributed import launched

    why = None
    if getattr(args, "save_format", "dense") == "compact":
        why = "--save-format compact"
    elif args.tasks:
        why = "--tasks (lm-evaluation-harness runs the whole model in memory)"
    elif "self" in (args.eval or []) or calib == "self":
        why = f"--{'calib' if calib == 'self' else 'eval'} self (it samples from the whole model)"
    elif launched() and args.command == "prune":
        why = "several processes (torchrun)"
    if why:
        raise TrimpruneError(f"--offload disk does not support {why}: use --offload cpu")


def cmd_prune(args) -> int:
    import contextlib

    with (
        contextlib.ExitStack() as scope
    ):  # the output staged by --offload disk is removed on failure
        return _prune_command(args, scope)


def _warn(message: str) -> None:
    print(f"trimprune: warning: {message}", file=sys.stderr)


def _prune_command(args, scope) -> int:
    from trimprune.api import prune
    from trimprune.core.model import ModelAdapter
    from trimprune.core.ranks import Ranks
    from trimprune.io.export import StagedDir
    from trimprune.io.models import load_model
    from trimprune.preflight import check_model_keeps_weights, check_prune_inputs
    from trimprune.session import check_against_model, check_before_load

    t_all = time.perf_counter()
    cfg = config_from_args(args)
    eval_seqlen = args.eval_seqlen or cfg.calib.seqlen
    _check_eval_args(args, eval_seqlen)
    _check_disk_args(args, cfg.run.offload, cfg.calib.source)
    warnings_ = check_prune_inputs(
        args, cfg, _eval_data(args.eval_data)
    )  # everything before the model loads
    dev = _device(args)
    check_before_load(cfg, Ranks.current())  # a search or --trim-guard model: one process only
    main_rank = _main_rank()
    for w in warnings_ if main_rank else []:
        _warn(w)
    progress = Progress(
        "off" if args.quiet or not main_rank else "auto",
        log_json=args.log_json if main_rank else None,
    )
    t0 = time.perf_counter()
    with progress.stage(f"loading the model {args.model}"):
        loaded = load_model(
            args.model,
            args.gguf_file,
            args.dtype,
            dev,
            offload=cfg.run.offload,
            trust_remote_code=args.trust_remote_code,
        )
    model, tok, storage = loaded.model, loaded.tokenizer, loaded.storage
    t_load = time.perf_counter() - t0
    staged = None
    if storage is not None:  # each pruned block is written as it finishes
        staged = scope.enter_context(StagedDir(args.output, args.overwrite))
        storage.write_to(staged.tmp)
    adapter = ModelAdapter.from_model(model)
    # before any evaluation: the context, an allocation file, an existing resume state
    checked = check_against_model(cfg, model, seqlens=(eval_seqlen,), loaded_ranks=True)
    cfg = checked.config
    check_model_keeps_weights(cfg, model)
    sets = _prune_eval_sets(args, tok, eval_seqlen, model, cfg.calib.seed, progress)
    offload = cfg.run.offload
    dense = (
        {}
        if args.no_dense_eval
        else _evaluate(model, tok, sets, args, dev, offload, progress, "the dense model", storage)
    )
    result = prune(model, tok, checked, storage=storage, device=dev, progress=progress)
    pruned = _evaluate(model, tok, sets, args, dev, offload, progress, "the pruned model", storage)
    report = _prune_report(args, loaded, adapter, dev, result, dense, pruned, t_load, t_all)
    if not main_rank:  # rank 0 writes the outputs and prints
        return 0
    _write_prune_outputs(args, cfg, loaded, result, report, staged, progress)
    return 0


def _prune_eval_sets(args, tok, eval_seqlen, model, seed, progress) -> dict:
    from trimprune.io.evaluate import prepare_eval_sets

    sets = (
        prepare_eval_sets(
            args.eval,
            tok,
            eval_seqlen,
            _eval_data(args.eval_data),
            args.eval_limit,
            model,
            self_samples=args.self_eval_samples,
            seed=seed,
            progress=progress,
        )
        if args.eval
        else {}
    )
    return _same_windows(sets)


def _prune_report(args, loaded, adapter, dev, result, dense, pruned, t_load, t_all) -> dict:
    from trimprune.io.report import build_report

    model = loaded.model
    metrics = _metrics(dense, pruned)
    timings = dict(result.timings, load_seconds=t_load)
    timings["eval_seconds"] = sum(v["seconds"] for v in metrics["eval"].values()) + sum(
        v["seconds"] for v in metrics["dense_eval"].values()
    )
    timings["zero_shot_seconds"] = dense.get("zero_shot_seconds", 0.0) + pruned.get(
        "zero_shot_seconds", 0.0
    )
    model_info = {
        "source": args.model,
        "gguf_file": args.gguf_file,
        "class": type(model).__name__,
        "model_type": getattr(model.config, "model_type", None),
        "num_blocks": adapter.num_blocks,
        "dtype": str(next(model.parameters()).dtype),
        "dtype_from": loaded.source.dtype_from,
        "device": str(dev),
    }
    timings["total_seconds"] = time.perf_counter() - t_all
    report = build_report(
        result, model_info, metrics, timings, dev, command=["trimprune"] + sys.argv[1:]
    )
    if args.eval_limit is not None:
        report["notes"].append(
            f"--eval-limit {args.eval_limit}: perplexities use only the first windows"
        )
    if args.tasks_limit is not None:
        report["notes"].append(
            f"--tasks-limit {args.tasks_limit}: zero-shot accuracies use only the first examples"
        )
    return report


def _write_prune_outputs(args, cfg, loaded, result, report, staged, progress) -> None:
    from trimprune.io.export import write_outputs
    from trimprune.io.report import markdown, summary_text
    from trimprune.io.resume import remove_resume_state

    with progress.stage(f"writing the outputs to {args.output}"):
        write_outputs(
            args.output,
            loaded.model,
            loaded.tokenizer,
            result,
            report,
            markdown,
            overwrite=args.overwrite,
            save_model=not args.no_save_model,
            save_format=args.save_format,
            staged=staged,
            storage=loaded.storage,
            source=loaded.source,
        )
    if cfg.run.checkpoint_dir and not cfg.run.keep_checkpoint:
        remove_resume_state(
            cfg.run.checkpoint_dir
        )  # the output is complete: the resume state is not needed
    print(summary_text(report))
    print(f"written: {args.output}")


def cmd_eval(args) -> int:
    from trimprune.core.model import ModelAdapter
    from trimprune.io.evaluate import prepare_eval_sets
    from trimprune.io.export import write_json_atomic
    from trimprune.io.models import load_model
    from trimprune.io.report import versions, zero_shot_table

    if not args.eval and not args.tasks:
        raise TrimpruneError(
            "trimprune eval needs --eval (perplexity) or --tasks (zero-shot accuracy), e.g. "
            "--eval wikitext2 or --tasks boolq,rte"
        )
    _check_eval_args(args, args.seqlen)
    _check_disk_args(args, args.offload)
    from trimprune.preflight import check_eval_inputs

    check_eval_inputs(args, _eval_data(args.eval_data))  # everything before the model loads
    dev = _device(args)
    main_rank = _main_rank()
    progress = Progress("off" if args.quiet or not main_rank else "auto")
    with progress.stage(f"loading the model {args.model}"):
        loaded = load_model(
            args.model,
            args.gguf_file,
            args.dtype,
            dev,
            offload=args.offload,
            trust_remote_code=args.trust_remote_code,
        )
    model, tok = loaded
    if args.eval:
        ModelAdapter.from_model(model).check_context(args.seqlen, "--seqlen")
    sets = (
        prepare_eval_sets(
            args.eval,
            tok,
            args.seqlen,
            _eval_data(args.eval_data),
            args.eval_limit,
            model,
            self_samples=args.self_eval_samples,
            seed=args.seed,
            progress=progress,
        )
        if args.eval
        else {}
    )
    res = _evaluate(
        model, tok, _same_windows(sets), args, dev, args.offload, progress, storage=loaded.storage
    )
    if not main_rank:
        return 0
    for name, r in res.get("eval", {}).items():
        lim = f" (first {r['windows']} windows)" if r["limited"] else ""
        print(
            f"{name:<12} perplexity {r['perplexity']:.4f}  nll {r['nll']:.5f}  windows "
            f"{r['windows']}{lim}"
        )
    metrics = _metrics({}, res)
    if "zero_shot" in metrics:
        print("\n".join(zero_shot_table(metrics)))
    if args.output:
        write_json_atomic(
            args.output,
            {
                "model": args.model,
                "seqlen": args.seqlen,
                "versions": versions(dev),
                "metrics": metrics,
            },
        )
    return 0


def cmd_export(args) -> int:
    from transformers import AutoTokenizer

    from trimprune.io.compact import load_pruned
    from trimprune.io.export import atomic_dir, save_model_dir, write_export_marker
    from trimprune.preflight import check_export_inputs

    for w in check_export_inputs(args):
        _warn(w)
    model = load_pruned(args.run_dir, trust_remote_code=args.trust_remote_code)
    try:
        tok = AutoTokenizer.from_pretrained(args.run_dir, trust_remote_code=args.trust_remote_code)
    except (OSError, ValueError):
        tok = None
    with atomic_dir(args.out_dir, args.overwrite, flag="OUT_DIR") as tmp:
        save_model_dir(tmp, model, tok)
        write_export_marker(tmp, args.run_dir)
    print(f"written: {args.out_dir}")
    return 0


def cmd_report(args) -> int:
    from trimprune.io.export import check_output_file
    from trimprune.io.render import write_report

    if args.output:
        check_output_file(args.output, "--output")
    page, md = write_report(args.run_dirs, args.output)
    print(f"written: {page}, {md}")
    return 0


# ------------------------------------------------------------------------------------------ sweep
def _sparsities(s: str) -> list[float]:
    out: list[float] = []
    for x in (x.strip() for x in s.split(",")):
        try:
            v = float(x)
        except ValueError:
            v = float("nan")
        if not 0.0 <= v < 1.0:  # NaN too
            raise argparse.ArgumentTypeError(
                f"{x!r} is not a sparsity: give fractions in [0, 1), e.g. 0.5,0.6,0.7"
            )
        if v in out:
            raise argparse.ArgumentTypeError(f"{x!r} is given twice: give each sparsity once")
        out.append(v)
    return out


def _method_spec(spec: str) -> tuple[str, bool]:
    """A method of `--methods`: SCORER or SCORER+trim -> (scorer, TRIM on)."""
    from trimprune.config import SCORERS

    scorer, *rest = spec.lower().split("+")
    if scorer not in SCORERS or rest not in ([], ["trim"]):
        raise argparse.ArgumentTypeError(
            f"{spec!r} is not a method: give a scorer ({', '.join(SCORERS)}), optionally with "
            "+trim, e.g. wanda,wanda+trim,sparsegpt"
        )
    return scorer, bool(rest)


def _methods(s: str) -> list[str]:
    out: list[str] = []
    for spec in (x.strip() for x in s.split(",")):
        scorer, trim = _method_spec(spec)
        name = scorer + ("+trim" if trim else "")
        if name in out:
            raise argparse.ArgumentTypeError(f"{spec!r} is given twice: give each method once")
        out.append(name)
    return out


def _add_sweep_parser(sub) -> None:
    s = sub.add_parser(
        "sweep",
        help="prune at several sparsities and/or with several methods from one model load, one "
        "calibration capture and one dense evaluation; one comparison report",
    )
    _add_model_args(s)
    g = s.add_argument_group("sweep")
    g.add_argument(
        "--sparsities",
        type=_sparsities,
        default=None,
        metavar="S1,S2",
        help="comma list of target sparsities, e.g. 0.5,0.6,0.7 (default: --recipe's or 0.5)",
    )
    g.add_argument(
        "--methods",
        type=_methods,
        default=None,
        metavar="M1,M2",
        help="comma list of SCORER or SCORER+trim (scorers: magnitude, wanda, sparsegpt), e.g. "
        "wanda,wanda+trim,sparsegpt (default: --recipe's or wanda)",
    )
    s.add_argument("--recipe", help="YAML file with PruneConfig fields; explicit flags override it")
    s.add_argument(
        "--output",
        required=True,
        help="output directory (written atomically): METHOD-SPARSITY/ per run, report.html, "
        "report.md, sweep.json",
    )
    s.add_argument(
        "--overwrite",
        action="store_true",
        help="replace --output if it is a folder trimprune wrote, and remove partial outputs of "
        "interrupted runs beside it",
    )
    s.add_argument(
        "--save-models",
        action="store_true",
        help="write each pruned model too (default: masks, allocation and report only)",
    )
    s.add_argument(
        "--save-format",
        choices=["dense", "compact"],
        default="dense",
        help="with --save-models: dense (a plain Hugging Face directory) or compact (bitmask plus "
        "kept values)",
    )
    s.add_argument(
        "--quiet",
        action="store_true",
        help="no progress output (else bars on a terminal, one line per block and per run in a "
        "log)",
    )
    s.add_argument(
        "--eval-seqlen", type=int, default=None, help="eval window length (default: --seqlen)"
    )
    _add_config_args(s, skip=("sparsity", "scorer", "trim"))
    _add_eval_args(s)
    s.add_argument(
        "--no-dense-eval", action="store_true", help="skip evaluating the dense model first"
    )


def _sweep_configs(args) -> tuple[PruneConfig, dict[str, PruneConfig]]:
    """The recipe and flags' config, and per run name (METHOD-SPARSITY, method-major) its config:
    all of them built (and so validated) before anything loads."""
    import dataclasses

    from trimprune.errors import ConfigError

    base = config_from_args(args)
    methods = args.methods or [base.scorer.name + ("+trim" if base.trim.enabled else "")]
    sparsities = args.sparsities or [base.sparsity]
    runs = {}
    for method in methods:
        scorer, trim = _method_spec(method)
        for sp in sparsities:
            try:
                runs[f"{method}-{sp:g}"] = dataclasses.replace(
                    base,
                    sparsity=sp,
                    scorer=dataclasses.replace(base.scorer, name=scorer),
                    trim=dataclasses.replace(base.trim, enabled=trim),
                )
            except ConfigError as e:
                raise ConfigError(f"--methods {method} --sparsities {sp:g}: {e.template}") from None
    return base, runs


def _sweep_row(name: str, method: str, result, report: dict, seconds: float) -> dict:
    m = report["metrics"]
    ppl, dense = m.get("perplexity", {}), m.get("dense_perplexity", {})
    return {
        "name": name,
        "method": method,
        "sparsity": result.config.sparsity,
        "achieved": result.global_sparsity,
        "perplexity": ppl,
        "ratio_to_dense": {k: v / dense[k] for k, v in ppl.items() if dense.get(k)},
        "zero_shot_mean": m.get("zero_shot_mean"),
        "prune_seconds": result.timings.get("prune_seconds"),
        "seconds": seconds,
        "report": f"{name}/report.json",
    }


def _sweep_line(i: int, n: int, row: dict) -> str:
    parts = [f"sweep {i + 1}/{n} {row['name']}: sparsity {row['achieved']:.4f}"]
    for k, v in row["perplexity"].items():
        r = row["ratio_to_dense"].get(k)
        parts.append(f"ppl {k} {v:.3f}" + (f" (x{r:.2f} dense)" if r is not None else ""))
    if row["zero_shot_mean"] is not None:
        parts.append(f"zero-shot mean {100 * row['zero_shot_mean']:.2f} %")
    return ", ".join(parts) + f", {row['seconds']:.1f} s"


def _sweep_preflight(args) -> tuple[PruneConfig, dict[str, PruneConfig]]:
    """Every check before the model loads: the configs of all runs, the evaluation flags, the
    output folder (locked), the data files."""
    from trimprune.exec.distributed import launched
    from trimprune.preflight import _config_in_features, check_keeps_weights, check_prune_inputs
    from trimprune.sweep import check_sweep_configs

    base, runs = _sweep_configs(args)
    check_sweep_configs(list(runs.values()))
    if launched():
        raise TrimpruneError("trimprune sweep runs in one process, not under torchrun")
    _check_eval_args(args, args.eval_seqlen or base.calib.seqlen)
    args.no_save_model, args.log_json = not args.save_models, None  # what preflight reads
    first = next(iter(runs.values()))
    warnings_ = check_prune_inputs(args, first, _eval_data(args.eval_data))
    for cfg in runs.values():
        check_keeps_weights(cfg, None, _config_in_features(args.model, cfg))
    for w in warnings_:
        _warn(w)
    return base, runs


def _write_sweep_summary(args, folder, names, rows, dense, dev, times):
    """The sweep's plot, comparison report (report.html, report.md) and sweep.json in `folder`;
    returns the report's two paths."""
    import json

    from trimprune.io import plots
    from trimprune.io.export import write_files_list
    from trimprune.io.render import write_report
    from trimprune.io.report import versions

    figures = []
    if plots.available():
        plotted = plots.sweep_ratio(rows, dense, folder / "sweep.png")
        figures = [folder / plotted] if plotted else []
    page, md = write_report([str(folder / n) for n in names], folder / "report.html", figures)
    summary = {
        "format": "trimprune-sweep/1",
        "model": args.model,
        "command": ["trimprune"] + sys.argv[1:],
        "versions": versions(dev),
        "methods": list(dict.fromkeys(r["method"] for r in rows)),
        "sparsities": list(dict.fromkeys(r["sparsity"] for r in rows)),
        "dense": {
            "perplexity": {k: v["perplexity"] for k, v in dense.get("eval", {}).items()},
            "zero_shot_mean": dense.get("zero_shot_mean"),
        },
        "runs": rows,
        "plots": [f.name for f in figures],
        "notes": []
        if figures
        else ["no plot: matplotlib is not installed (pip install 'trimprune[report]')"],
        "timings": {
            "load_seconds": times["load_seconds"],
            "dense_eval_seconds": times["dense_eval_seconds"],
            "total_seconds": time.perf_counter() - times["t_all"],
        },
    }
    (folder / "sweep.json").write_text(json.dumps(summary, indent=1) + "\n")
    write_files_list(folder)
    return page, md


def _sweep_load(args, base, runs, dev, eval_seqlen):
    """The model, loaded once, and every run's config checked against it (`Checked`)."""
    from trimprune.io.models import load_model
    from trimprune.preflight import check_model_keeps_weights
    from trimprune.session import check_against_model

    loaded = load_model(
        args.model,
        args.gguf_file,
        args.dtype,
        dev,
        offload=base.run.offload,
        trust_remote_code=args.trust_remote_code,
    )
    checked = {}
    for name, cfg in runs.items():
        checked[name] = check_against_model(
            cfg, loaded.model, seqlens=(eval_seqlen,), loaded_ranks=True
        )
        check_model_keeps_weights(checked[name].config, loaded.model)
    return loaded, checked


def cmd_sweep(args) -> int:
    """`trimprune sweep`: every (method, sparsity) pruned from the dense weights of one load, with
    one calibration capture (`trimprune.sweep`) and one dense evaluation."""
    import contextlib
    from pathlib import Path

    from trimprune.core.model import ModelAdapter
    from trimprune.io.export import StagedDir, write_outputs
    from trimprune.io.report import markdown
    from trimprune.sweep import sweep

    t_all = time.perf_counter()
    base, runs = _sweep_preflight(args)
    eval_seqlen = args.eval_seqlen or base.calib.seqlen
    dev = _device(args)
    progress = Progress("off" if args.quiet else "auto")
    t0 = time.perf_counter()
    loaded, checked = _sweep_load(args, base, runs, dev, eval_seqlen)
    model, tok = loaded.model, loaded.tokenizer
    t_load = time.perf_counter() - t0
    adapter = ModelAdapter.from_model(model)
    sets = _prune_eval_sets(args, tok, eval_seqlen, model, base.calib.seed, progress)
    t0 = time.perf_counter()
    dense = (
        {}
        if args.no_dense_eval
        else _evaluate(model, tok, sets, args, dev, base.run.offload, progress, "the dense model")
    )
    t_dense = time.perf_counter() - t0
    names = list(checked)
    rows: list[dict] = []
    with contextlib.ExitStack() as scope:
        staged = scope.enter_context(StagedDir(args.output, args.overwrite))
        t_run = [time.perf_counter()]

        def on_result(i: int, result) -> None:
            name = names[i]
            pruned = _evaluate(
                model, tok, sets, args, dev, base.run.offload, progress, f"the pruned model {name}"
            )
            report = _prune_report(args, loaded, adapter, dev, result, dense, pruned, t_load, t_all)
            write_outputs(
                staged.tmp / name,
                model,
                tok,
                result,
                report,
                markdown,
                save_model=args.save_models,
                save_format=args.save_format,
                source=loaded.source,
            )
            row = _sweep_row(
                name, name.rsplit("-", 1)[0], result, report, time.perf_counter() - t_run[0]
            )
            rows.append(row)
            progress.message(_sweep_line(i, len(names), row))
            t_run[0] = time.perf_counter()

        sweep(
            model,
            tok,
            [checked[n] for n in names],
            on_result=on_result,
            device=dev,
            progress=progress,
        )
        times = {"load_seconds": t_load, "dense_eval_seconds": t_dense, "t_all": t_all}
        page, md = _write_sweep_summary(args, staged.tmp, names, rows, dense, dev, times)
        staged.commit()
    out = Path(args.output)
    for i, row in enumerate(rows):
        print(_sweep_line(i, len(rows), row))
    print(f"written: {out / page.name}, {out / md.name}, {out / 'sweep.json'}")
    return 0


class _Terminated(BaseException):
    """SIGTERM, raised in the main thread so that every `finally` runs (temporary folders are
    removed)."""


def _terminate_by_exception():
    """Turn SIGTERM into `_Terminated` in a single process (under torchrun the launcher owns the
    signals). Returns the previous handler, or None when none was installed."""
    import os
    import signal
    import threading

    if (
        threading.current_thread() is not threading.main_thread()
        or int(os.environ.get("WORLD_SIZE", "1")) > 1
    ):
        return None

    def handler(signum, frame):
        raise _Terminated()

    return signal.signal(signal.SIGTERM, handler)


COMMANDS = {
    "prune": cmd_prune,
    "eval": cmd_eval,
    "export": cmd_export,
    "report": cmd_report,
    "sweep": cmd_sweep,
}


def main(argv=None) -> int:
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    warnings.filterwarnings("ignore", message=".*TRANSFORMERS_CACHE.*")
    ap = build_parser()
    args = ap.parse_args(argv)
    if args.version:
        from trimprune import __version__

        print(__version__)
        return 0
    if args.command is None:
        ap.print_help()
        return 2
    quiet = getattr(args, "quiet", False)
    if quiet or not sys.stderr.isatty():
        # no bars in a log, the libraries' own included (set before they import tqdm: the commands
        # import them)
        import os

        os.environ.update(
            HF_HUB_DISABLE_PROGRESS_BARS="1",
            HF_DATASETS_DISABLE_PROGRESS_BARS="1",
            TQDM_DISABLE="1",
        )
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
        if quiet:
            hf_logging.set_verbosity_error()
    previous = _terminate_by_exception()
    try:
        return COMMANDS[args.command](args)
    except _Terminated:
        print(
            "trimprune: terminated (SIGTERM); nothing was written to --output and its temporary "
            "folder was removed",
            file=sys.stderr,
        )
        return 143
    except TrimpruneError as e:
        import os

        rank = f" (rank {os.environ['RANK']})" if int(os.environ.get("WORLD_SIZE", "1")) > 1 else ""
        print(f"trimprune: error{rank}: {e.cli_message()}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        import os

        state_dir = getattr(args, "checkpoint_dir", None)
        kept = (
            f"; the resume state in {state_dir} keeps the finished blocks: rerun with --resume to "
            "continue"
            if state_dir and os.path.isfile(os.path.join(state_dir, "state.json"))
            else ""
        )
        print(
            f"trimprune: interrupted (nothing was written{' to --output' if kept else ''}){kept}",
            file=sys.stderr,
        )
        return 130
    finally:
        from trimprune.io.export import release_output_locks

        release_output_locks()
        if previous is not None:
            import signal

            signal.signal(signal.SIGTERM, previous)
        if args.command in ("prune", "eval", "sweep"):
            from trimprune.exec.distributed import shutdown

            shutdown()


if __name__ == "__main__":
    sys.exit(main())
