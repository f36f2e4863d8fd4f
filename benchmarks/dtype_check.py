"""The default dtype on a bfloat16-native checkpoint whose activations overflow float16.

A small random Llama (GPT-2 tokenizer from `TRIMPRUNE_DATA/tokenizers/gpt2`) with block 0's MLP weights
scaled by 1000, so that its hidden states reach about 1e6 (float16 stops at 65504), saved in bfloat16
(`torch_dtype: bfloat16`, as Gemma-3's checkpoints). `trimprune prune` with the defaults must load it
in bfloat16 and give a finite WikiText-2 perplexity; with `--dtype float16` it must stop with exit
code 2 and the `--dtype bfloat16` hint.

    TRIMPRUNE_DATA=../shared/data python benchmarks/dtype_check.py
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import torch
from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM


def main() -> int:
    data = Path(os.environ.get("TRIMPRUNE_DATA", "../shared/data"))
    with tempfile.TemporaryDirectory() as tmp:
        d = Path(tmp) / "bf16-native"
        tok = AutoTokenizer.from_pretrained(str(data / "tokenizers" / "gpt2"))
        torch.manual_seed(0)
        m = LlamaForCausalLM(
            LlamaConfig(
                vocab_size=len(tok),
                hidden_size=256,
                intermediate_size=512,
                num_hidden_layers=4,
                num_attention_heads=4,
                max_position_embeddings=1024,
                bos_token_id=tok.bos_token_id,
                eos_token_id=tok.eos_token_id,
            )
        )
        with torch.no_grad():
            for p in m.model.layers[0].mlp.parameters():
                p.mul_(1000)
        m.to(torch.bfloat16).save_pretrained(d)
        tok.save_pretrained(d)
        common = [
            sys.executable,
            "-m",
            "trimprune",
            "prune",
            "--model",
            str(d),
            "--calib",
            "c4",
            "--nsamples",
            "16",
            "--seqlen",
            "512",
            "--eval",
            "wikitext2",
            "--eval-seqlen",
            "512",
            "--no-save-model",
            "--quiet",
        ]
        ok = True
        for label, extra in (("defaults", []), ("--dtype float16", ["--dtype", "float16"])):
            out = Path(tmp) / label.replace(" ", "_")
            r = subprocess.run(
                common + ["--output", str(out)] + extra, capture_output=True, text=True
            )
            line = (r.stderr.strip().splitlines() or [""])[-1]
            if r.returncode == 0:
                rep = json.loads((out / "report.json").read_text())
                print(
                    f"{label}: exit 0, dtype {rep['model']['dtype']} ({rep['model'].get('dtype_from')}), "
                    f"WikiText-2 dense {rep['metrics']['dense_perplexity']['wikitext2']:.3f} -> pruned "
                    f"{rep['metrics']['perplexity']['wikitext2']:.3f}, sparsity {rep['sparsity']['achieved']:.4f}"
                )
            else:
                print(f"{label}: exit {r.returncode}: {line}")
            ok &= (
                (r.returncode == 0)
                if label == "defaults"
                else (r.returncode == 2 and "bfloat16" in line)
            )
        print("as expected" if ok else "NOT as expected")
        return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
