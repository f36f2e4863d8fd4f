"""Command line: `trimprune prune` and `trimprune eval`."""
from __future__ import annotations

import argparse
import logging
import sys
import time
import warnings

from .config import CALIB_FORMATS, CALIB_SOURCES, SCORERS, TRIM_DIM_METRICS, TRIM_LAYER_METRICS, PruneConfig
from .errors import TrimpruneError

# CLI flag -> PruneConfig field, for the flags that live in a recipe
CONFIG_FLAGS = ["scorer", "sparsity", "mask_structure", "allocation", "calib", "calib_data", "calib_format",
                "nsamples", "seqlen", "seed", "batch_size", "offload", "blocksize", "percdamp", "trim", "trim_inputs",
                "trim_iterations", "trim_metric", "trim_dim_metric", "trim_forbid_neg_lr", "trim_input_recalc",
                "trim_safeguard", "trim_block_safeguard", "trim_precision", "trim_lr_search",
                "owl_m", "owl_lambda", "alpha_metric", "alpha_eps",
                "alpha_mapping", "alpha_cache_dir"]


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


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="trimprune", description="One-shot LLM pruning with TRIM, Wanda, SparseGPT.")
    ap.add_argument("--version", action="store_true", help="print the version and exit")
    sub = ap.add_subparsers(dest="command")

    p = sub.add_parser("prune", help="prune a model and write a Hugging Face model directory + report",
                       formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    _add_model_args(p)
    p.add_argument("--recipe", help="YAML file with PruneConfig fields; explicit flags override it")
    p.add_argument("--output", required=True, help="output directory (written atomically)")
    p.add_argument("--overwrite", action="store_true", help="replace --output if it exists")
    p.add_argument("--no-save-model", action="store_true",
                   help="write only masks, allocation and report (no weights), e.g. for sweeps")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    g = p.add_argument_group("pruning")
    g.add_argument("--scorer", choices=SCORERS, default=None, help="importance score (default wanda)")
    g.add_argument("--sparsity", type=float, default=None, help="target fraction of pruned weights, in [0, 1)")
    g.add_argument("--mask-structure", default=None, metavar="N:M", help="N:M semi-structured pattern, e.g. 2:4")
    g.add_argument("--allocation", default=None, metavar="METHOD",
                   help="layer-wise allocation: uniform, owl, alphapruning or file:PATH (default uniform)")
    g = p.add_argument_group("calibration")
    g.add_argument("--calib", choices=CALIB_SOURCES, default=None, help="calibration source (default c4)")
    g.add_argument("--calib-data", default=None, metavar="PATH", help="local .txt/.jsonl/.parquet for --calib")
    g.add_argument("--calib-format", choices=CALIB_FORMATS, default=None, help="format when the extension is ambiguous")
    g.add_argument("--nsamples", type=int, default=None, help="calibration sequences (default 128)")
    g.add_argument("--seqlen", type=int, default=None, help="tokens per calibration sequence and eval window (default 2048)")
    g.add_argument("--eval-seqlen", type=int, default=None, help="eval window length (default: --seqlen)")
    g.add_argument("--seed", type=int, default=None, help="seed of the calibration sampling (default 0)")
    g.add_argument("--batch-size", type=int, default=None, help="calibration sequences per forward (0 = auto)")
    g.add_argument("--offload", action="store_true", default=None,
                   help="keep weights and activations in CPU memory; blocks visit the GPU one at a time")
    g = p.add_argument_group("SparseGPT")
    g.add_argument("--blocksize", type=int, default=None, help="columns per block (default 128)")
    g.add_argument("--percdamp", type=float, default=None, help="dampening, fraction of mean diag(H) (default 0.01)")
    g = p.add_argument_group("TRIM")
    g.add_argument("--trim", action="store_true", default=None, help="row-wise sparsity search (TRIM)")
    g.add_argument("--trim-inputs", default=None, metavar="MODE",
                   help="all (exact, Gram matrix over all tokens; default), last-token (reference), sample:N")
    g.add_argument("--trim-iterations", type=int, default=None, help="iterations per learning rate (default 10)")
    g.add_argument("--trim-metric", choices=TRIM_LAYER_METRICS, default=None, help="layer metric (default cosim_flat)")
    g.add_argument("--trim-dim-metric", choices=TRIM_DIM_METRICS, default=None,
                   help="per-row quality metric (default cosim)")
    g.add_argument("--trim-forbid-neg-lr", action="store_true", default=None, help="never try negative learning rates")
    g.add_argument("--trim-input-recalc", action="store_true", default=None,
                   help="recompute the inputs of later linears of a block after earlier ones are pruned")
    g.add_argument("--no-trim-safeguard", dest="trim_safeguard", action="store_false", default=None,
                   help="keep TRIM's allocation even where its layer metric is worse than the scorer alone")
    g.add_argument("--no-trim-block-safeguard", dest="trim_block_safeguard", action="store_false", default=None,
                   help="skip the block-level check (TRIM vs scorer alone, against the dense model's block outputs "
                        "on 1/8 of the calibration sequences)")
    g.add_argument("--trim-precision", choices=["fp32", "tf32", "bf16"], default=None,
                   help="matmul precision of the Gram-based metric on GPU (default tf32; CPU always fp32)")
    g.add_argument("--trim-lr-search", choices=["auto", "parallel", "sequential"], default=None,
                   help="evaluate the learning rates as one batched sweep (parallel) or one after the other, "
                        "stopping as the reference does (sequential); same result. auto (default): parallel for "
                        "small matrices on GPU, sequential otherwise")
    g = p.add_argument_group("OWL / AlphaPruning")
    g.add_argument("--owl-m", type=float, default=None, help="OWL outlier threshold M (default 5)")
    g.add_argument("--owl-lambda", type=float, default=None, help="OWL sparsity range lambda (default 0.08)")
    g.add_argument("--alpha-metric", choices=["alpha_peak", "alpha_mid"], default=None,
                   help="AlphaPruning heavy-tail metric (default alpha_peak)")
    g.add_argument("--alpha-eps", type=float, default=None, help="AlphaPruning range epsilon (default 0.3)")
    g.add_argument("--alpha-mapping", choices=["block_wise", "per_matrix"], default=None,
                   help="AlphaPruning mapping (default block_wise)")
    g.add_argument("--alpha-cache-dir", default=None, help="cache folder of AlphaPruning metrics")
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
    e.add_argument("--quiet", action="store_true", help="no progress bars")
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
    cfg = PruneConfig.from_yaml(args.recipe) if getattr(args, "recipe", None) else PruneConfig()
    for name in CONFIG_FLAGS:
        v = getattr(args, name, None)
        if v is not None:
            setattr(cfg, name, v)
    if args.sparsity is None and cfg.mask_structure and not (getattr(args, "recipe", None)):
        from .config import parse_nm
        nm = parse_nm(cfg.mask_structure)
        cfg.sparsity = nm[0] / nm[1]
    return cfg


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
    from .evaluate import evaluate_sets, prepare_eval_sets
    from .export import check_output_dir, write_outputs
    from .models import ModelAdapter, load_model, resolve_device
    from .pipeline import prune
    from .report import build_report, markdown, summary_text

    t_all = time.perf_counter()
    cfg = config_from_args(args)
    cfg.validate()
    check_output_dir(args.output, args.overwrite)
    eval_data = _eval_data(args.eval_data)
    eval_seqlen = args.eval_seqlen or cfg.seqlen
    _check_eval_args(args, eval_seqlen)
    progress = not args.quiet
    dev = resolve_device(args.device)
    t0 = time.perf_counter()
    model, tok = load_model(args.model, args.gguf_file, args.dtype, dev, offload=cfg.offload,
                            trust_remote_code=args.trust_remote_code)
    t_load = time.perf_counter() - t0
    adapter = ModelAdapter.from_model(model)
    cfg.validate(max_context=adapter.max_context())
    ctx = adapter.max_context()
    if ctx is not None and eval_seqlen > ctx:
        raise TrimpruneError(f"--eval-seqlen {eval_seqlen} is above the model's context of {ctx}")
    metrics = {"perplexity": {}, "dense_perplexity": {}, "eval": {}, "dense_eval": {}}
    sets = {}
    if args.eval:
        sets = prepare_eval_sets(args.eval, tok, eval_seqlen, eval_data, args.eval_limit, model,
                                 self_samples=args.self_eval_samples, seed=cfg.seed, progress=progress)
        if not args.no_dense_eval:
            dense = evaluate_sets(model, sets, args.eval_batch_size, dev, cfg.offload, progress)
            metrics["dense_eval"] = dense
            metrics["dense_perplexity"] = {k: v["perplexity"] for k, v in dense.items()}
    result = prune(model, tok, cfg, device=dev, progress=progress)
    if sets:
        pr = evaluate_sets(model, sets, args.eval_batch_size, dev, cfg.offload, progress)
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
                  save_model=not args.no_save_model)
    print(summary_text(report))
    print(f"written: {args.output}")
    return 0


