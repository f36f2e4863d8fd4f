"""Why TRIM does not help SparseGPT: the layer metric of SparseGPT's reconstruction under several
row allocations, linear by linear (SmolLM2 on CPU).

For each linear, from the Gram matrix of its dense inputs on C4 calibration (dense model, no
sequential pruning), SparseGPT prunes to the sparsity with
  - alone: its own mask selection (per 128-column block, the smallest saliencies of the whole
    block, so rows end with different counts),
  - uniform rows: every row the same count, spread evenly over the column blocks,
  - TRIM (OBS): the row counts TRIM's search finds with the OBS prediction (what `prune` does),
  - TRIM (reconstructed): the row counts TRIM's search finds when every candidate is solved by
    SparseGPT and measured on the reconstructed weights,
  - alone's rows: SparseGPT with alone's row counts, spread evenly over the column blocks,
  - TRIM from alone's rows: TRIM's search on reconstructed weights started from alone's counts.
The metric is TRIM's layer metric (cosim_flat) on the reconstructed weights; higher is better.

    TRIMPRUNE_DATA=../shared/data python benchmarks/trim_sparsegpt_rows.py \
        --out benchmarks/results/cpu_trim_sparsegpt_rows.jsonl
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import append_jsonl, machine  # noqa: E402
from trimprune import PruneConfig, load_model  # noqa: E402
from trimprune.algo.masks import row_ranks  # noqa: E402
from trimprune.algo.scorers import Member, Target, make_scorer  # noqa: E402
from trimprune.algo.stats import InputStats, StatsNeeds  # noqa: E402
from trimprune.algo.trim.evaluators import GramEvaluator, ObsEvaluator  # noqa: E402
from trimprune.algo.trim.metrics import RowStats, layer_metric  # noqa: E402
from trimprune.algo.trim.search import evaluate, search_counts  # noqa: E402
from trimprune.algo.trim.settings import TrimSettings  # noqa: E402
from trimprune.calib.data import get_calibration  # noqa: E402

ROWS = ("alone", "uniform", "trim_obs", "trim_reconstructed", "alone_rows", "trim_from_alone")


class Reconstructed:
    """TRIM's evaluator whose candidates (row counts) are solved by SparseGPT and measured on the
    reconstructed weights (one linear: P = 1)."""

    def __init__(self, solve, gram: GramEvaluator):
        self.solve, self.gram = solve, gram

    def stats_from_counts(self, k: torch.Tensor, ranks=None) -> RowStats:
        return self.gram.stats_from_weight(self.solve(list(k[0])).unsqueeze(0))


def trim_search(ev, ranks: torch.Tensor, x0: torch.Tensor, st: TrimSettings) -> torch.Tensor:
    """TRIM's iterations (`algo.trim.search.iterate`) for all learning rates, started from the row
    sparsities x0 (rows,) and keeping their mean; the best candidate's exact row counts."""
    rows, n = ranks.shape
    lrs = torch.tensor(sorted(st.lrs + st.neg_lrs), dtype=torch.float64).view(1, -1, 1)
    x = x0.float().view(1, 1, rows).expand(1, lrs.shape[1], rows).clone()
    mean = x0.double().mean().float()
    r3 = ranks.unsqueeze(0)
    best_m, dq, _ = evaluate(ev, r3, x[:, :1], st)
    best_m, dq = best_m.expand(1, lrs.shape[1]).clone(), dq.expand_as(x)
    best_x = x.clone()
    for _ in range(st.iterations):
        lo, hi = torch.aminmax(dq, dim=-1, keepdim=True)
        d = (dq - lo) / (hi - lo + 1e-6) * lrs * 2
        x = (x.double() + d - d.mean(-1, keepdim=True)).float().clamp(0.0, st.max_row_sparsity)
        x = x - x.double().mean(-1, keepdim=True).float() + mean
        m, dq, _ = evaluate(ev, r3, x, st)
        better = m > best_m
        best_m = torch.where(better, m, best_m)
        best_x = torch.where(better.unsqueeze(-1), x, best_x)
    xb = best_x[0, int(torch.argmax(best_m[0]))]
    k = search_counts(xb, n, st)
    short = round(float(x0.double().sum()) * n) - int(k.sum())  # the exact total, as TRIM's
    for i in torch.argsort(xb, descending=short > 0)[: abs(short)]:
        k[i] += 1 if short > 0 else -1
    return k


