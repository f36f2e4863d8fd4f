"""`--offload disk`: a model whose decoder blocks stay in the checkpoint's safetensors.

`load_disk_model` builds the model with every parameter on the meta device (no memory; buffers such
as rotary tables are computed for real, they are small), then reads the parameters outside the
decoder blocks (embeddings, final norm, head) from the checkpoint. The blocks' parameters stay meta:
`DiskBlocks` (returned beside the model: `load_model(...).storage`, passed on to `prune(...,
storage=...)`, the evaluation and `io.export.write_outputs`) reads a block when the executor stages
it (`exec.offload.StoredBlocks`: read ahead on a worker thread, installed into the block's modules
while it is visited, dropped afterwards).

While `prune` walks the blocks to prune them (`DiskBlocks.pruning`), each finished block is written
to the output folder as its own shard (`io.shards.ShardWriter`) and later reads of that block (the
evaluation of the pruned model) come from that shard; `finish` completes the folder. Reading by name
needs the checkpoint's tensor names to be the model's state-dict names (as `save_pretrained` writes
them). Parameters that transformers builds on load from several stored tensors (its
``WeightConverter`` s: a mixture-of-experts' experts stored one by one, fused into 3-D parameters)
are built the same way when a block is read (`_Converted`), and written back as `save_pretrained`
writes them (transformers' ``revert_weight_conversion``); other conversions are refused with the
fix.
"""

from __future__ import annotations

import contextlib
import copy
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from trimprune.errors import TrimpruneError
from trimprune.io.compact import COMPACT_FILE
from trimprune.io.shards import SafetensorsCheckpoint, ShardWriter

FIX = "use {offload} cpu"


@dataclass(frozen=True)
class StoredTensor:
    """A parameter of a block: its name in the checkpoint, its dtype and shape in the model."""

    stored: str
    dtype: torch.dtype
    shape: tuple[int, ...]


def local_checkpoint(target: str) -> Path:
    """The local folder of `target` (a model folder, or a hub id fetched into the cache: its
    safetensors and JSON files)."""
    p = Path(target)
    if p.is_dir():
        return p
    try:
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(target, allow_patterns=["*.safetensors", "*.json"]))
    except Exception as e:  # noqa: BLE001 - any hub failure: one line naming the model
        first = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise TrimpruneError(
            f"--model {target!r} could not be fetched for {{offload}} disk ({first[:160]}): give a "
            "local model folder"
        ) from e


def open_checkpoint(target: str, gguf_file: str | None = None) -> SafetensorsCheckpoint:
    """The safetensors checkpoint of `target`; a GGUF or `.bin` model is refused with the fix."""
    if gguf_file is not None:
        raise TrimpruneError(
            f"{{offload}} disk reads a model stored as safetensors; {gguf_file} is a GGUF file: "
            f"{FIX} (or convert the model to safetensors)"
        )
    folder = local_checkpoint(target)
    ckpt = SafetensorsCheckpoint.open(folder)
    if ckpt is None:
        found = (
            sorted(p.name for p in folder.glob("*.bin"))[:1]
            + sorted(p.name for p in folder.glob("*.gguf"))[:1]
        )
        held = f" (it holds {found[0]})" if found else ""
        if (folder / COMPACT_FILE).is_file():
            held = f" (it is a compact output, {COMPACT_FILE})"
            fix = f"{FIX}, or write a plain copy first with `trimprune export --dense`"
        else:
            fix = FIX
        raise TrimpruneError(
            f"{{offload}} disk reads a model stored as safetensors, and {str(folder)!r} has no "
            f"model.safetensors or {'model.safetensors.index.json'}{held}: {fix}"
        )
    return ckpt