def cmd_eval(args) -> int:
    from .evaluate import evaluate_sets, prepare_eval_sets
    from .export import write_json_atomic
    from .models import ModelAdapter, load_model, resolve_device
    from .report import versions

    _check_eval_args(args, args.seqlen)
    dev = resolve_device(args.device)
    model, tok = load_model(args.model, args.gguf_file, args.dtype, dev, offload=args.offload,
                            trust_remote_code=args.trust_remote_code)
    ctx = ModelAdapter.from_model(model).max_context()
    if ctx is not None and args.seqlen > ctx:
        raise TrimpruneError(f"--seqlen {args.seqlen} is above the model's context of {ctx}: use --seqlen {ctx} or less")
    sets = prepare_eval_sets(args.eval, tok, args.seqlen, _eval_data(args.eval_data), args.eval_limit, model,
                             self_samples=args.self_eval_samples, seed=args.seed, progress=not args.quiet)
    res = evaluate_sets(model, sets, args.eval_batch_size, dev, args.offload, not args.quiet)
    for name, r in res.items():
        lim = f" (first {r['windows']} windows)" if r["limited"] else ""
        print(f"{name:<12} perplexity {r['perplexity']:.4f}  nll {r['nll']:.5f}  windows {r['windows']}{lim}")
    if args.output:
        write_json_atomic(args.output, {"model": args.model, "seqlen": args.seqlen, "versions": versions(dev),
                                        "metrics": {"perplexity": {k: v["perplexity"] for k, v in res.items()},
                                                    "eval": res}})
    return 0


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
    if getattr(args, "quiet", False):
        import os

        os.environ["HF_HUB_DISABLE_PROGRESS_BARS"] = "1"
        try:
            from transformers.utils import logging as hf_logging

            hf_logging.disable_progress_bar()
            hf_logging.set_verbosity_error()
        except Exception:  # pragma: no cover
            pass
    try:
        return cmd_prune(args) if args.command == "prune" else cmd_eval(args)
    except TrimpruneError as e:
        print(f"trimprune: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("trimprune: interrupted (nothing was written)", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