def main(argv=None):
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--sparsity", type=float, default=0.7)
    ap.add_argument("--nsamples", type=int, default=16)
    ap.add_argument("--seqlen", type=int, default=256)
    ap.add_argument("--blocks", default="2,14")
    ap.add_argument("--linears", default="self_attn.q_proj,self_attn.o_proj,mlp.down_proj")
    ap.add_argument("--out", default="benchmarks/results/cpu_trim_sparsegpt_rows.jsonl")
    args = ap.parse_args(argv)
    torch.set_num_threads(2)
    s = args.sparsity
    model, tok = load_model("smollm2-135m", device="cpu", dtype="float32")
    flat = dict(scorer="sparsegpt", sparsity=s, calib="c4")
    cfg = PruneConfig.from_flat(flat | dict(nsamples=args.nsamples, seqlen=args.seqlen))
    ids = get_calibration(cfg.calib, tok)
    mods = {
        f"{b}.{n}": model.model.layers[int(b)].get_submodule(n)
        for b in args.blocks.split(",")
        for n in args.linears.split(",")
    }
    grams: dict[str, torch.Tensor] = {}

    def hook(name):
        def f(_m, inp, _out):
            x = inp[0].reshape(-1, inp[0].shape[-1]).double()
            grams[name] = grams.get(name, 0) + x.T @ x

        return f

    hooks = [m.register_forward_hook(hook(k)) for k, m in mods.items()]
    with torch.no_grad():
        for b in ids.split(4):
            model(input_ids=b)
    for h in hooks:
        h.remove()
    T, sg, st = ids.numel(), make_scorer(cfg.scorer), TrimSettings()
    totals = dict.fromkeys(ROWS, 0.0)
    for name, m in mods.items():
        t0 = time.perf_counter()
        W = m.weight.detach().float().clone()
        rows, n = W.shape
        G = grams[name].float()
        stats = InputStats(n, torch.device("cpu"), StatsNeeds(sqnorm=False, gram=True))
        stats.gram, stats.n_tokens = G, T

        def solve(counts, W=W, stats=stats):
            groups = [([Member(name, W, Target(s, row_counts=c))], stats) for c in counts]
            return torch.stack([o[0].weight for o in sg.prune_groups(groups)])

        alone = sg.prune_group([Member(name, W, Target(s))], stats)[0]
        k_alone = alone.mask.sum(1).long()
        f = sg.inverse_factor(stats, torch.device("cpu"))
        saliency = W.square() / torch.diag(f.U).square().unsqueeze(0)
        ranks = row_ranks(saliency)
        obs = ObsEvaluator(ObsEvaluator.table_for(W, saliency, G), T)
        gram_b = GramEvaluator(G.unsqueeze(0), T)
        gram_b.prepare(W.unsqueeze(0))
        rec = Reconstructed(solve, gram_b)
        uniform = torch.full((rows,), s, dtype=torch.float64)
        counts = [
            torch.full((rows,), round(s * n), dtype=torch.long),
            trim_search(obs, ranks, uniform, st),
            trim_search(rec, ranks, uniform, st),
            k_alone,
            trim_search(rec, ranks, k_alone.double() / n, st),
        ]
        weights = torch.cat([alone.weight.unsqueeze(0), solve(counts)])
        gram = GramEvaluator(G, T)
        gram.prepare(W)
        vals = layer_metric(st.layer_metric, gram.stats_from_weight(weights)).tolist()
        rec_line = {
            "machine": machine(),
            "linear": name,
            "sparsity": s,
            "calib": f"c4 {args.nsamples}x{args.seqlen}",
            "metric": st.layer_metric,
            "seconds": time.perf_counter() - t0,
        } | dict(zip(ROWS, vals))
        append_jsonl(args.out, rec_line)
        for k, v in zip(ROWS, vals):
            totals[k] += v / len(mods)
        print(f"{name:<22} " + " ".join(f"{k} {v:.5f}" for k, v in zip(ROWS, vals)), flush=True)
    print("mean " + " ".join(f"{k} {v:.5f}" for k, v in totals.items()))


if __name__ == "__main__":
    main()
