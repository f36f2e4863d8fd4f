"""Command line: `trimprune prune` and `trimprune eval`."""
from __future__ import annotations

import argparse
import logging
import sys
import time
import warnings

from .config import PruneConfig, flag_of
from .errors import TrimpruneError
from .io.progress import Progress


def _eval_names(s: str) -> list[str]:
    names = [x.strip() for x in s.split(",") if x.strip()]
    if not names:
        raise argparse.ArgumentTypeError("--eval needs at least one name, e.g. wikitext2,self")
    return names


def _add_model_args(p):
    g = p.add_argument_group("model")
    g.add_argument("--model", required=True,
                   help="hub id, local model directory, a .gguf file, or a built-in alias (smollm2-135m)")
    g.add_argument("--gguf-file", help="GGUF file to load (path, or name inside --model directory)")
    g.add_argument("--device", default=None, help="cpu, cuda or cuda:N (default: cuda if available, else cpu)")
    g.add_argument("--dtype", default=None, choices=["float32", "float16", "bfloat16"],
                   help="weights dtype (default: float16 on GPU, float32 on CPU)")
    g.add_argument("--trust-remote-code", action="store_true",
                   help="allow model code from the model repository (off unless asked)")


def _add_eval_args(p, required: bool):
    g = p.add_argument_group("evaluation")
    g.add_argument("--eval", type=_eval_names, default=None, required=required,
                   help="comma list of wikitext2, c4, ptb, self, or names given by --eval-data")
    g.add_argument("--eval-data", action="append", default=[], metavar="NAME=PATH",
                   help="local file for an evaluation set (repeatable), e.g. wikitext2=wiki.test.raw")
    g.add_argument("--eval-limit", type=int, default=None, metavar="W",
                   help="evaluate only the first W windows (quick check; the report says so)")
    g.add_argument("--eval-batch-size", type=int, default=4, help="windows per forward pass in evaluation")
    g.add_argument("--self-eval-samples", type=int, default=16,
                   help="number of held-out sequences sampled from the dense model for --eval self")


# flag groups of the generated pruning flags: PruneConfig's own fields, then one group per part
GROUPS = {None: "pruning", "scorer": "scorer", "allocation": "allocation",
          "calib": "calibration", "trim": "TRIM", "run": "execution"}


