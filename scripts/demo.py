"""The README's demo: prune SmolLM2-135M with Wanda to 50 % on CPU and print dense vs pruned.

Calibration and evaluation use local data when TRIMPRUNE_DATA points at a folder laid out like
shared/data (C4 32 x 512 calibration, WikiText-2 test windows of 512 tokens); otherwise both are
sampled from the model itself (`--calib self`, `--eval self`), so it runs with no dataset at all.
"""
import os
import sys
from pathlib import Path

from trimprune.cli import main

data = os.environ.get("TRIMPRUNE_DATA")
have_data = bool(data) and (Path(data) / "wikitext2-raw").is_dir() and (Path(data) / "c4").is_dir()
out = os.environ.get("DEMO_OUTPUT", "demo-output")
args = ["prune", "--model", "smollm2-135m", "--scorer", "wanda", "--sparsity", "0.5", "--device", "cpu",
        "--nsamples", "32", "--seqlen", "512", "--output", out, "--overwrite"]
if have_data:
    print(f"demo: calibration C4 32x512 and WikiText-2 evaluation (first 40 windows of 512) from {data}")
    args += ["--calib", "c4", "--eval", "wikitext2", "--eval-limit", "40"]
else:
    print("demo: TRIMPRUNE_DATA is not set: calibration sampled from the model (--calib self, 32x512) and "
          "evaluation on 16 held-out sequences sampled from the dense model (--eval self)")
    args += ["--calib", "self", "--eval", "self", "--self-eval-samples", "16"]
sys.exit(main(args))
