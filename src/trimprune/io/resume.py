"""The resume state of a prune, so that an interrupted run continues after its last finished block.

`--checkpoint-dir DIR` (`RunConfig.checkpoint_dir`) makes `prune` keep, in DIR:

    state.json                            the commit point, written last: format, fingerprint, the
    last
                                          complete block and the files below that belong to it
    allocation.json                       the per-linear targets (once, before block 0: OWL and
                                          AlphaPruning are not recomputed on resume)
    block0003.safetensors                 block 3's pruned linear weights (as the modules store
    them, exact
                                          dtype) and masks (bit-packed as `PruneResult.masks`)
    block0003.json                        block 3's records (`LinearRecord` /
    `BlockSafeguardRecord.to_dict`) streams.block0003.rank0.safetensors   the hidden states entering
    block 4: the main stream per batch
                                          and the block safeguard's subset through the dense and the
                                          pruned model (`engine.walk.Streams`), of rank 0

Each file is written to a temporary file in DIR, fsynced and renamed into place (`os.replace`);
state.json is written last, so a file it does not name (a block that was being written when the
process died, temporary files) is ignored, and removed when the run resumes. Only safetensors and
JSON are read back: nothing is unpickled.

state.json records the size and sha256 of every file it names, and the sha256 of its own bytes
(`io.resume_manifest`); `--resume` verifies them all before anything is restored and refuses a
damaged or truncated file (one line naming the file and its block: remove the folder to start
afresh).

`--resume` (`RunConfig.resume`) refuses a resume state whose fingerprint differs: the config's
fields that decide the computation (not `run`, `search`, the AlphaPruning cache folder or the
calibration file's path), the model (its config.json, the names, shapes and dtypes of its
parameters, the bytes of block 0's parameters before pruning) and the calibration token ids.

The streams are the bulk: nsamples x seqlen x hidden values in the model's dtype for the main
stream, and 2 x subset x seqlen x hidden more with TRIM's block safeguard (subset = nsamples / 8, at
least 4). Only the latest block's streams are kept.
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import hashlib
import json
import os
import re
import signal
import tempfile
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from trimprune.algo.allocation import Allocation
from trimprune.algo.block import BlockRecords
from trimprune.config import PruneConfig
from trimprune.core.records import BlockSafeguardRecord, LinearRecord
from trimprune.engine.walk import Streams
from trimprune.errors import TrimpruneError
from trimprune.io.resume_manifest import (
    check_state,
    seal,
    sealed_writer,
    unreadable_state,
    verify_files,
)

FORMAT = "trimprune-checkpoint-v2"  # v2: state.json carries the sha256 manifest
STATE = "state.json"
ALLOCATION = "allocation.json"
# test hook: `TRIMPRUNE_TEST_KILL_AFTER_BLOCK=k` sends SIGKILL to the process right after block k's
# resume state is committed (tests/test_resume.py interrupts real runs with it); read in
# `_after_commit` only
KILL_ENV = "TRIMPRUNE_TEST_KILL_AFTER_BLOCK"
# the files a resume state writes (anything else in DIR is never touched)
_OWN = re.compile(
    r"(state\.json|allocation\.json|block\d+\.(safetensors|json)|"
    r"streams\.block\d+\.rank\d+\.safetensors)"
)
_TMP = re.compile(
    r"\.(state\.json|allocation\.json|block\d+\.(safetensors|json)|"
    r"streams\.block\d+\.rank\d+\.safetensors)\.tmp-.*"
)


# ------------------------------------------------------------------------------------------
# identity
def config_identity(config: PruneConfig) -> dict:
    """The config's fields that decide what is computed (nested form): all but the run settings, the
    search's settings (a search takes no resume state: `PruneConfig` refuses it), the AlphaPruning
    cache folder and the calibration file's path and format (its token ids are hashed)."""
    d = config.to_dict()
    d.pop("run")
    d.pop("search")
    d["allocation"].pop("alpha_cache_dir")
    d["calib"].pop("data")
    d["calib"].pop("format")
    return d


def _tensor_bytes(t: torch.Tensor):
    t = t.detach().to("cpu").contiguous().reshape(-1)
    return t.view(torch.uint8).numpy() if t.numel() else b""


