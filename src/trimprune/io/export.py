"""Writing results: a Hugging Face model directory, bit-packed masks, report.json, report.md and
the replayable allocation, all into a temporary directory that is renamed into place at the end."""
from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from ..algo.masks import unpack_mask
from ..errors import TrimpruneError
from .compact import save_compact
from .diskmodel import disk_storage

MASKS_FORMAT = "trimprune-masks-v1"


def check_output_dir(path: str | Path, overwrite: bool = False) -> Path:
    p = Path(path)
    if p.exists() and not overwrite:
        if not p.is_dir() or any(p.iterdir()):
            raise TrimpruneError(f"--output {str(path)!r} already exists: choose a new directory or add --overwrite")
    parent = p.resolve().parent
    if not parent.exists():
        raise TrimpruneError(f"--output {str(path)!r}: parent folder {str(parent)!r} does not exist: create it first")
    if not os.access(parent, os.W_OK):
        raise TrimpruneError(f"--output {str(path)!r}: cannot write into {str(parent)!r}: choose a writable folder")
    return p


class StagedDir:
    """An output folder written over time: a temporary folder next to `path` (`tmp`) that `commit` renames
    to `path` (replacing an existing one only with `overwrite`) and `discard` deletes (leaving the context
    discards it unless committed). No half-written `path` ever."""

    def __init__(self, path: str | Path, overwrite: bool = False):
        self.path = check_output_dir(path, overwrite)
        self.tmp = Path(tempfile.mkdtemp(prefix=f".{self.path.name}.tmp-", dir=self.path.resolve().parent))
        self.committed = False

    def commit(self) -> None:
        p, tmp = self.path, self.tmp
        _normal_permissions(tmp)
        if p.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{p.name}.old-", dir=p.resolve().parent))
            os.replace(p, old / p.name)
            os.replace(tmp, p)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, p)
        self.committed = True

    def discard(self) -> None:
        if not self.committed:
            shutil.rmtree(self.tmp, ignore_errors=True)

    def __enter__(self) -> "StagedDir":
        return self

    def __exit__(self, *exc) -> None:
        self.discard()


@contextlib.contextmanager
def atomic_dir(path: str | Path, overwrite: bool = False, staged: StagedDir | None = None):
    """Yield a temporary directory next to `path` (`staged.tmp` when given: a folder written earlier);
    on success rename it to `path` (replacing an existing one only with `overwrite`), on any failure
    delete it. No half-written `path` ever."""
    staged = staged if staged is not None else StagedDir(path, overwrite)
    try:
        yield staged.tmp
        staged.commit()
    finally:
        staged.discard()


def _normal_permissions(folder: Path) -> None:
    """mkdtemp makes a private (0700) folder; give the result the usual umask permissions."""
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(folder, 0o777 & ~umask)
    for f in folder.iterdir():
        if f.is_file():
            os.chmod(f, 0o666 & ~umask)


def save_masks(path: str | Path, masks: dict[str, torch.Tensor], shapes: dict[str, list[int]]) -> None:
    meta = {"format": MASKS_FORMAT, "bit_order": "big (numpy.packbits)", "meaning": "bit 1 = weight pruned",
            "layout": "row-major (out_features, in_features)", "shapes": json.dumps(shapes)}
    save_file({k: v.contiguous() for k, v in masks.items()}, str(path), metadata=meta)


def load_masks(path: str | Path) -> dict[str, torch.Tensor]:
    """Read masks.safetensors back into bool tensors (True = pruned)."""
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata() or {}
    if meta.get("format") != MASKS_FORMAT:
        raise TrimpruneError(f"{path} is not a trimprune masks file (format {meta.get('format')!r})")
    shapes = json.loads(meta["shapes"])
    packed = load_file(str(path))
    return {k: unpack_mask(v, shapes[k]) for k, v in packed.items()}


SAVE_FORMATS = ("dense", "compact")


