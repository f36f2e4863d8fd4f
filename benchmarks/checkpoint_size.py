"""Size of the dense and the compact (`--save-format compact`) model directories of a pruned model.

    TRIMPRUNE_DATA=../shared/data python benchmarks/checkpoint_size.py --sparsity 0.5 0.7 0.8

Prunes SmolLM2-135M with Wanda (C4 calibration, --nsamples x --seqlen) at each sparsity, casts it to
--dtype, writes both formats and prints the bytes of the pruned linears' weights and of the whole
directories, and checks that the compact directory loads back to the same logits as the dense one
(both loaded from disk: a model cast in memory keeps float16 rotary tables, a loaded one float32).
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import append_jsonl, machine  # noqa: E402
from trimprune import PruneConfig, load_model, load_pruned, prune  # noqa: E402
from trimprune.calib.data import get_calibration  # noqa: E402
from trimprune.io.export import pruned_parameters, save_model_dir  # noqa: E402
from trimprune.io.models import resolve_dtype  # noqa: E402


def folder_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in path.iterdir() if f.is_file())


def main(argv=None):
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--sparsity", type=float, nargs="+", default=[0.5, 0.7, 0.8])
    ap.add_argument("--dtype", default="float16")
    ap.add_argument("--nsamples", type=int, default=8)
    ap.add_argument("--seqlen", type=int, default=128)
    ap.add_argument("--out", default="benchmarks/results/checkpoint_size.jsonl")
    args = ap.parse_args(argv)
    model, tok = load_model(args.model, device="cpu", dtype="float32")
    state = {k: v.clone() for k, v in model.state_dict().items()}
    print(
        f"# {machine()} | {args.model} | wanda, C4 {args.nsamples}x{args.seqlen} | saved as {args.dtype}"
    )
    print(
        f"{'sparsity':>8}{'linears dense MB':>18}{'linears compact MB':>20}{'ratio':>7}"
        f"{'dir dense MB':>14}{'dir compact MB':>16}{'ratio':>7}  logits equal"
    )
    for s in args.sparsity:
        model.load_state_dict(state)
        model.to(torch.float32)
        cfg = PruneConfig.from_flat(
            dict(scorer="wanda", sparsity=s, nsamples=args.nsamples, seqlen=args.seqlen)
        )
        res = prune(model, tok, cfg, calibration=get_calibration(cfg.calib, tok), progress=False)
        model.to(resolve_dtype(args.dtype, torch.device("cpu")))
        sparse = pruned_parameters(model, res.layers)
        with tempfile.TemporaryDirectory() as d:
            dense_dir, compact_dir = Path(d) / "dense", Path(d) / "compact"
            dense_dir.mkdir()
            compact_dir.mkdir()
            save_model_dir(dense_dir, model, tok)
            save_model_dir(compact_dir, model, tok, "compact", sparse)
            from safetensors import safe_open

            lin_dense = sum(
                model.get_parameter(p).numel() * model.get_parameter(p).element_size()
                for p in sparse
            )
            with safe_open(str(compact_dir / "model.compact.safetensors"), framework="pt") as f:
                lin_compact = sum(
                    f.get_tensor(f"{p}.{k}").numel() * f.get_tensor(f"{p}.{k}").element_size()
                    for p in sparse
                    for k in ("mask", "values")
                )
            ids = torch.randint(
                0, model.config.vocab_size, (2, 32), generator=torch.Generator().manual_seed(0)
            )
            from transformers import AutoModelForCausalLM

            with torch.no_grad():
                same = torch.equal(
                    load_pruned(compact_dir)(input_ids=ids).logits,
                    AutoModelForCausalLM.from_pretrained(dense_dir).eval()(input_ids=ids).logits,
                )
            rec = {
                "machine": machine(),
                "model": args.model,
                "sparsity": s,
                "dtype": args.dtype,
                "linears_dense_bytes": lin_dense,
                "linears_compact_bytes": lin_compact,
                "dir_dense_bytes": folder_bytes(dense_dir),
                "dir_compact_bytes": folder_bytes(compact_dir),
                "logits_equal": same,
            }
        append_jsonl(args.out, rec)
        print(
            f"{s:>8.2f}{lin_dense / 1e6:>18.2f}{lin_compact / 1e6:>20.2f}{lin_compact / lin_dense:>7.3f}"
            f"{rec['dir_dense_bytes'] / 1e6:>14.2f}{rec['dir_compact_bytes'] / 1e6:>16.2f}"
            f"{rec['dir_compact_bytes'] / rec['dir_dense_bytes']:>7.3f}  {same}",
            flush=True,
        )


if __name__ == "__main__":
    main()