def model_identity(adapter) -> dict:
    """The model's config.json (without private and version keys), the names / shapes / dtypes of
    its parameters, and the bytes of block 0's parameters (call it before any block is pruned)."""
    model = adapter.model
    cfg = model.config.to_dict() if hasattr(model, "config") else {}
    cfg = {
        k: v
        for k, v in cfg.items()
        if not k.startswith("_") and k not in ("transformers_version", "use_cache")
    }
    params = [[n, list(p.shape), str(p.dtype)] for n, p in model.named_parameters()]
    h = hashlib.sha256()
    for n, p in adapter.blocks[0].named_parameters():
        h.update(f"{n}:{tuple(p.shape)}:{p.dtype};".encode())
        h.update(_tensor_bytes(p))
    return {
        "config_sha256": _sha(cfg),
        "parameters_sha256": _sha(params),
        "block0_sha256": h.hexdigest(),
        "num_blocks": adapter.num_blocks,
    }


def calibration_identity(ids: torch.Tensor) -> dict:
    return {
        "shape": list(ids.shape),
        "sha256": hashlib.sha256(_tensor_bytes(ids.to(torch.int64))).hexdigest(),
    }


def _sha(obj) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()


def _flat_items(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out |= _flat_items(v, f"{prefix}{k}.")
        else:
            out[f"{prefix}{k}"] = v
    return out


# ------------------------------------------------------------------------------------------ files
def _umask() -> int:
    m = os.umask(0)
    os.umask(m)
    return m


def _fsync_dir(folder: Path) -> None:
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_atomic(folder: Path, name: str, write: Callable[[str], None]) -> None:
    """`write(temporary path)`, fsync, rename to folder/name: the file is complete or absent."""
    fd, tmp = tempfile.mkstemp(prefix=f".{name}.tmp-", dir=folder)
    os.close(fd)
    try:
        write(tmp)
        fd = os.open(tmp, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes it private (0600)
        os.replace(tmp, folder / name)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def _write_json(folder: Path, name: str, data) -> None:
    from trimprune.io.export import _json_default

    text = json.dumps(data, indent=1, default=_json_default)

    def write(path):
        with open(path, "w") as f:
            f.write(text)

    _write_atomic(folder, name, write)


def _save_tensors(
    folder: Path, name: str, tensors: dict[str, torch.Tensor], metadata: dict[str, str]
) -> None:
    host, seen = {}, set()
    for k, t in tensors.items():
        t = t.detach().to("cpu").contiguous()
        ptr = t.untyped_storage().data_ptr()
        if ptr in seen or t.untyped_storage().nbytes() != t.numel() * t.element_size():
            t = t.clone()  # safetensors stores no shared or partial storages
        seen.add(t.untyped_storage().data_ptr())
        host[k] = t
    _write_atomic(folder, name, lambda path: save_file(host, path, metadata=metadata))


def _metadata(path: Path) -> dict:
    with safe_open(str(path), framework="pt") as f:
        return f.metadata() or {}


def block_files(block: int) -> tuple[str, str]:
    return f"block{block:04d}.safetensors", f"block{block:04d}.json"


def streams_file(block: int, rank: int = 0) -> str:
    """The streams entering block `block` + 1, of data-parallel rank `rank` (each rank keeps its
    share)."""
    return f"streams.block{block:04d}.rank{rank}.safetensors"


def read_state(path: str | Path) -> dict | None:
    """The committed state of the resume state in `path`, or None when there is none."""
    p = Path(path)
    f = p / STATE
    if not f.is_file():
        return None
    try:
        state = json.loads(f.read_text())
    except OSError as e:
        raise TrimpruneError(
            f"{{checkpoint_dir}} {str(path)!r}: {STATE} is unreadable ({e}): remove the folder or "
            "choose another"
        ) from e
    except ValueError as e:  # not JSON, or not UTF-8: a damaged file
        raise unreadable_state(f, e) from None
    check_state(f, state, FORMAT)  # its own sha256 (io.resume_manifest)
    if not isinstance(state, dict) or state.get("format") != FORMAT:
        fmt = state.get("format") if isinstance(state, dict) else None
        raise TrimpruneError(
            f"{{checkpoint_dir}} {str(path)!r} is not a resume state this trimprune reads (format "
            f"{fmt!r}, expected {FORMAT}): remove it or choose another folder"
        )
    return state


def remove_resume_state(path: str | Path) -> None:
    """Delete the resume state's own files in `path` (nothing else), and the folder when it is then
    empty."""
    p = Path(path)
    if not p.is_dir():
        return
    with contextlib.suppress(FileNotFoundError):
        (p / STATE).unlink()  # first: what remains is no longer a resume state
    for f in p.iterdir():
        if f.is_file() and (_OWN.fullmatch(f.name) or _TMP.fullmatch(f.name)):
            with contextlib.suppress(FileNotFoundError):
                f.unlink()
    with contextlib.suppress(OSError):
        p.rmdir()


def _after_commit(block: int) -> None:
    """Test hook (see KILL_ENV): die as abruptly as a killed job right after block `block` is
    committed."""
    if os.environ.get(KILL_ENV) == str(block):
        os.kill(os.getpid(), signal.SIGKILL)


# ------------------------------------------------------------------------------------------ the
# resume state
def _mismatch(path, state: dict, identity: dict) -> str | None:
    """Why the resume state in `path` (state) was made by another run than `identity`, or None."""
    old = state.get("identity", {})
    where = f"{{resume}}: the resume state in {str(path)!r}"
    fix = (
        "rerun with the interrupted run's settings, or start afresh without {resume} in another "
        "{checkpoint_dir}"
    )
    if old.get("config") != identity["config"]:
        a, b = _flat_items(old.get("config", {})), _flat_items(identity["config"])
        diff = [k for k in sorted(set(a) | set(b)) if a.get(k) != b.get(k)]
        shown = ", ".join(f"{k} {a.get(k)!r} there, {b.get(k)!r} now" for k in diff[:3])
        return f"{where} was made with another config ({shown}): {fix}"
    if old.get("model") != identity["model"]:
        keys = [k for k in identity["model"] if old.get("model", {}).get(k) != identity["model"][k]]
        what = {
            "config_sha256": "config.json",
            "parameters_sha256": "parameter names / shapes / dtypes",
            "block0_sha256": "block-0 weights",
            "num_blocks": "number of blocks",
        }
        return (
            f"{where} was made from another model ({', '.join(what.get(k, k) for k in keys)} "
            f"differ): {fix}"
        )
    if old.get("calibration") != identity["calibration"]:
        return (
            f"{where} was made with other calibration data (the token ids differ; shape "
            f"{old.get('calibration', {}).get('shape')} there, {identity['calibration']['shape']} "
            f"now): {fix}"
        )
    return None


def _existing(path, state: dict) -> TrimpruneError:
    return TrimpruneError(
        f"{{checkpoint_dir}} {str(path)!r} holds the resume state of a run "
        f"({state.get('last_block', -1) + 1} of {state.get('num_blocks')} blocks done): add "
        "{resume} to continue it, or remove the folder / choose another to start afresh"
    )


class ResumeState:
    """The resume state of one prune in a folder. `open` validates (and writes nothing); the walk
    then commits block after block (`commit_block`); a resumed run reads the allocation, the blocks
    and the streams back first."""

    def __init__(self, path: Path, identity: dict, state: dict | None, rank: int = 0):
        self.path, self.identity, self.state, self.rank = path, identity, state, rank
        self.fingerprint = _sha(identity)
        self.started = False
        self.moe_fallback: dict[int, dict[str, int]] = {}  # per restored block (`restore_blocks`)

    @classmethod
    def open(
        cls,
        path: str | Path,
        config: PruneConfig,
        adapter,
        calibration: torch.Tensor,
        resume: bool,
        rank: int = 0,
    ) -> ResumeState:
        """Check `path` against this run (model still dense): refuses a foreign or mismatched
        resume state (resume), or an existing one without `resume`. Writes nothing."""
        p = Path(path)
        if p.exists() and not p.is_dir():
            raise TrimpruneError(f"{{checkpoint_dir}} {str(path)!r} is a file: give a folder")
        state = read_state(p)
        if state is not None and not resume:
            raise _existing(path, state)
        identity = {
            "config": config_identity(config),
            "model": model_identity(adapter),
            "calibration": calibration_identity(calibration),
        }
        if state is not None:
            why = _mismatch(path, state, identity)
            if why:
                raise TrimpruneError(why)
            missing = [f for f in cls._files(state) if not (p / f).is_file()]
            if missing:
                raise TrimpruneError(
                    f"{{resume}}: the resume state in {str(path)!r} is incomplete ({missing[0]} is "
                    "missing): remove the folder and start afresh without {resume}"
                )
            verify_files(
                p, state, cls._files(state)
            )  # sizes and sha256 before anything is restored
        return cls(p, identity, state, rank)

    @staticmethod
    def _files(state: dict) -> list[str]:
        files = [f for b in state.get("blocks", []) for f in (b["tensors"], b["records"])]
        files += list(state.get("streams", {}).values())
        return files + ([state["allocation"]] if state.get("allocation") else [])

    # ------------------------------------------------------------------ what a resumed run reads
    @property
    def last_block(self) -> int:
        """The last complete block of the resume state (-1: none, or no resume state)."""
        return int(self.state["last_block"]) if self.state is not None else -1

    @property
    def batch_size(self) -> int | None:
        return self.state.get("batch_size") if self.state is not None else None

    def note_device(self, device) -> str | None:
        if self.state is not None and self.state.get("device_type") not in (
            None,
            torch.device(device).type,
        ):
            return (
                f"resumed on {torch.device(device).type}, the resume state was made on "
                f"{self.state['device_type']}: results equal an uninterrupted run up to "
                "floating-point differences between the devices"
            )
        return None

    def allocation(self) -> Allocation | None:
        """The allocation the interrupted run computed (None: not saved yet)."""
        if self.state is None or not self.state.get("allocation"):
            return None
        d = json.loads((self.path / self.state["allocation"]).read_text())
        return Allocation(
            d["method"],
            d["requested"],
            d["per_linear"],
            d["numels"],
            {k: int(v) for k, v in d["block_of"].items()},
            d.get("details", {}),
        )

    def restore_blocks(self, adapter) -> list[BlockRecords]:
        """Set the saved weights of blocks 0..last_block (exactly as saved) and return their records
        and masks; `moe_fallback` holds, per block, the experts whose statistics fell back to every
        token."""
        out = []
        for entry in self.state["blocks"][: self.last_block + 1]:
            i = int(entry["block"])
            tensors = load_file(str(self.path / entry["tensors"]))
            rec = json.loads((self.path / entry["records"]).read_text())
            self.moe_fallback[i] = {k: int(v) for k, v in rec.get("moe_fallback", {}).items()}
            linears, masks = {}, {}
            for name, mod in adapter.linears(i).items():
                full = adapter.full_name(i, name)
                w = tensors.get(f"{full}.weight")
                if w is None or w.shape != mod.weight.shape or w.dtype != mod.weight.dtype:
                    raise TrimpruneError(
                        f"{{resume}}: {entry['tensors']} in {str(self.path)!r} does not hold "
                        f"{full}'s weight as this model has it: remove the folder and start afresh"
                    )
                with torch.no_grad():
                    mod.weight.data.copy_(w)
                masks[full] = tensors[f"{full}.mask"]
                linears[full] = LinearRecord.from_dict(rec["linears"][full])
            # the block safeguard's record is kept under "guard" (the resume state's format)
            safeguard = (
                BlockSafeguardRecord.from_dict(rec["guard"])
                if rec.get("guard") is not None
                else None
            )
            out.append(BlockRecords(i, linears, safeguard, masks))
        return out

    def load_streams(self) -> tuple[Streams, list[int]]:
        """This rank's streams entering block last_block + 1 (host tensors), and the batch sizes of
        the main stream."""
        path = self.path / self.state["streams"][str(self.rank)]
        meta = _metadata(path)
        if int(meta.get("block", -2)) != self.last_block:
            raise TrimpruneError(
                f"{{resume}}: {path.name} in {str(self.path)!r} is not the stream file of block "
                f"{self.last_block}: remove the folder and start afresh"
            )
        t = load_file(str(path))

        def part(kind):
            return [
                t[k]
                for k in sorted(
                    (k for k in t if k.startswith(kind + ".")), key=lambda k: int(k.split(".")[1])
                )
            ]

        main = part("main")
        return Streams(main, part("subset_dense"), part("subset_pruned")), [
            m.shape[0] for m in main
        ]

    # ------------------------------------------------------------------ what the run writes
    def begin(self, batch_size: int, device) -> None:
        """Before the first write: create the folder, remove the resume state's files an earlier
        process left that the committed state does not name (a block it was writing, temporary
        files)."""
        if self.started:
            return
        self.path.mkdir(parents=True, exist_ok=True)
        keep = set(self._files(self.state)) | {STATE} if self.state is not None else set()
        for f in self.path.iterdir():
            if (
                f.is_file()
                and f.name not in keep
                and (_OWN.fullmatch(f.name) or _TMP.fullmatch(f.name))
            ):
                with contextlib.suppress(FileNotFoundError):
                    f.unlink()
        if self.state is None:
            from trimprune import __version__

            self.state = {
                "format": FORMAT,
                "fingerprint": self.fingerprint,
                "identity": self.identity,
                "num_blocks": self.identity["model"]["num_blocks"],
                "last_block": -1,
                "blocks": [],
                "streams": {},
                "allocation": None,
                "world_size": 1,
                "batch_size": batch_size,
                "device_type": torch.device(device).type,
                "trimprune": __version__,
            }
        self.started = True

    def _commit(self) -> None:
        """state.json, last: the commit point."""
        self.state["updated"] = _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")
        seal(self.path, self.state, self._files(self.state))  # the sha256 of every file it names
        _fsync_dir(self.path)  # the renames of the files it names are durable first
        _write_atomic(
            self.path, STATE, sealed_writer(self.state)
        )  # with its own sha256 (io.resume_manifest)
        _fsync_dir(self.path)

    def save_allocation(self, allocation: Allocation, batch_size: int, device) -> None:
        """Once, before block 0 (committed: a resumed run reuses it)."""
        self.begin(batch_size, device)
        _write_json(self.path, ALLOCATION, asdict(allocation))
        self.state["allocation"] = ALLOCATION
        self._commit()

    def commit_block(
        self,
        block: int,
        adapter,
        records: BlockRecords,
        streams: Streams,
        moe_fallback: dict[str, int] | None = None,
    ) -> None:
        """Block `block` is done: its linear weights, masks and records (with the experts whose
        statistics fell back to every token, `moe_fallback`), and the streams entering the next
        block, then state.json (the previous block's streams are deleted once it is committed)."""
        if not self.started or block != self.last_block + 1:
            raise RuntimeError(
                f"resume state: block {block} committed after block {self.last_block}"
            )
        tensors_name, records_name = block_files(block)
        tensors = {}
        for name, mod in adapter.linears(block).items():
            full = adapter.full_name(block, name)
            tensors[f"{full}.weight"] = mod.weight
            tensors[f"{full}.mask"] = records.masks[full]
        meta = {"format": FORMAT, "block": str(block), "fingerprint": self.fingerprint}
        _save_tensors(self.path, tensors_name, tensors, meta)
        rec = {
            "block": block,
            "linears": {k: r.to_dict() for k, r in records.linears.items()},
            "guard": records.safeguard.to_dict() if records.safeguard is not None else None,
        }
        if moe_fallback:
            rec["moe_fallback"] = dict(moe_fallback)
        _write_json(self.path, records_name, rec)
        st = {f"main.{j:05d}": h for j, h in enumerate(streams.main)}
        st |= {f"subset_dense.{j:05d}": h for j, h in enumerate(streams.subset_dense)}
        st |= {f"subset_pruned.{j:05d}": h for j, h in enumerate(streams.subset_pruned)}
        name = streams_file(block, self.rank)
        _save_tensors(self.path, name, st, meta | {"rank": str(self.rank)})
        old = self.state["streams"].get(str(self.rank))
        self.state["blocks"].append(
            {"block": block, "tensors": tensors_name, "records": records_name}
        )
        self.state["streams"][str(self.rank)] = name
        self.state["last_block"] = block
        self._commit()
        if old and old != name:
            with contextlib.suppress(FileNotFoundError):
                (self.path / old).unlink()
        _after_commit(block)

    def remove(self) -> None:
        remove_resume_state(self.path)


def precheck_resume_state(config: PruneConfig, model) -> None:
    """The command line's early check (before the dense evaluation, writing nothing): an existing
    resume state is refused without --resume, and with it when its config or model differ (the
    calibration is checked by `prune`, which builds it)."""
    path = config.run.checkpoint_dir
    if not path:
        return
    p = Path(path)
    if p.exists() and not p.is_dir():
        raise TrimpruneError(f"{{checkpoint_dir}} {str(path)!r} is a file: give a folder")
    state = read_state(p)
    if state is None:
        return
    if not config.run.resume:
        raise _existing(path, state)
    from trimprune.core.model import ModelAdapter

    identity = {
        "config": config_identity(config),
        "model": model_identity(ModelAdapter.from_model(model)),
        "calibration": state.get("identity", {}).get("calibration"),
    }
    why = _mismatch(path, state, identity)
    if why:
        raise TrimpruneError(why)
    verify_files(p, state, ResumeState._files(state))  # before the dense evaluation