@dataclass
class _Converted:
    """A block parameter transformers builds on load from several stored tensors: its
    ``WeightConverter`` and the stored (name, source pattern) pairs, in the order transformers
    reads them."""

    converter: Any
    sources: list[tuple[str, str]]

    def build(self, target: str, tensors: dict[str, torch.Tensor], model: nn.Module):
        """The parameter `target` (full name) from `tensors` (stored name -> tensor)."""
        conv = copy.deepcopy(self.converter)  # a fresh one: converters collect their inputs
        for name, pattern in self.sources:
            conv.add_tensor(target, name, pattern, tensors[name])
        return conv.convert(target, model=model, config=model.config)[target]


def _conversions(model: nn.Module, names: Iterable[str]) -> dict[str, _Converted]:
    """The model's state-dict names that transformers builds with a ``WeightConverter`` from the
    stored tensors `names` (their sources, in natural key order as transformers loads them)."""
    try:
        from transformers.conversion_mapping import get_model_conversion_mapping
        from transformers.core_model_loading import (
            WeightConverter,
            WeightRenaming,
            dot_natural_key,
            rename_source_key,
        )
    except ImportError:  # transformers 4 converts nothing
        return {}
    transforms = get_model_conversion_mapping(model)
    renamings = [t for t in transforms if isinstance(t, WeightRenaming)]
    converters = [t for t in transforms if isinstance(t, WeightConverter)]
    by_pattern = {p: c for c in converters for p in c.source_patterns}
    state = model.state_dict()
    prefix = getattr(model, "base_model_prefix", "") or ""
    out: dict[str, _Converted] = {}
    for key in sorted(names, key=dot_natural_key):
        name, pattern = rename_source_key(key, renamings, converters, prefix, state)
        if pattern is not None and name in state:
            out.setdefault(name, _Converted(by_pattern[pattern], [])).sources.append((key, pattern))
    return out


def _set_tensor(model: nn.Module, name: str, value: torch.Tensor) -> None:
    """Put `value` in place of the parameter or buffer `name` (a new Parameter: a meta parameter's
    data cannot be replaced by a host tensor)."""
    path, _, attr = name.rpartition(".")
    mod = model.get_submodule(path) if path else model
    if attr in mod._parameters:
        old = mod._parameters[attr]
        mod._parameters[attr] = nn.Parameter(value, requires_grad=old.requires_grad)
    else:
        mod._buffers[attr] = value


