"""Helpers shared by the benchmark scripts."""

from __future__ import annotations

import json
import os
import platform
import resource
import sys
import time
from pathlib import Path

import torch

SYNTHETIC = {
    # name: LlamaConfig kwargs (random weights; timing only)
    "llama-8b": dict(
        hidden_size=4096,
        intermediate_size=14336,
        num_hidden_layers=32,
        num_attention_heads=32,
        num_key_value_heads=8,
        vocab_size=128256,
        max_position_embeddings=8192,
    ),
    "llama-70b": dict(
        hidden_size=8192,
        intermediate_size=28672,
        num_hidden_layers=80,
        num_attention_heads=64,
        num_key_value_heads=8,
        vocab_size=128256,
        max_position_embeddings=8192,
    ),
    "llama-1b": dict(
        hidden_size=2048,
        intermediate_size=8192,
        num_hidden_layers=16,
        num_attention_heads=32,
        num_key_value_heads=8,
        vocab_size=128256,
        max_position_embeddings=8192,
    ),
    "smollm2-135m": dict(
        hidden_size=576,
        intermediate_size=1536,
        num_hidden_layers=30,
        num_attention_heads=9,
        num_key_value_heads=3,
        vocab_size=49152,
        max_position_embeddings=8192,
        tie_word_embeddings=True,
    ),
    # Gemma-3-270M's sizes (262k vocabulary, head_dim 256) in Llama blocks: memory and time only
    "gemma3-270m": dict(
        hidden_size=640,
        intermediate_size=2048,
        num_hidden_layers=18,
        num_attention_heads=4,
        num_key_value_heads=1,
        head_dim=256,
        vocab_size=262144,
        max_position_embeddings=32768,
        tie_word_embeddings=True,
    ),
    "llama-tiny": dict(
        hidden_size=256,
        intermediate_size=512,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=1024,
        max_position_embeddings=4096,
    ),
}


def machine() -> str:
    if torch.cuda.is_available():
        return f"{torch.cuda.get_device_name(0)}, torch {torch.__version__}"
    return f"CPU {platform.processor() or platform.machine()} x{os.cpu_count()}, torch {torch.__version__}"


def synthetic_model(name: str, device: torch.device, dtype: torch.dtype, layers: int | None = None):
    from transformers import LlamaConfig, LlamaForCausalLM

    kw = dict(SYNTHETIC[name])
    if layers:
        kw["num_hidden_layers"] = layers
    cfg = LlamaConfig(**kw)
    torch.manual_seed(0)
    with torch.device(device):
        m = LlamaForCausalLM(cfg).to(dtype)
    with torch.no_grad():  # weights ~ N(0, 0.02) like a fresh init, realistic enough for timing
        for p in m.parameters():
            if p.dim() == 2:
                p.normal_(0, 0.02)
    return m.eval(), None


def bench_dtype(
    name: str, gguf_file: str | None, dtype: str | None, device: torch.device
) -> torch.dtype:
    """The dtype a benchmark runs in: `dtype` when given, else what `trimprune prune` uses by default (the
    checkpoint's own float16 / bfloat16, else bfloat16 on GPU, float32 on CPU; synthetic models have
    none of their own). Every script prints and records it: the default on GPUs was float16 before."""
    from trimprune.io.models import native_dtype, resolve_dtype, resolve_model_path

    native = None
    if dtype is None and not name.startswith("synthetic:"):
        native = native_dtype(*resolve_model_path(name, gguf_file))
    return resolve_dtype(dtype, device, native)


def bench_model(
    name: str,
    gguf_file: str | None,
    device: torch.device,
    dtype: torch.dtype,
    layers: int | None = None,
    offload: bool = False,
):
    """(model, tokenizer) for a benchmark: `synthetic:NAME` (random weights, tokenizer None; on CPU
    with offload) or anything `trimprune.load_model` takes."""
    if name.startswith("synthetic:"):
        return synthetic_model(
            name.split(":", 1)[1], torch.device("cpu") if offload else device, dtype, layers
        )
    from trimprune import load_model

    return load_model(name, gguf_file, dtype, device, offload=offload)


def random_calibration(vocab_size: int, nsamples: int, seqlen: int) -> torch.Tensor:
    """Seeded random token ids (timing runs on synthetic models)."""
    g = torch.Generator().manual_seed(0)
    return torch.randint(0, vocab_size, (nsamples, seqlen), generator=g)


def peak_rss_gb() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return r / 2**20 if sys.platform != "darwin" else r / 2**30


def reset_rss_peak() -> bool:
    """Reset the kernel's peak resident-set mark of this process (Linux: `5 > /proc/self/clear_refs`), so that
    `rss_gb("VmHWM")` measures from now on; False where that is not possible."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def rss_gb(field: str = "VmRSS") -> float | None:
    """This process's resident set (`VmRSS`) or its peak since the last `reset_rss_peak` (`VmHWM`), in GiB
    (Linux; None elsewhere)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1]) / 2**20
    except OSError:
        pass
    return None


def append_jsonl(path: str | Path, rec: dict) -> None:
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    with open(p, "a") as f:
        f.write(json.dumps(rec) + "\n")


class Timer:
    def __enter__(self):
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        self.t = time.perf_counter()
        return self

    def __exit__(self, *a):
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        self.seconds = time.perf_counter() - self.t


def config_overrides(items: list[str], error) -> dict:
    """`--set FIELD=VALUE` items as {flat field name: value} (VALUE as JSON, else a string); `error(message)`
    for a field PruneConfig does not have (argparse's `ap.error`)."""
    from trimprune import PruneConfig

    out = {}
    for item in items:
        field, _, value = item.partition("=")
        if field not in PruneConfig.flat_fields():
            error(f"--set {item}: PruneConfig has no field {field!r}")
        try:
            out[field] = json.loads(value)
        except json.JSONDecodeError:
            out[field] = value
    return out