def save_model_dir(out: Path, model, tokenizer, save_format: str = "dense", sparse: set[str] = frozenset()) -> None:
    """A Hugging Face model directory ("dense"), or a compact one whose parameters named in `sparse` are
    stored as bitmask + values (`compact.py`)."""
    cfg = model.config
    if getattr(cfg, "quantization_config", None) is not None:
        with contextlib.suppress(AttributeError):
            del cfg.quantization_config
    if getattr(model, "hf_quantizer", None) is not None and getattr(model, "trimprune_source", {}).get("gguf_file"):
        model.hf_quantizer = None  # GGUF weights were de-quantised on load: the model is dense
    if save_format == "compact":
        save_compact(out, model, tokenizer, set(sparse))
        return
    storage = disk_storage(model)
    if storage is not None:              # --offload disk: the blocks' shards are in `out` already
        storage.finish(tokenizer)
        return
    model.save_pretrained(str(out), safe_serialization=True)
    if tokenizer is not None:
        tokenizer.save_pretrained(str(out))


def pruned_parameters(model, linear_names) -> set[str]:
    """The state-dict names of the weights of the pruned linears."""
    modules = dict(model.named_modules())
    return {f"{n}.weight" for n in linear_names if n in modules}


def write_outputs(path: str | Path, model, tokenizer, result, report: dict, report_md=None,
                  overwrite: bool = False, save_model: bool = True, save_format: str = "dense",
                  staged: StagedDir | None = None) -> Path:
    """The output folder: model (dense or compact), masks, allocation, plots, report.json and report.md
    (`report_md(report)` renders the Markdown once the plots are known). `staged`: the temporary folder
    written since the prune started (`--offload disk`: the blocks' shards), completed and committed here."""
    from . import plots

    with atomic_dir(path, overwrite, staged) as tmp:
        if save_model:
            save_model_dir(tmp, model, tokenizer, save_format, pruned_parameters(model, result.layers))
        elif disk_storage(model) is not None:
            disk_storage(model).discard()
        shapes = {k: list(r.shape) for k, r in result.layers.items()}
        save_masks(tmp / "masks.safetensors", result.masks, shapes)
        result.allocation.save(tmp / "allocation.json")
        if report and plots.available():
            rows = plots.row_sparsities(result.masks, shapes) if report.get("trim_summary") else None
            report["plots"] = [f"plots/{n}" for n in plots.write_plots(tmp / "plots", report, rows)]
        elif report:
            report["notes"].append("no plots: matplotlib is not installed (pip install 'trimprune[report]')")
        (tmp / "report.json").write_text(json.dumps(report, indent=1, default=_json_default))
        if report_md is not None:
            (tmp / "report.md").write_text(report_md(report) if callable(report_md) else report_md)
    if save_model and disk_storage(model) is not None:
        disk_storage(model).moved_to(path)          # the pruned blocks are read from the committed folder now
    return Path(path)


def write_text_atomic(path: str | Path, text: str) -> None:
    """Write a file through a temporary file in the same folder, renamed into place."""
    p = Path(path)
    if not p.resolve().parent.exists():
        raise TrimpruneError(f"--output {str(path)!r}: folder {str(p.resolve().parent)!r} does not exist")
    fd, tmp = tempfile.mkstemp(prefix=f".{p.name}.tmp-", dir=p.resolve().parent)
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)                 # mkstemp makes it private (0600)
        os.replace(tmp, p)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def write_json_atomic(path: str | Path, data: dict) -> None:
    write_text_atomic(path, json.dumps(data, indent=1, default=_json_default))


def _json_default(o):
    if isinstance(o, torch.Tensor):
        return o.tolist()
    if isinstance(o, (torch.dtype, torch.device, Path)):
        return str(o)
    if isinstance(o, tuple):
        return list(o)
    raise TypeError(f"not JSON serialisable: {type(o).__name__}")