class DiskBlocks:
    """Where the parameters of a disk-offloaded model's decoder blocks are: in the checkpoint, or,
    once the pruning walk has finished a block, in its shard of the output folder. Read and written
    on the executor's I/O thread (`exec.offload.StoredBlocks`); `writes` is asked on the main
    thread."""

    def __init__(
        self,
        model: nn.Module,
        blocks_name: str,
        blocks: nn.ModuleList,
        source: SafetensorsCheckpoint,
        stored_name,
    ):
        self.model, self.blocks_name, self.source = model, blocks_name, source
        self.params: list[
            dict[str, StoredTensor]
        ] = []  # per block: its parameters (names inside it)
        self.names: list[dict[str, str]] = []  # per block: state-dict name inside it -> stored name
        # per block: parameters built from several stored tensors (names inside the block)
        self.converted: list[dict[str, _Converted]] = []
        conversions: dict[str, _Converted] | None = None
        self.rest_names = {
            n: stored_name(n) or n
            for n in model.state_dict()
            if not n.startswith(f"{blocks_name}.")
        }
        for i, block in enumerate(blocks):
            entries, converted = {}, {}
            for local, p in block.named_parameters(remove_duplicate=False):
                full = f"{blocks_name}.{i}.{local}"
                stored = stored_name(full)
                if stored is None:
                    if conversions is None:
                        conversions = _conversions(model, source.weight_map)
                    if full in conversions:
                        converted[local] = conversions[full]
                        entries[local] = StoredTensor("", p.dtype, tuple(p.shape))
                        continue
                    raise TrimpruneError(
                        f"the checkpoint in {str(source.folder)!r} has no tensor {full} (its names "
                        "differ from the model's, e.g. a layout transformers converts on load): "
                        f"{FIX}"
                    )
                entries[local] = StoredTensor(stored, p.dtype, tuple(p.shape))
            self.params.append(entries)
            self.converted.append(converted)
            self.names.append(
                {
                    local: stored_name(f"{blocks_name}.{i}.{local}") or f"{blocks_name}.{i}.{local}"
                    for local in block.state_dict()
                    if local not in converted
                }
            )
        self._check_shapes()
        self.location: list[SafetensorsCheckpoint] = [source] * len(
            blocks
        )  # where each block is read from
        self.writer: ShardWriter | None = None
        self._pruning = False

    def _check_shapes(self) -> None:
        """Every block parameter has the shape the model expects (the files' headers only)."""
        wanted = {
            t.stored: t.shape for entries in self.params for t in entries.values() if t.stored
        }
        for name, shape in self.source.shapes(list(wanted)).items():
            if shape != wanted[name]:
                raise TrimpruneError(
                    f"the checkpoint's {name} has shape {list(shape)}, the model's config says "
                    f"{list(wanted[name])}: check the model folder, or {FIX}"
                )

    @property
    def num_blocks(self) -> int:
        return len(self.params)

    def read(
        self, index: int, empty: Callable[..., torch.Tensor] = torch.empty
    ) -> dict[str, torch.Tensor]:
        """Block `index`'s parameters (names inside the block) as new host tensors of the model's
        dtypes, made by `empty(shape, dtype=...)`."""
        entries, converted = self.params[index], self.converted[index]
        where = self.location[index]
        direct = {k: t for k, t in entries.items() if k not in converted}
        out = where.read(
            {k: t.stored for k, t in direct.items()}, {k: t.dtype for k, t in direct.items()}, empty
        )
        for local, conv in converted.items():
            want = entries[local]
            names = [n for n, _ in conv.sources]
            parts = where.read({n: n for n in names}, dict.fromkeys(names, want.dtype))
            full = f"{self.blocks_name}.{index}.{local}"
            built = conv.build(full, parts, self.model)
            if tuple(built.shape) != want.shape:
                raise TrimpruneError(
                    f"the checkpoint's tensors of {full} make shape {list(built.shape)}, the "
                    f"model's config says {list(want.shape)}: check the model folder, or {FIX}"
                )
            out[local] = empty(want.shape, dtype=want.dtype)
            out[local].copy_(built)
        return out

    def writes(self, index: int) -> bool:
        """Whether block `index`, once released, is written to the output (the pruning walk)."""
        return self._pruning and self.writer is not None

    def write(self, index: int, state: dict[str, torch.Tensor]) -> None:
        """Block `index`'s final state (names inside the block: parameters and persistent buffers)
        as its own shard of the output, under the checkpoint's names; the block is read from there
        from now on."""
        converted = self.converted[index]
        tensors = {self.names[index][k]: v for k, v in state.items() if k not in converted}
        if converted:  # stored as save_pretrained stores them, and read back from there
            from transformers.core_model_loading import revert_weight_conversion

            prefix = f"{self.blocks_name}.{index}."
            fused = {prefix + k: state[k] for k in converted}
            stored = revert_weight_conversion(self.model, fused)
            tensors |= stored
            built = _conversions(self.model, stored)
            self.converted[index] = {k: built[prefix + k] for k in converted}
        self.writer.write_block(index, tensors)
        self.location[index] = self._output

    # ------------------------------------------------------------------ the output
    def write_to(self, folder: str | Path) -> None:
        """Write the pruned blocks into `folder` (an empty, usually temporary, folder that the
        caller renames into place at the end, e.g. `io.export.StagedDir`)."""
        self.writer = ShardWriter(folder, self.num_blocks)
        self._output = SafetensorsCheckpoint(
            Path(folder), self.writer.weight_map
        )  # names filled as blocks land

    def check_output(self) -> None:
        """A pruning walk needs an output folder (`write_to`) that holds no pruned block yet."""
        if self.writer is None:
            raise TrimpruneError(
                "a model loaded with offload='disk' is pruned into an output folder: call "
                "loaded.storage.write_to(FOLDER) first (the command line does)"
            )
        if self.writer.written:
            raise TrimpruneError(
                "this model loaded with offload='disk' was pruned into "
                f"{str(self.writer.folder)!r} already: load it again to prune it again"
            )

    @contextlib.contextmanager
    def pruning(self):
        """The pruning walk: every block released in it is written to the output folder."""
        self.check_output()
        self._pruning = True
        try:
            yield
        finally:
            self._pruning = False

    def rest_state(self) -> dict[str, torch.Tensor]:
        """The model's tensors outside the blocks, as `save_pretrained` stores them: under the
        checkpoint's names, a tensor shared by several names (tied embeddings) once, under its first
        name; non-persistent buffers and the model's `_keys_to_ignore_on_save` left out."""
        prefix = f"{self.blocks_name}."
        ignore = set(getattr(self.model, "_keys_to_ignore_on_save", None) or ())
        out, seen = {}, set()
        for name, t in self.model.state_dict().items():
            if name.startswith(prefix) or name in ignore:
                continue
            key = (t.data_ptr(), tuple(t.shape), t.dtype)
            if key in seen:
                continue
            seen.add(key)
            out[self.rest_names.get(name, name)] = t
        return out

    def finish(self, tokenizer=None) -> None:
        """Complete the output folder: the rest of the model, the index, the configs and the
        tokenizer."""
        self.writer.finish(self.rest_state(), self.model, tokenizer)

    def moved_to(self, folder: str | Path) -> None:
        """The output folder was renamed to `folder` (committed): the pruned blocks are read from
        there."""
        self.writer.folder = self._output.folder = Path(folder)

    def discard(self) -> None:
        """Remove the written shards (the output keeps no model): the pruned blocks cannot be read
        again."""
        self.writer.discard()
        self.location = [_Discarded(self.writer.folder)] * self.num_blocks


