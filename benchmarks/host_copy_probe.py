"""Host time of reading one block's packed masks out of the pinned staging buffer, by method.

    python benchmarks/host_copy_probe.py        (CUDA)

`BlockPruner._flush` copies the bit-packed masks of a block (SmolLM2 sizes below, twice: TRIM and
scorer-alone masks) from pinned memory into pageable memory while the device is busy. Prints the
median and worst host time per block for torch `copy_` (per mask / one copy), numpy copies and a
preallocated buffer, with torch's default CPU threads and with one thread.
"""
import time
import numpy as np
import torch

x = torch.randn(4096, 4096, device="cuda")
sizes = [41472, 10368, 10368, 41472, 110592, 110592, 110592] * 2
dev = torch.randint(0, 255, (sum(sizes),), dtype=torch.uint8, device="cuda")


def stage():
    p = torch.empty(dev.shape, dtype=torch.uint8, pin_memory=True)
    p.copy_(dev, non_blocking=True)
    for _ in range(3):
        x @ x            # keep the device busy, as in the pipeline
    return p


def split_copy(p):
    return [torch.empty(t.shape, dtype=t.dtype).copy_(t) for t in p.split(sizes)]


def one_copy(p):
    return torch.empty(p.shape, dtype=p.dtype).copy_(p).split(sizes)


def np_copy(p):
    return torch.from_numpy(p.numpy().copy()).split(sizes)


def np_split(p):
    return [torch.from_numpy(t.numpy().copy()) for t in p.split(sizes)]


big = torch.empty(sum(sizes) * 40, dtype=torch.uint8)
off = [0]


def prealloc(p):
    a = off[0]
    off[0] += p.numel()
    big[a:a + p.numel()].copy_(p)
    return big[a:a + p.numel()].split(sizes)


for threads in (torch.get_num_threads(), 1):
    torch.set_num_threads(threads)
    for name, fn in (("split copy_", split_copy), ("one copy_", one_copy), ("numpy one", np_copy),
                     ("numpy split", np_split), ("prealloc", prealloc)):
        off[0] = 0
        ts = []
        for _ in range(30):
            p = stage()
            torch.cuda.synchronize()
            for _ in range(3):
                x @ x
            t = time.perf_counter()
            fn(p)
            ts.append(time.perf_counter() - t)
        torch.cuda.synchronize()
        ts.sort()
        print(f"threads {threads:2d} {name:12s}: median {1e3 * ts[15]:.3f} ms, max {1e3 * ts[-1]:.3f} ms per block")