def _add_config_args(p) -> None:
    """One flag per PruneConfig field (flag, type, choices and help from the field), default None: a
    flag that is not given leaves the recipe's value (or the default) in place."""
    groups, defaults = {}, PruneConfig().to_flat()
    for key, (part, f) in PruneConfig.flat_fields().items():
        g = groups.get(part) or groups.setdefault(part, p.add_argument_group(GROUPS[part]))
        meta, default = f.metadata, defaults[key]
        shown = default is not None and not isinstance(default, bool)
        help_ = f"{meta['help']} (default {default})" if shown else meta["help"]
        if isinstance(default, bool):
            g.add_argument(flag_of(f), dest=key, action="store_false" if default else "store_true", default=None,
                           help=help_)
        elif isinstance(default, list):
            g.add_argument(flag_of(f), dest=key, type=float, nargs="+", default=None, metavar=meta["metavar"],
                           help=help_)
        else:
            g.add_argument(flag_of(f), dest=key, type={int: int, float: float}.get(type(default), str), default=None,
                           choices=meta["choices"],
                           metavar=meta["metavar"], help=help_)


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="trimprune", description="One-shot LLM pruning with TRIM, Wanda, SparseGPT.")
    ap.add_argument("--version", action="store_true", help="print the version and exit")
    sub = ap.add_subparsers(dest="command")

    p = sub.add_parser("prune", help="prune a model and write a Hugging Face model directory + report")
    _add_model_args(p)
    p.add_argument("--recipe", help="YAML file with PruneConfig fields; explicit flags override it")
    p.add_argument("--output", required=True, help="output directory (written atomically)")
    p.add_argument("--overwrite", action="store_true", help="replace --output if it exists")
    p.add_argument("--no-save-model", action="store_true",
                   help="write only masks, allocation and report (no weights), e.g. for sweeps")
    p.add_argument("--save-format", choices=["dense", "compact"], default="dense",
                   help="dense: a plain Hugging Face directory; compact: each pruned weight as a bitmask plus its "
                        "kept values (trimprune.load_pruned or `trimprune export --dense` read it back)")
    p.add_argument("--quiet", action="store_true",
                   help="no progress output (else bars on a terminal, one line per block in a log)")
    p.add_argument("--log-json", default=None, metavar="FILE",
                   help="append one JSON line per pruned block: block, seconds, sparsity, TRIM kept")
    p.add_argument("--eval-seqlen", type=int, default=None, help="eval window length (default: --seqlen)")
    _add_config_args(p)
    _add_eval_args(p, required=False)
    p.add_argument("--no-dense-eval", action="store_true", help="skip evaluating the dense model first")

    e = sub.add_parser("eval", help="evaluate a model's perplexity",
                       formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    _add_model_args(e)
    _add_eval_args(e, required=True)
    e.add_argument("--seqlen", type=int, default=2048, help="tokens per evaluation window")
    e.add_argument("--seed", type=int, default=0, help="seed for --eval self sampling")
    e.add_argument("--offload", action="store_true", help="evaluate block by block from CPU memory")
    e.add_argument("--output", default=None, metavar="FILE", help="write the results as JSON")
    e.add_argument("--quiet", action="store_true",
                   help="no progress output (else bars on a terminal, nothing per batch in a log)")

    x = sub.add_parser("export", help="write a plain Hugging Face model directory from a prune's output")
    x.add_argument("--dense", action="store_true", required=True,
                   help="rebuild the dense weights (the only export format)")
    x.add_argument("run_dir", help="--output folder of `trimprune prune` (compact or dense)")
    x.add_argument("out_dir", help="new folder for the Hugging Face directory (written atomically)")
    x.add_argument("--overwrite", action="store_true", help="replace out_dir if it exists")
    x.add_argument("--trust-remote-code", action="store_true",
                   help="allow model code from the model repository (off unless asked)")
    return ap


def _eval_data(pairs: list[str]) -> dict[str, str]:
    out = {}
    for p in pairs:
        if "=" not in p or not p.split("=", 1)[0] or not p.split("=", 1)[1]:
            raise TrimpruneError(f"--eval-data {p!r} is malformed: use NAME=PATH, e.g. wikitext2=wiki.test.raw")
        k, v = p.split("=", 1)
        out[k] = v
    return out


def config_from_args(args) -> PruneConfig:
    """The recipe's config (if any) with the flags given on the command line on top; validated once."""
    flat = PruneConfig.from_yaml(args.recipe).to_flat() if getattr(args, "recipe", None) else {}
    given = {k: getattr(args, k) for k in PruneConfig.flat_fields() if getattr(args, k, None) is not None}
    if "mask_structure" in given and "sparsity" not in given:
        flat.pop("sparsity", None)               # N:M fixes the sparsity (N/M)
    return PruneConfig.from_flat(flat | given)


def _check_eval_args(args, seqlen: int):
    if args.eval_limit is not None and args.eval_limit < 1:
        raise TrimpruneError(f"--eval-limit {args.eval_limit} must be >= 1")
    if seqlen < 2:
        raise TrimpruneError(f"--seqlen {seqlen} must be >= 2")
    for name in args.eval or []:
        if name not in ("wikitext2", "c4", "ptb", "self") and name not in _eval_data(args.eval_data):
            raise TrimpruneError(f"--eval {name} is not a known dataset: use wikitext2, c4, ptb or self, or give "
                                 f"--eval-data {name}=PATH")


def cmd_prune(args) -> int:
    from .api import prune
    from .io.evaluate import evaluate_sets, prepare_eval_sets
    from .io.export import check_output_dir, write_outputs
    from .io.models import ModelAdapter, load_model, resolve_device
    from .io.report import build_report, markdown, summary_text

    t_all = time.perf_counter()
    cfg = config_from_args(args)
    check_output_dir(args.output, args.overwrite)
    eval_data = _eval_data(args.eval_data)
    eval_seqlen = args.eval_seqlen or cfg.calib.seqlen
    _check_eval_args(args, eval_seqlen)
    progress = Progress("off" if args.quiet else "auto", log_json=args.log_json)
    dev = resolve_device(args.device)
    t0 = time.perf_counter()
    model, tok = load_model(args.model, args.gguf_file, args.dtype, dev, offload=cfg.run.offload,
                            trust_remote_code=args.trust_remote_code)
    t_load = time.perf_counter() - t0
    adapter = ModelAdapter.from_model(model)
    adapter.check_context(cfg.calib.seqlen, "--seqlen")
    adapter.check_context(eval_seqlen, "--eval-seqlen")
    metrics = {"perplexity": {}, "dense_perplexity": {}, "eval": {}, "dense_eval": {}}
    sets = {}
    if args.eval:
        sets = prepare_eval_sets(args.eval, tok, eval_seqlen, eval_data, args.eval_limit, model,
                                 self_samples=args.self_eval_samples, seed=cfg.calib.seed, progress=progress)
        if not args.no_dense_eval:
            dense = evaluate_sets(model, sets, args.eval_batch_size, dev, cfg.run.offload, progress)
            metrics["dense_eval"] = dense
            metrics["dense_perplexity"] = {k: v["perplexity"] for k, v in dense.items()}
    result = prune(model, tok, cfg, device=dev, progress=progress)
    if sets:
        pr = evaluate_sets(model, sets, args.eval_batch_size, dev, cfg.run.offload, progress)
        metrics["eval"] = pr
        metrics["perplexity"] = {k: v["perplexity"] for k, v in pr.items()}
        if "self" in pr and "self" in metrics["dense_eval"]:
            d, p = metrics["dense_eval"]["self"]["nll"], pr["self"]["nll"]
            metrics["self_kl"] = {"dense_nll": d, "pruned_nll": p, "kl_estimate": p - d,
                                  "source": sets["self"]["source"]}
        for k, v in sets.items():
            pr[k]["source"] = v["source"]
    timings = dict(result.timings, load_seconds=t_load)
    timings["eval_seconds"] = sum(v["seconds"] for v in metrics["eval"].values()) + \
        sum(v["seconds"] for v in metrics["dense_eval"].values())
    model_info = {"source": args.model, "gguf_file": args.gguf_file, "class": type(model).__name__,
                  "model_type": getattr(model.config, "model_type", None), "num_blocks": adapter.num_blocks,
                  "dtype": str(next(model.parameters()).dtype), "device": str(dev)}
    timings["total_seconds"] = time.perf_counter() - t_all
    report = build_report(result, model_info, metrics, timings, dev, command=["trimprune"] + sys.argv[1:])
    if args.eval_limit is not None:
        report["notes"].append(f"--eval-limit {args.eval_limit}: perplexities use only the first windows")
    write_outputs(args.output, model, tok, result, report, markdown(report), overwrite=args.overwrite,
                  save_model=not args.no_save_model, save_format=args.save_format)
    print(summary_text(report))
    print(f"written: {args.output}")
    return 0


def cmd_eval(args) -> int:
    from .io.evaluate import evaluate_sets, prepare_eval_sets
    from .io.export import write_json_atomic
    from .io.models import ModelAdapter, load_model, resolve_device
    from .io.report import versions

    _check_eval_args(args, args.seqlen)
    dev = resolve_device(args.device)
    model, tok = load_model(args.model, args.gguf_file, args.dtype, dev, offload=args.offload,
                            trust_remote_code=args.trust_remote_code)
    ModelAdapter.from_model(model).check_context(args.seqlen, "--seqlen")
    sets = prepare_eval_sets(args.eval, tok, args.seqlen, _eval_data(args.eval_data), args.eval_limit, model,
                             self_samples=args.self_eval_samples, seed=args.seed,
                             progress=Progress("off" if args.quiet else "auto"))
    res = evaluate_sets(model, sets, args.eval_batch_size, dev, args.offload, Progress("off" if args.quiet else "auto"))
    for name, r in res.items():
        lim = f" (first {r['windows']} windows)" if r["limited"] else ""
        print(f"{name:<12} perplexity {r['perplexity']:.4f}  nll {r['nll']:.5f}  windows {r['windows']}{lim}")
    if args.output:
        write_json_atomic(args.output, {"model": args.model, "seqlen": args.seqlen, "versions": versions(dev),
                                        "metrics": {"perplexity": {k: v["perplexity"] for k, v in res.items()},
                                                    "eval": res}})
    return 0


def cmd_export(args) -> int:
    from transformers import AutoTokenizer

    from .io.compact import load_pruned
    from .io.export import atomic_dir, check_output_dir, save_model_dir

    check_output_dir(args.out_dir, args.overwrite)
    model = load_pruned(args.run_dir, trust_remote_code=args.trust_remote_code)
    try:
        tok = AutoTokenizer.from_pretrained(args.run_dir, trust_remote_code=args.trust_remote_code)
    except (OSError, ValueError):
        tok = None
    with atomic_dir(args.out_dir, args.overwrite) as tmp:
        save_model_dir(tmp, model, tok)
    print(f"written: {args.out_dir}")
    return 0


COMMANDS = {"prune": cmd_prune, "eval": cmd_eval, "export": cmd_export}


def main(argv=None) -> int:
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    warnings.filterwarnings("ignore", message=".*TRANSFORMERS_CACHE.*")
    ap = build_parser()
    args = ap.parse_args(argv)
    if args.version:
        from . import __version__
        print(__version__)
        return 0
    if args.command is None:
        ap.print_help()
        return 2
    quiet = getattr(args, "quiet", False)
    if quiet or not sys.stderr.isatty():          # the Hugging Face bars, too: no bars in a log
        import os

        os.environ["HF_HUB_DISABLE_PROGRESS_BARS"] = "1"
        try:
            from transformers.utils import logging as hf_logging

            hf_logging.disable_progress_bar()
            if quiet:
                hf_logging.set_verbosity_error()
        except Exception:  # pragma: no cover
            pass
    try:
        return COMMANDS[args.command](args)
    except TrimpruneError as e:
        print(f"trimprune: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("trimprune: interrupted (nothing was written)", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
