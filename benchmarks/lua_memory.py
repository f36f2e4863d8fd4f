"""Peak memory of Lua-LLM's training steps in three modes: `blocks` (what `--allocation lua` runs:
every decoder block and every masked linear under activation checkpointing, the backward inside
`masked_forward`), `checkpointed` (the masks inside each linear's forward under checkpointing, the
blocks' other activations held), and `copies` (masked copies of the weights held until the
backward, `masked_logits(..., checkpointed=False)`).

Each mode runs in its own process (peak RSS on the CPU, peak allocated memory on a GPU): the model
in float32, unit ranks of |W| in float16, then --steps steps of a dense forward, a masked forward
and its backward on --batch random sequences of --seqlen tokens. The loss of the last step is
printed too: the modes compute the same values.

    python benchmarks/lua_memory.py --model smollm2-135m --device cpu
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from trimprune import load_model  # noqa: E402
from trimprune.algo.allocation.lua import kl_per_token, unit_ranks  # noqa: E402
from trimprune.core.model import ModelAdapter  # noqa: E402
from trimprune.engine.influence import float32_frozen, linear_weights  # noqa: E402
from trimprune.engine.lua import masked_forward, masked_logits  # noqa: E402


def _peak_gb(dev: torch.device) -> float:
    if dev.type == "cuda":
        return torch.cuda.max_memory_allocated(dev) / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def worker(args) -> dict:
    dev = torch.device(args.device)
    model, _ = load_model(args.model, device=str(dev), dtype="float32")
    adapter = ModelAdapter.from_model(model)
    params = linear_weights(adapter, "lua")
    ranks = {k: unit_ranks(p.detach().abs()).half() for k, p in params.items()}
    g = torch.Generator().manual_seed(0)
    x = torch.randint(0, model.config.vocab_size, (args.batch, args.seqlen), generator=g).to(dev)
    before = _peak_gb(dev)
    t = torch.full((len(params),), 0.7, device=dev, requires_grad=True)
    t0 = time.perf_counter()
    with float32_frozen(model):
        for _ in range(args.steps):
            with torch.no_grad():
                dense = torch.log_softmax(model(input_ids=x, use_cache=False).logits.float(), -1)
            if args.mode == "blocks":  # what `--allocation lua` runs
                with masked_forward(model, params, ranks, t, 0.02, True, adapter) as forward:
                    logits = forward(x)
                    loss = kl_per_token(dense, logits)
                    loss.backward()
            else:
                logits = masked_logits(
                    model, params, ranks, t, 0.02, x, checkpointed=args.mode == "checkpointed"
                )
                loss = kl_per_token(dense, logits)
                loss.backward()
            del logits, dense
    return {
        "mode": args.mode,
        "model": args.model,
        "device": str(dev),
        "batch": args.batch,
        "seqlen": args.seqlen,
        "steps": args.steps,
        "peak_gb_before_steps": before,
        "peak_gb": _peak_gb(dev),
        "seconds": time.perf_counter() - t0,
        "last_loss": float(loss),
    }


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--seqlen", type=int, default=512)
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--mode", choices=["checkpointed", "copies", "blocks"], default=None)
    ap.add_argument("--out", default=None, help="append the JSON lines here")
    args = ap.parse_args(argv)
    if args.mode:  # a worker
        print(json.dumps(worker(args)))
        return
    for mode in ("copies", "checkpointed", "blocks"):
        cmd = [sys.executable, __file__, *(argv or sys.argv[1:]), "--mode", mode]
        line = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout.strip()
        rec = json.loads(line.splitlines()[-1])
        print(
            f"{mode:<13} peak {rec['peak_gb']:.2f} GB (before the steps "
            f"{rec['peak_gb_before_steps']:.2f} GB), {rec['seconds']:.1f} s, "
            f"last loss {rec['last_loss']:.6f}",
            flush=True,
        )
        if args.out:
            with open(args.out, "a") as f:
                f.write(json.dumps(rec) + "\n")


if __name__ == "__main__":
    main()
