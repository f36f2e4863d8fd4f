"""The README's demo: prune SmolLM2-135M with Wanda to 50 % on CPU and print dense vs pruned WikiText-2
perplexity.

Calibration: C4, 32 sequences of 512 tokens (the papers use 128 x 2048). Evaluation: the first 20
WikiText-2 test windows of 512 tokens. The data comes from TRIMPRUNE_DATA when it names a folder laid
out like shared/data, else from the small excerpts shipped in scripts/demo_data (see SOURCES.md there).
"""

import os
import sys
from pathlib import Path

from trimprune.cli import main

data = os.environ.get("TRIMPRUNE_DATA")
out = os.environ.get("DEMO_OUTPUT", "demo-output")
args = [
    "prune",
    "--model",
    "smollm2-135m",
    "--scorer",
    "wanda",
    "--sparsity",
    "0.5",
    "--device",
    "cpu",
    "--nsamples",
    "32",
    "--seqlen",
    "512",
    "--calib",
    "c4",
    "--eval",
    "wikitext2",
    "--eval-limit",
    "20",
    "--output",
    out,
    "--overwrite",
]
if data and (Path(data) / "wikitext2-raw").is_dir() and (Path(data) / "c4").is_dir():
    print(
        f"demo: C4 calibration 32 x 512 and the first 20 WikiText-2 test windows of 512 tokens from {data}"
    )
else:
    demo = Path(__file__).resolve().parent / "demo_data"
    print(
        f"demo: C4 calibration 32 x 512 and the first 20 WikiText-2 test windows of 512 tokens from the excerpts "
        f"in {demo} (set TRIMPRUNE_DATA to use the full data)"
    )
    args += [
        "--calib-data",
        str(demo / "c4-demo.jsonl"),
        "--eval-data",
        f"wikitext2={demo / 'wikitext2-test-excerpt.jsonl'}",
    ]
sys.exit(main(args))