class _Discarded:
    """Where the blocks of a pruned model are after `--no-save-model` removed them."""

    def __init__(self, folder: Path):
        self.folder = folder

    def read(self, *args, **kwargs):
        raise TrimpruneError(
            f"the pruned blocks written to {str(self.folder)!r} were removed (the output keeps no "
            "model): the pruned model cannot be read again"
        )


def _stored_names(model: nn.Module, ckpt: SafetensorsCheckpoint) -> dict[str, str]:
    """The model's state-dict name -> its name in the checkpoint, for the tensors transformers would
    load as they are or renamed (its `WeightRenaming`s, a missing or extra base-model prefix:
    transformers 5's own mapping where it has one); tensors it would convert (merge, split) are left
    out."""
    state = model.state_dict()
    prefix = getattr(model, "base_model_prefix", "") or ""
    out = {}
    try:
        from transformers.conversion_mapping import get_model_conversion_mapping
        from transformers.core_model_loading import (
            WeightConverter,
            WeightRenaming,
            rename_source_key,
        )
    except ImportError:  # transformers 4: names as stored, up to the base-model prefix
        for key in ckpt.weight_map:
            for name in (key, f"{prefix}.{key}", key.removeprefix(f"{prefix}.")):
                if name in state:
                    out.setdefault(name, key)
                    break
        return out
    transforms = get_model_conversion_mapping(model)
    renamings = [t for t in transforms if isinstance(t, WeightRenaming)]
    converters = [t for t in transforms if isinstance(t, WeightConverter)]
    for key in ckpt.weight_map:
        name, converted = rename_source_key(key, renamings, converters, prefix, state)
        if converted is None and name in state:
            out.setdefault(name, key)
    return out


