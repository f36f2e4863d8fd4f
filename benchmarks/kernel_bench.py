"""Time the pieces of one all-token TRIM search on the GPU, for the shape classes of a model.

    python benchmarks/kernel_bench.py --shapes smollm2 [--tiles 16,32,32,4 8,64,16,4 ...]

For each class (P linears of rows x in): the cross term of the quadratic prefix table
(exec.kernels.pruned_cross_triton, with each --tiles BR,BA,BB,warps), the whole table build, and the search
(TrimSearch.run_many: baseline, every rate x 10 iterations, choice, final counts), CUDA-event timed,
median of --repeat. Random weights and Gram matrices (timing only).
"""

from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from trimprune.algo.masks import row_ranks  # noqa: E402
from trimprune.algo.trim.evaluators import GramSpec, pruned_cross  # noqa: E402
from trimprune.algo.trim.search import TrimSearch, TrimSettings  # noqa: E402
from trimprune.exec import kernels, make_executor  # noqa: E402

SHAPES = {  # (P, rows, in) per class: q/o, k/v, gate/up, down
    "smollm2": [(2, 576, 576), (2, 192, 576), (2, 1536, 576), (1, 576, 1536)],
    "llama-1b": [(2, 2048, 2048), (2, 512, 2048), (2, 8192, 2048), (1, 2048, 8192)],
    "llama-8b": [(2, 4096, 4096), (2, 1024, 4096), (2, 14336, 4096), (1, 4096, 14336)],
}


def timed(fn, repeat):
    fn()
    torch.cuda.synchronize()
    out = []
    for _ in range(repeat):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        fn()
        b.record()
        torch.cuda.synchronize()
        out.append(a.elapsed_time(b))
    return statistics.median(out)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--shapes", default="smollm2")
    ap.add_argument("--tiles", nargs="*", default=[])
    ap.add_argument("--repeat", type=int, default=5)
    ap.add_argument("--search", action="store_true", help="also time the whole search per class")
    a = ap.parse_args()
    dev = torch.device("cuda")
    ex = make_executor(dev)
    print(f"# {torch.cuda.get_device_name()} torch {torch.__version__}")
    tot = {}
    for P, R, N in SHAPES[a.shapes]:
        g = torch.Generator(device=dev).manual_seed(0)
        X = torch.randn(4096, N, device=dev, generator=g)
        G = (X.T @ X).expand(P, N, N)
        W = torch.randn(P, R, N, device=dev, generator=g)
        ranks = torch.stack([row_ranks(W[p].abs()) for p in range(P)])
        ref = pruned_cross(W, ranks, G)
        cfgs = [None] + [tuple(int(v) for v in t.split(",")) for t in a.tiles]
        for cfg in cfgs:
            kw = {} if cfg is None else dict(zip(("BR", "BA", "BB", "num_warps"), cfg))
            got = kernels.pruned_cross_triton(W, ranks, G, **kw)
            err = ((got - ref).abs().max() / ref.abs().max()).item()
            ms = timed(lambda: kernels.pruned_cross_triton(W, ranks, G, **kw), a.repeat)
            tot.setdefault(cfg, 0.0)
            tot[cfg] += ms
            gel = P * R * N * N / ms / 1e6
            print(
                f"cross P={P} {R}x{N} tiles={cfg or 'default'}: {ms:.3f} ms ({gel:.2f} G elem/ms) rel.diff {err:.1e}"
            )

        def build():
            ev = GramSpec(262144).build(G, ex)
            ev.prepare(W)
            ev.stats_from_counts(torch.full((P, 1, R), N // 2, device=dev), ranks)

        print(f"table build P={P} {R}x{N}: {timed(build, a.repeat):.3f} ms")
        if a.search:
            ts = TrimSearch(TrimSettings(), ex)
            s, totals = [0.5] * P, [R * (N // 2)] * P
            run = lambda: ts.run_many(GramSpec(262144), W, G, ranks, s, totals)
            print(f"search (graph replay incl. table) P={P} {R}x{N}: {timed(run, a.repeat):.3f} ms")
    for cfg, ms in tot.items():
        print(f"sum over classes, tiles={cfg or 'default'}: {ms:.3f} ms")


if __name__ == "__main__":
    main()
