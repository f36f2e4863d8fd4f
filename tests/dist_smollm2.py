"""SmolLM2-135M pruned by one process or, under torchrun, by several (gloo on CPU): WikiText-2 perplexity
of wanda, wanda+TRIM and sparsegpt at 50 % (C4 16 x 256 in batches of 8: one batch per rank with two
ranks), one JSON file written by rank 0.

    python tests/dist_smollm2.py OUT.json
    torchrun --nproc-per-node 2 tests/dist_smollm2.py OUT.json
"""

import json
import os
import sys

import torch
import torch.distributed as dist

from trimprune import PruneConfig, load_model, prune
from trimprune.calib.data import get_calibration
from trimprune.core.ranks import Ranks
from trimprune.io.evaluate import evaluate_sets, prepare_eval_sets

CONFIGS = {
    "wanda": {"scorer": "wanda"},
    "wanda_trim": {"scorer": "wanda", "trim": True},
    "sparsegpt": {"scorer": "sparsegpt"},
}

if __name__ == "__main__":
    torch.set_num_threads(1)
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        dist.init_process_group("gloo")
    model, tok = load_model("smollm2-135m", device="cpu", dtype="float32")
    state = {k: v.clone() for k, v in model.state_dict().items()}
    base = {"sparsity": 0.5, "calib": "c4", "nsamples": 16, "seqlen": 256, "batch_size": 8}
    calib = get_calibration(PruneConfig.from_flat(base).calib, tok)
    sets = prepare_eval_sets(["wikitext2"], tok, 256, limit=16)
    out = {"world": Ranks.current().world}
    for name, kw in CONFIGS.items():
        model.load_state_dict(state)
        res = prune(model, tok, PruneConfig.from_flat(base | kw), calibration=calib, progress=False)
        out[name] = {
            "ppl": evaluate_sets(model, sets, 4)["wikitext2"]["perplexity"],
            "sparsity": res.global_sparsity,
            "prune_seconds": res.timings["prune_seconds"],
        }
    if Ranks.current().main:
        with open(sys.argv[1], "w") as f:
            json.dump(out, f)
    if dist.is_initialized():
        dist.destroy_process_group()