def load_disk_model(
    target: str, dtype: torch.dtype, trust_remote_code: bool = False, gguf_file: str | None = None
) -> tuple[nn.Module, DiskBlocks]:
    """(the model of `target` with its decoder blocks left in the checkpoint, the `DiskBlocks` that
    reads them; see the module's docstring)."""
    from accelerate import init_empty_weights
    from transformers import AutoConfig, GenerationConfig

    from trimprune.core.model import ModelAdapter
    from trimprune.io.autoclass import auto_model_class

    ckpt = open_checkpoint(target, gguf_file)
    config = AutoConfig.from_pretrained(target, trust_remote_code=trust_remote_code)
    auto = auto_model_class(config)
    with init_empty_weights():  # parameters on the meta device, buffers computed for real
        try:
            model = auto.from_config(config, dtype=dtype, trust_remote_code=trust_remote_code)
        except TypeError:  # transformers < 4.56 uses torch_dtype
            model = auto.from_config(config, torch_dtype=dtype, trust_remote_code=trust_remote_code)
    adapter = ModelAdapter.from_model(model)
    find = _stored_names(model, ckpt).get
    block_prefix = f"{adapter.blocks_name}."
    persistent = model.state_dict(keep_vars=True)
    outside = {n: t for n, t in persistent.items() if not n.startswith(block_prefix)}
    present = {n: find(n) for n in outside}
    values = ckpt.read(
        {n: s for n, s in present.items() if s is not None},
        {n: t.dtype for n, t in outside.items()},
    )
    for n, v in values.items():
        _set_tensor(model, n, v)
    for n, t in persistent.items():  # persistent buffers of the blocks (rare; small): read now
        s = find(n) if n.startswith(block_prefix) and not isinstance(t, nn.Parameter) else None
        if s is not None:
            _set_tensor(model, n, ckpt.read({n: s}, {n: t.dtype})[n])
    model.tie_weights()
    meta = [
        n
        for n, p in model.named_parameters()
        if p.device.type == "meta" and not n.startswith(block_prefix)
    ]
    if meta:
        raise TrimpruneError(
            f"the checkpoint in {str(ckpt.folder)!r} has no tensor {meta[0]}: check the model "
            f"folder, or {FIX}"
        )
    with contextlib.suppress(OSError, ValueError):
        model.generation_config = GenerationConfig.from_pretrained(target)
    storage = DiskBlocks(model, adapter.blocks_name, adapter.blocks, ckpt, find)
    return model.eval(), storage


def blocks_on_meta(model: nn.Module) -> bool:
    """Whether the model has parameters on the meta device (a model loaded with offload='disk': its
    decoder blocks stay in the checkpoint)."""
    return any(p.device.type == "meta" for p in model.parameters())


def check_disk_prune(
    model: nn.Module, config, ranks, sampling: bool, storage: DiskBlocks | None = None
) -> DiskBlocks | None:
    """`prune`'s checks of `--offload disk` and its `storage` (the `DiskBlocks` of
    `load_model(..., offload="disk")`), one line each, before any work; `storage` or None."""
    disk = config.run.offload == "disk"
    if storage is None:
        if disk:
            raise TrimpruneError(
                "offload 'disk' prunes a model loaded with load_model(..., offload='disk') (its "
                "blocks stay in the checkpoint) and given its storage (prune(..., "
                "storage=loaded.storage)): load it so, or use offload 'cpu'"
            )
        if blocks_on_meta(model):
            raise TrimpruneError(
                "the model's blocks are on the meta device (a model loaded with offload='disk' "
                "keeps them in the checkpoint): prune it with offload 'disk' and "
                "storage=loaded.storage"
            )
        return None
    if not disk:
        raise TrimpruneError(
            "the model was loaded with offload='disk' (its blocks are not in memory): prune it "
            "with offload 'disk'"
        )
    if storage.model is not model:
        raise TrimpruneError(
            "storage is the DiskBlocks of another model: give the storage that load_model(..., "
            "offload='disk') returned with this model"
        )
    if ranks.parallel:
        raise TrimpruneError(
            "{offload} disk is not supported with several processes (torchrun) yet: run one "
            f"process, or {FIX}"
        )
    if sampling and config.calib.source == "self":
        raise TrimpruneError(
            "{calib} self samples from the whole model, which {offload} disk does not hold in "
            f"memory: use another {{calib}}, or {FIX}"
        )
    storage.check_output()
    return storage
