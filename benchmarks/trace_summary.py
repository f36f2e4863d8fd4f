"""Summarise a Chrome trace written by `phases.py --mode trace --trace FILE`: where the device is busy or idle.

    python benchmarks/trace_summary.py FILE [--top 15]

Prints the run's span, the busy time of each CUDA stream and of all streams together (union of
kernel and copy intervals), the device-idle time, the host ranges (trimprune::...) by total
duration, and per stream the kernels with the most device time.
"""

from __future__ import annotations

import argparse
import gzip
import json
from collections import defaultdict


def union(iv):
    tot, end = 0.0, -1e300
    for a, b in sorted(iv):
        if b <= end:
            continue
        tot += b - max(a, end)
        end = b
    return tot


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("trace")
    ap.add_argument("--top", type=int, default=15)
    a = ap.parse_args()
    with gzip.open(a.trace, "rt") as f:
        ev = json.load(f)["traceEvents"]
    dev = [
        e
        for e in ev
        if e.get("ph") == "X" and e.get("cat") in ("kernel", "gpu_memcpy", "gpu_memset")
    ]
    host = [
        e for e in ev if e.get("ph") == "X" and str(e.get("name", "")).startswith("trimprune::")
    ]
    t0 = min(e["ts"] for e in dev + host)
    t1 = max(e["ts"] + e["dur"] for e in dev + host)
    print(
        f"span {(t1 - t0) / 1e3:.1f} ms, device busy (any stream) {union([(e['ts'], e['ts'] + e['dur']) for e in dev]) / 1e3:.1f} ms"
    )
    by_stream = defaultdict(list)
    for e in dev:
        by_stream[e.get("args", {}).get("stream", e.get("tid"))].append(e)
    for s, es in sorted(by_stream.items(), key=lambda kv: -sum(e["dur"] for e in kv[1])):
        busy = union([(e["ts"], e["ts"] + e["dur"]) for e in es])
        print(f"stream {s}: {len(es)} ops, busy {busy / 1e3:.1f} ms")
        names = defaultdict(lambda: [0.0, 0])
        for e in es:
            n = names[e["name"][:90]]
            n[0] += e["dur"]
            n[1] += 1
        for n, (d, c) in sorted(names.items(), key=lambda kv: -kv[1][0])[: a.top]:
            print(f"    {d / 1e3:8.2f} ms {c:6d}x  {n}")
    hs = defaultdict(lambda: [0.0, 0])
    for e in host:
        h = hs[e["name"]]
        h[0] += e["dur"]
        h[1] += 1
    print("host ranges:")
    for n, (d, c) in sorted(hs.items(), key=lambda kv: -kv[1][0]):
        print(f"    {d / 1e3:8.1f} ms {c:5d}x  {n}")


if __name__ == "__main__":
    main()
