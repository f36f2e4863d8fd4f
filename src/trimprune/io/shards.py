"""Safetensors checkpoints read tensor by tensor, and a Hugging Face model folder written shard by
shard.

`SafetensorsCheckpoint`: the tensors of a model folder stored as safetensors (one
`model.safetensors`, or the shards that `model.safetensors.index.json` lists). A tensor is read
through safetensors' memory map (`safe_open`) and copied out of it, converted to the dtype asked for
(into memory the caller allocates: the executor's pinned memory for a GPU), only when it is needed;
each read opens the files it needs and closes them again, so the pages it touched are unmapped (the
process does not keep the whole checkpoint mapped).

`ShardWriter`: the output folder of `--offload disk`, written while a prune runs: each decoder block
as its own shard as soon as the block is final (`model-00002-of-000NN.safetensors` holds block 0),
then at the end the rest of the model (embeddings, final norm, head: shard 1),
`model.safetensors.index.json`, config.json, generation_config.json and the tokenizer.
`transformers.AutoModelForCausalLM.from_pretrained` loads the folder like one written by
`save_pretrained`.
"""

from __future__ import annotations

import json
import os
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from trimprune.errors import TrimpruneError
from trimprune.io.integrity import check_safetensors_file

INDEX = "model.safetensors.index.json"
SINGLE = "model.safetensors"
SHARD_METADATA = {"format": "pt"}  # what save_pretrained writes into every shard


def _header_names(path: Path) -> list[str]:
    with safe_open(str(path), framework="pt") as f:
        return list(f.keys())


def checkpoint_files(folder: Path) -> dict[str, str] | None:
    """tensor name -> file name (inside `folder`) of a safetensors checkpoint, or None when the
    folder holds none (a `.bin` or GGUF model)."""
    if (folder / INDEX).is_file():
        try:
            weight_map = json.loads((folder / INDEX).read_text())["weight_map"]
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise TrimpruneError(
                f"{folder / INDEX} is not a safetensors index ({type(e).__name__}: {e}): check the "
                "model folder"
            ) from e
        missing = sorted({f for f in weight_map.values() if not (folder / f).is_file()})
        if missing:
            raise TrimpruneError(
                f"{folder / INDEX} lists {missing[0]}, which is not in the folder: download the "
                "model again"
            )
        for f in sorted(set(weight_map.values())):
            check_safetensors_file(folder / f)  # whole, before anything reads it (io.integrity)
        return dict(weight_map)
    if (folder / SINGLE).is_file():
        check_safetensors_file(folder / SINGLE)
        return dict.fromkeys(_header_names(folder / SINGLE), SINGLE)
    return None


@dataclass
class SafetensorsCheckpoint:
    """The tensors of one safetensors checkpoint folder, read through safetensors' memory map."""

    folder: Path
    weight_map: dict[str, str]  # tensor name -> file name inside `folder`
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    @classmethod
    def open(cls, folder: str | Path) -> SafetensorsCheckpoint | None:
        """The checkpoint in `folder`, or None when it holds no safetensors."""
        folder = Path(folder)
        names = checkpoint_files(folder)
        return None if names is None else cls(folder, names)

    def __contains__(self, name: str) -> bool:
        return name in self.weight_map

    def shapes(self, names: list[str]) -> dict[str, tuple[int, ...]]:
        """The stored shapes of `names` (read from the files' headers)."""
        by_file: dict[str, list[str]] = {}
        for name in names:
            by_file.setdefault(self.weight_map[name], []).append(name)
        out = {}
        for fname, group in by_file.items():
            with safe_open(str(self.folder / fname), framework="pt") as f:
                out |= {name: tuple(f.get_slice(name).get_shape()) for name in group}
        return out

    def read(
        self,
        names: dict[str, str],
        dtypes: dict[str, torch.dtype],
        empty: Callable[..., torch.Tensor] = torch.empty,
    ) -> dict[str, torch.Tensor]:
        """{key: tensor} for `names` (key -> stored tensor name): each copied out of the memory map
        into a new host tensor of `dtypes[key]` made by `empty(shape, dtype=...)`."""
        by_file: dict[str, list[str]] = {}
        for key, name in names.items():
            by_file.setdefault(self.weight_map[name], []).append(key)
        out = {}
        with self._lock:  # one reader at a time: reads are sequential on disk anyway
            for fname, keys in by_file.items():
                with safe_open(str(self.folder / fname), framework="pt") as f:
                    for key in keys:
                        src = f.get_tensor(names[key])  # a view of the memory map
                        dst = empty(src.shape, dtype=dtypes[key])
                        dst.copy_(src)
                        out[key] = dst
                        del src
        return out


def shard_name(k: int, total: int) -> str:
    """The Hugging Face name of shard k (0-based) of `total`."""
    return f"model-{k + 1:05d}-of-{total:05d}.safetensors"


class ShardWriter:
    """Writes a Hugging Face model folder one shard at a time: block i's shard (`write_block`) as
    soon as it is final, the rest of the model, the index and the configs at the end (`finish`)."""

    def __init__(self, folder: str | Path, num_blocks: int):
        self.folder = Path(folder)
        self.num_blocks = num_blocks
        self.total = num_blocks + 1  # the blocks, then the rest of the model
        self.weight_map: dict[str, str] = {}
        self.nbytes: dict[str, int] = {}
        self.numels: dict[str, int] = {}
        self.written: set[int] = set()  # blocks written

    def block_file(self, index: int) -> str:
        return shard_name(index + 1, self.total)

    def _write(self, fname: str, tensors: dict[str, torch.Tensor]) -> Path:
        """One shard, through a temporary name renamed into place (a reader never sees half a
        file)."""
        path = self.folder / fname
        tmp = self.folder / f".{fname}.tmp"
        save_file(
            {k: v.contiguous() for k, v in tensors.items()}, str(tmp), metadata=SHARD_METADATA
        )
        os.replace(tmp, path)
        for k, v in tensors.items():
            self.weight_map[k] = fname
            self.nbytes[k] = v.numel() * v.element_size()
            self.numels[k] = v.numel()
        return path

    def write_block(self, index: int, tensors: dict[str, torch.Tensor]) -> Path:
        """Block `index`'s tensors (full state-dict names) as its own shard."""
        path = self._write(self.block_file(index), tensors)
        self.written.add(index)
        return path

    def finish(self, rest: dict[str, torch.Tensor], model, tokenizer=None) -> None:
        """The rest of the model (`rest`: the tensors outside the blocks, tied duplicates removed)
        as shard 1, the index, config.json (with the dtype and architecture, as `save_pretrained`
        writes them), generation_config.json and the tokenizer."""
        missing = sorted(set(range(self.num_blocks)) - self.written)
        if missing:
            raise TrimpruneError(
                f"the output folder lacks the shards of blocks {missing[:5]}: the prune did not "
                "finish every block"
            )
        self._write(shard_name(0, self.total), rest)
        index = {
            "metadata": {
                "total_size": sum(self.nbytes.values()),
                "total_parameters": sum(self.numels.values()),
            },
            "weight_map": dict(sorted(self.weight_map.items())),
        }
        (self.folder / INDEX).write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")
        cfg = model.config
        cfg.dtype = str(model.dtype).split(".")[1]
        cfg.architectures = [type(model).__name__]
        cfg.save_pretrained(str(self.folder))
        gen = getattr(model, "generation_config", None)
        if gen is not None and model.can_generate():
            gen.save_pretrained(str(self.folder))
        if tokenizer is not None:
            tokenizer.save_pretrained(str(self.folder))

    def discard(self) -> None:
        """Remove the shards written so far (`--no-save-model`: they were needed only while the
        prune ran)."""
        for fname in set(self.weight_map.values()):
            (self.folder / fname).unlink(missing_ok=True)
        self.weight_map.clear()
        self.written.clear()
