"""Writing results: a Hugging Face model directory, bit-packed masks, report.json, report.md and
the replayable allocation, all into a temporary directory that is renamed into place at the end."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from safetensors.torch import load_file

from trimprune.algo.masks import unpack_mask
from trimprune.core.moe import FusedSlot, fused_masks, fused_parameter
from trimprune.errors import OutputError, TrimpruneError
from trimprune.io.compact import save_compact
from trimprune.io.diskmodel import DiskBlocks
from trimprune.io.tensorfile import save_tensors

if TYPE_CHECKING:
    from trimprune.io.models import ModelSource

MASKS_FORMAT = "trimprune-masks-v1"


EXPORT_MARKER = "trimprune-export.json"  # written by `trimprune export` into its folder
EXPORT_FORMAT = "trimprune-export-v1"
FILES_LIST = "trimprune-files.json"  # the files trimprune wrote into an output folder
FILES_FORMAT = "trimprune-files-v1"
# written into a prune's folder later by `trimprune report` (its default page)
LATER_FILES = frozenset({"report.html", "report.md", "report-page.md", FILES_LIST})
TMP_TAG, OLD_TAG = "tmp", "old"  # .NAME.tmp-PID-XXXX (being written), .NAME.old-PID-XXXX (replaced)


def probe_writable(folder: str | Path, what: str) -> None:
    """Create and remove a file in `folder`: the one reliable test that it can be written
    (`os.access` says yes to root for /proc, read-only mounts and full disks)."""
    try:
        fd, name = tempfile.mkstemp(prefix=".trimprune-probe-", dir=folder)
    except OSError as e:
        raise OutputError(
            f"{what}: cannot write into {str(folder)!r} ({e.strerror or e}): choose a writable "
            "folder"
        ) from e
    try:
        os.write(fd, b"trimprune")
    except OSError as e:
        raise OutputError(
            f"{what}: cannot write into {str(folder)!r} ({e.strerror or e}): choose a folder with "
            "space"
        ) from e
    finally:
        os.close(fd)
        with contextlib.suppress(OSError):
            os.unlink(name)


def trimprune_output(path: str | Path) -> str | None:
    """ "prune", "sweep" or "export" when `path` is a folder trimprune wrote (its report.json, the
    sweep.json of `trimprune sweep`, or the marker of `trimprune export`), else None."""
    p = Path(path)
    for name, kind in (
        ("report.json", "prune"),
        ("sweep.json", "sweep"),
        (EXPORT_MARKER, "export"),
    ):
        f = p / name
        if not f.is_file():
            continue
        try:
            d = json.loads(f.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            continue
        if (
            kind in ("prune", "sweep")
            and isinstance(d, dict)
            and isinstance(d.get("versions"), dict)
            and "trimprune" in d["versions"]
        ):
            return kind
        if kind == "export" and isinstance(d, dict) and d.get("format") == EXPORT_FORMAT:
            return kind
    return None


def make_parent(path: str | Path, flag: str) -> Path:
    """The folder that holds `path`, made with its missing ancestors when needed (as
    `save_pretrained` and `mkdir -p` do). Refused when a file is in the way or the nearest existing
    folder cannot be written, before anything is made."""
    parent = Path(path).resolve().parent
    if parent.is_dir():
        return parent
    q = parent
    while not q.exists() and not q.is_symlink():
        q = q.parent
    if not q.is_dir():
        raise OutputError(
            f"{flag} {str(path)!r}: {str(q)!r} is a file, so the folder {str(parent)!r} cannot "
            "be made: give another path"
        )
    probe_writable(q, f"{flag} {str(path)!r}")
    try:
        parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise OutputError(
            f"{flag} {str(path)!r}: cannot make the folder {str(parent)!r} ({e.strerror or e}): "
            "choose a writable folder"
        ) from e
    return parent


def check_output_dir(path: str | Path, overwrite: bool = False, flag: str = "--output") -> Path:
    """Before any work: `path` is new, an empty folder, or (with `overwrite`) a folder trimprune
    wrote; its parent exists or is made (`make_parent`) and a file can be made there."""
    p = Path(path)
    if p.exists() or p.is_symlink():
        if not p.is_dir():
            if overwrite:
                raise OutputError(
                    f"{flag} {str(path)!r} is a file, not a folder trimprune wrote: --overwrite "
                    "replaces only such folders; remove the file yourself or choose another path"
                )
            raise OutputError(
                f"{flag} {str(path)!r} already exists (a file): choose a new directory"
            )
        if any(p.iterdir()):
            if not overwrite:
                raise OutputError(
                    f"{flag} {str(path)!r} already exists: choose a new directory or add "
                    "--overwrite"
                )
            if trimprune_output(p) is None:
                raise OutputError(
                    f"{flag} {str(path)!r} is not empty and holds no trimprune report "
                    "(report.json): --overwrite replaces only a folder that trimprune wrote; "
                    "empty it yourself or choose another path"
                )
            check_only_written(p, flag)
    probe_writable(make_parent(path, flag), f"{flag} {str(path)!r}")
    return p


def check_output_file(path: str | Path, flag: str) -> Path:
    """Before any work: a file `path` (written or appended to at the end) can be written: not a
    folder, its folder exists or is made (`make_parent`) and a file can be made there, an existing
    file can be opened for appending."""
    p = Path(path)
    if p.is_dir():
        raise OutputError(
            f"{flag} {str(path)!r} is a folder: give a file name, e.g. {str(p / 'out.json')!r}"
        )
    probe_writable(make_parent(path, flag), f"{flag} {str(path)!r}")
    if p.exists():
        try:
            with open(p, "a") as f:
                if _is_device(p) and not f.isatty():  # /dev/full: a write tells, not the open
                    f.write("\n")
                    f.flush()
        except OSError as e:
            raise OutputError(
                f"{flag} {str(path)!r} cannot be written ({e.strerror or e}): choose another file"
            ) from e
    return p


def _is_device(p: Path) -> bool:
    import stat

    try:
        return stat.S_ISCHR(p.stat().st_mode)
    except OSError:
        return False


def check_folder_writable(path: str | Path, flag: str) -> None:
    """Before any work: a folder that is made when needed (`--checkpoint-dir`, `--alpha-cache-dir`)
    is a folder, or can be made: its nearest existing ancestor is a writable folder."""
    p = Path(path).resolve()
    if p.exists() and not p.is_dir():
        raise OutputError(f"{flag} {str(path)!r} is a file: give a folder")
    q = p
    while not q.exists():
        q = q.parent
    if not q.is_dir():
        raise OutputError(
            f"{flag} {str(path)!r}: {str(q)!r} is a file, so the folder cannot be made: give "
            "another path"
        )
    probe_writable(q, f"{flag} {str(path)!r}")


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OverflowError, ValueError):
        return True
    return True


def partial_outputs(path: str | Path) -> list[Path]:
    """The temporary folders beside `path` left by runs that were killed while writing it (their
    process is gone): `.NAME.tmp-PID-*` (the output being written) and `.NAME.old-PID-*` (the
    previous output being replaced)."""
    p = Path(path).resolve()
    if not p.parent.is_dir():
        return []
    out = []
    for tag in (TMP_TAG, OLD_TAG):
        prefix = f".{p.name}.{tag}-"
        for x in sorted(p.parent.iterdir()):
            if not x.name.startswith(prefix) or not x.is_dir() or x.is_symlink():
                continue
            pid = x.name[len(prefix) :].split("-", 1)[0]
            if not pid.isdigit() or not _pid_alive(int(pid)) or int(pid) == os.getpid():
                out.append(x)
    return out


def _size(folder: Path) -> int:
    total = 0
    for root, _, files in os.walk(folder):
        for f in files:
            with contextlib.suppress(OSError):
                total += os.lstat(os.path.join(root, f)).st_size
    return total


def _human(n: int) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1000 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return f"{n:.1f} TB"


def handle_partial_outputs(path: str | Path, remove: bool, flag: str = "--output") -> str | None:
    """What to say about the partial outputs of killed runs beside `path` (None: there are none);
    with `remove` (--overwrite) they are deleted first."""
    stale = partial_outputs(path)
    if not stale:
        return None
    names = ", ".join(x.name for x in stale[:3]) + (
        f" and {len(stale) - 3} more" if len(stale) > 3 else ""
    )
    size = _human(sum(_size(x) for x in stale))
    if remove:
        for x in stale:
            shutil.rmtree(x, ignore_errors=True)
        return (
            f"removed the partial output of an interrupted run beside {flag} {str(path)!r}: "
            f"{names} ({size})"
        )
    return (
        f"a run writing {flag} {str(path)!r} was interrupted and left {names} ({size}) beside "
        "it: delete it, or add --overwrite to have it removed"
    )


class StagedDir:
    """An output folder written over time: a temporary folder next to `path` (`tmp`) that `commit`
    renames to `path` (replacing an existing one only with `overwrite`, and only a folder trimprune
    wrote) and `discard` deletes (leaving the context discards it unless committed). No half-written
    `path` ever. The temporary folder's name holds this process's id, so a run killed meanwhile is
    recognised later (`partial_outputs`); any Python-level exit (an exception, KeyboardInterrupt,
    SystemExit) discards it."""

    def __init__(self, path: str | Path, overwrite: bool = False, flag: str = "--output"):
        self.path = check_output_dir(path, overwrite, flag)
        parent = self.path.resolve().parent
        try:
            self.tmp = Path(
                tempfile.mkdtemp(prefix=f".{self.path.name}.{TMP_TAG}-{os.getpid()}-", dir=parent)
            )
        except OSError as e:
            raise OutputError(
                f"{flag} {str(path)!r}: cannot write into {str(parent)!r} ({e.strerror or e}): "
                "choose a writable folder"
            ) from e
        self.committed = False

    def commit(self) -> None:
        p, tmp = self.path, self.tmp
        parent = p.resolve().parent
        _normal_permissions(tmp)
        if p.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{p.name}.{OLD_TAG}-{os.getpid()}-", dir=parent))
            os.replace(p, old / p.name)
            try:
                os.replace(tmp, p)
            except BaseException:
                os.replace(old / p.name, p)  # the previous output back in place
                shutil.rmtree(old, ignore_errors=True)
                raise
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, p)
        self.committed = True

    def discard(self) -> None:
        if not self.committed:
            shutil.rmtree(self.tmp, ignore_errors=True)

    def __enter__(self) -> StagedDir:
        return self

    def __exit__(self, *exc) -> None:
        self.discard()


@contextlib.contextmanager
def atomic_dir(
    path: str | Path,
    overwrite: bool = False,
    staged: StagedDir | None = None,
    flag: str = "--output",
):
    """Yield a temporary directory next to `path` (`staged.tmp` when given: a folder written
    earlier); on success rename it to `path` (replacing an existing one only with `overwrite`, and
    only a folder trimprune wrote), on any failure or Python-level exit delete it. No half-written
    `path` ever."""
    staged = staged if staged is not None else StagedDir(path, overwrite, flag)
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


def save_masks(
    path: str | Path,
    masks: dict[str, torch.Tensor],
    shapes: dict[str, list[int]],
    fused: dict[str, FusedSlot] | None = None,
) -> None:
    """`fused`: the experts' projections (`core.moe.fused_parameter`), recorded in the metadata so
    that `load_masks(path, fused=True)` maps their masks onto the fused parameters."""
    meta = {
        "format": MASKS_FORMAT,
        "bit_order": "big (numpy.packbits)",
        "meaning": "bit 1 = weight pruned",
        "layout": "row-major (out_features, in_features)",
        "shapes": json.dumps(shapes),
    }
    if fused:
        meta["fused"] = json.dumps({k: v.to_json() for k, v in fused.items()})
    save_tensors({k: v.contiguous() for k, v in masks.items()}, path, meta)


def load_masks(path: str | Path, fused: bool = False) -> dict[str, torch.Tensor]:
    """Read masks.safetensors back into bool tensors (True = pruned), one per pruned linear
    ((out_features, in_features), keyed by the linear's name; a MoE's experts as
    ``...mlp.experts.3.up_proj``). With `fused`, the experts' masks are folded into one mask per
    fused parameter, keyed by its state-dict name (``...mlp.experts.gate_up_proj``) and laid out as
    transformers stores it (`core.moe.fused_masks`); the other masks are as without."""
    from safetensors import safe_open

    from trimprune.io.integrity import check_safetensors_file

    check_safetensors_file(path, "rerun the prune that wrote it, or restore it from a copy")
    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata() or {}
    if meta.get("format") != MASKS_FORMAT:
        raise TrimpruneError(
            f"{path} is not a trimprune masks file (format {meta.get('format')!r})"
        )
    shapes = json.loads(meta["shapes"])
    packed = load_file(str(path))
    masks = {k: unpack_mask(v, shapes[k]) for k, v in packed.items()}
    if not fused:
        return masks
    slots = {k: FusedSlot.from_json(v) for k, v in json.loads(meta.get("fused", "{}")).items()}
    return fused_masks(masks, slots)


SAVE_FORMATS = ("dense", "compact")


def save_model_dir(
    out: Path,
    model,
    tokenizer,
    save_format: str = "dense",
    sparse: set[str] = frozenset(),
    storage: DiskBlocks | None = None,
    source: ModelSource | None = None,
) -> None:
    """A Hugging Face model directory ("dense"), or a compact one whose parameters named in `sparse`
    are stored as bitmask + values (`compact.py`). `storage`, `source`: the `LoadedModel`'s (an
    offload="disk" model's blocks; where the model came from)."""
    check_finite_model(model)
    cfg = model.config
    if getattr(cfg, "quantization_config", None) is not None:
        with contextlib.suppress(AttributeError):
            del cfg.quantization_config
    if getattr(model, "hf_quantizer", None) is not None and getattr(source, "gguf_file", None):
        model.hf_quantizer = None  # GGUF weights were de-quantised on load: the model is dense
    if save_format == "compact":
        save_compact(out, model, tokenizer, set(sparse))
        return
    if storage is not None:  # --offload disk: the blocks' shards are in `out` already
        storage.finish(tokenizer)
        return
    model.save_pretrained(str(out), safe_serialization=True)
    if tokenizer is not None:
        tokenizer.save_pretrained(str(out))


def check_finite_model(model) -> None:
    """Nothing non-finite is written: every parameter (norm weights included) is checked before a
    model folder is saved (prune, compact or dense, and `trimprune export`)."""
    from trimprune.core.finite import describe, nonfinite_parameters
    from trimprune.errors import NonFiniteError

    bad = nonfinite_parameters(model)
    if bad:
        raise NonFiniteError(
            f"the model to be written holds non-finite weights ({describe(bad)}): nothing was "
            "written; check the input model or the prune's output it came from"
        )


def pruned_parameters(model, linear_names) -> set[str]:
    """The state-dict names of the weights of the pruned linears (for a MoE's experts: their
    fused parameters)."""
    modules = dict(model.named_modules())
    out = {f"{n}.weight" for n in linear_names if n in modules}
    return out | {s.parameter for s in expert_slots(model, linear_names).values()}


def expert_slots(model, linear_names) -> dict[str, FusedSlot]:
    """The fused parameter of each of `linear_names` that is an expert's projection."""
    slots = ((n, fused_parameter(model, n)) for n in linear_names if ".experts." in n)
    return {n: s for n, s in slots if s is not None}


def write_outputs(
    path: str | Path,
    model,
    tokenizer,
    result,
    report: dict,
    report_md=None,
    overwrite: bool = False,
    save_model: bool = True,
    save_format: str = "dense",
    staged: StagedDir | None = None,
    storage: DiskBlocks | None = None,
    source: ModelSource | None = None,
) -> Path:
    """The output folder: model (dense or compact), masks, allocation, plots, report.json and
    report.md (`report_md(report)` renders the Markdown once the plots are known). `staged`: the
    temporary folder written since the prune started (`--offload disk`: the blocks' shards, which
    `storage`, the `LoadedModel.storage`, wrote), completed and committed here. `source`: the
    `LoadedModel.source` (a GGUF model's quantizer is dropped: its weights were de-quantised)."""
    from trimprune.io import plots

    with atomic_dir(path, overwrite, staged) as tmp:
        if save_model:
            save_model_dir(
                tmp,
                model,
                tokenizer,
                save_format,
                pruned_parameters(model, result.layers),
                storage,
                source,
            )
        elif storage is not None:
            storage.discard()
        shapes = {k: list(r.shape) for k, r in result.layers.items()}
        save_masks(
            tmp / "masks.safetensors", result.masks, shapes, expert_slots(model, result.layers)
        )
        result.allocation.save(tmp / "allocation.json")
        if report and plots.available():
            rows = (
                plots.row_sparsities(result.masks, shapes) if report.get("trim_summary") else None
            )
            report["plots"] = [f"plots/{n}" for n in plots.write_plots(tmp / "plots", report, rows)]
        elif report:
            report["notes"].append(
                "no plots: matplotlib is not installed (pip install 'trimprune[report]')"
            )
        (tmp / "report.json").write_text(json.dumps(report, indent=1, default=_json_default))
        if report_md is not None:
            (tmp / "report.md").write_text(report_md(report) if callable(report_md) else report_md)
        write_files_list(tmp)
    if save_model and storage is not None:
        storage.moved_to(path)  # the pruned blocks are read from the committed folder now
    return Path(path)


def write_export_marker(folder: Path, source: str | Path) -> None:
    """The file that marks a `trimprune export` folder (so that a later --overwrite may replace
    it)."""
    (folder / EXPORT_MARKER).write_text(
        json.dumps({"format": EXPORT_FORMAT, "source": str(source)}, indent=1) + "\n"
    )
    write_files_list(folder)


def write_text_atomic(path: str | Path, text: str) -> None:
    """Write a file through a temporary file in the same folder, renamed into place."""
    p = Path(path)
    if not p.resolve().parent.exists():
        raise OutputError(
            f"--output {str(path)!r}: folder {str(p.resolve().parent)!r} does not exist"
        )
    if p.is_dir():
        raise OutputError(f"--output {str(path)!r} is a folder: give a file name")
    try:
        fd, tmp = tempfile.mkstemp(prefix=f".{p.name}.tmp-", dir=p.resolve().parent)
    except OSError as e:
        raise OutputError(
            f"--output {str(path)!r}: cannot write into {str(p.resolve().parent)!r} "
            f"({e.strerror or e}): choose a writable folder"
        ) from e
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp makes it private (0600)
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


# ------------------------------------------------------------------------------ what was written
def _files_under(folder: Path) -> list[str]:
    return sorted(f.relative_to(folder).as_posix() for f in folder.rglob("*") if not f.is_dir())


def write_files_list(folder: Path) -> None:
    """`FILES_LIST`: the files trimprune wrote into `folder` (relative paths), so that a later
    --overwrite replaces only those."""
    files = [f for f in _files_under(folder) if f != FILES_LIST]
    (folder / FILES_LIST).write_text(
        json.dumps({"format": FILES_FORMAT, "files": files}, indent=1) + "\n"
    )


def written_files(folder: Path) -> set[str] | None:
    """The files trimprune lists as written into `folder`, or None (an older output: no list)."""
    try:
        d = json.loads((folder / FILES_LIST).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    if not isinstance(d, dict) or d.get("format") != FILES_FORMAT:
        return None
    return {str(f) for f in d.get("files", [])}


def check_only_written(folder: Path, flag: str) -> None:
    """--overwrite replaces a folder only when it holds nothing but what trimprune wrote there."""
    listed = written_files(folder)
    if listed is None:
        return
    extra = [f for f in _files_under(folder) if f not in listed and f not in LATER_FILES]
    if extra:
        more = f" and {len(extra) - 3} more" if len(extra) > 3 else ""
        raise OutputError(
            f"{flag} {str(folder)!r} holds files trimprune did not write ({', '.join(extra[:3])}"
            f"{more}): --overwrite would delete them; move them out or choose another path"
        )


# ------------------------------------------------------------------------------ locks
_LOCKS: dict[Path, int] = {}  # lock file -> the pid written into it


def lock_path(path: str | Path) -> Path:
    p = Path(path).resolve()
    return p.with_name(p.name + ".lock")


def acquire_output_lock(path: str | Path, flag: str = "--output") -> Path:
    """An exclusive lock beside the output (`<output>.lock`, created with O_EXCL, holding this
    process's id): a second run writing the same output is refused. A lock left by a process that
    is gone (or by this one) is taken over. `release_output_locks` (and the exit) removes it."""
    import atexit

    lock = lock_path(path)
    if os.environ.get("RANK", "0").strip() not in ("", "0"):
        return lock  # under torchrun rank 0 writes the outputs and holds their lock
    for _ in range(3):
        try:
            fd = os.open(lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            try:
                pid = int(lock.read_text().strip() or "0")
            except (OSError, ValueError):
                pid = 0
            if pid > 0 and pid != os.getpid() and _pid_alive(pid):
                raise OutputError(
                    f"{flag} {str(path)!r} is being written by another run (process {pid}, lock "
                    f"file {str(lock)!r}): wait for it to finish or choose another path"
                ) from None
            with contextlib.suppress(FileNotFoundError):
                os.unlink(lock)  # a stale lock: its process is gone
            continue
        except OSError as e:
            raise OutputError(
                f"{flag} {str(path)!r}: cannot create the lock file {str(lock)!r} "
                f"({e.strerror or e}): choose a writable folder"
            ) from e
        with os.fdopen(fd, "w") as f:
            f.write(f"{os.getpid()}\n")
        if not _LOCKS:
            atexit.register(release_output_locks)
        _LOCKS[lock] = os.getpid()
        return lock
    raise OutputError(f"{flag} {str(path)!r}: the lock file {str(lock)!r} keeps changing: retry")


def release_output_locks() -> None:
    """Remove the lock files this process holds."""
    for lock, pid in list(_LOCKS.items()):
        if pid == os.getpid():
            try:
                if lock.read_text().strip() == str(pid):
                    os.unlink(lock)
            except OSError:
                pass
        _LOCKS.pop(lock, None)


# ------------------------------------------------------------------------------ output location
NAME_BYTES = 255  # a file name component (most file systems)
NAME_ROOM = 32  # the temporary names beside the output add ".", ".tmp-PID-XXXXXXXX" and ".lock"


def check_output_location(path: str | Path, model: str | None, flag: str = "--output") -> None:
    """Before the model loads: `path` is not the working folder (or above it), not the model's
    folder nor a folder holding it, and its names fit the file system (255 bytes each, less room
    for the temporary names made beside it)."""
    p = Path(path)
    for part in p.parts:
        n = len(os.fsencode(part))
        if n > NAME_BYTES:
            raise OutputError(
                f"{flag}: the name {part[:40]!r}... is {n} bytes, above the file system's "
                f"{NAME_BYTES}: give a shorter name"
            )
    n = len(os.fsencode(p.name))
    if n > NAME_BYTES - NAME_ROOM:
        raise OutputError(
            f"{flag}: the name {p.name[:40]!r}... is {n} bytes; trimprune writes beside it "
            f"under names {NAME_ROOM} bytes longer, so give at most {NAME_BYTES - NAME_ROOM} bytes"
        )
    out, cwd = p.resolve(), Path.cwd().resolve()
    if out == cwd or out in cwd.parents:
        raise OutputError(
            f"{flag} {str(path)!r} is the working folder{'' if out == cwd else ' or above it'}: "
            f"give a new folder for the output, e.g. {flag} ./pruned"
        )
    if model and Path(model).exists():
        m = Path(model).resolve()
        folder = m if m.is_dir() else m.parent
        if out == folder or out in folder.parents:
            raise OutputError(
                f"{flag} {str(path)!r} is the model's folder or holds it ({str(model)!r}): "
                "give a new folder for the output"
            )


def model_bytes(model: str | None) -> int | None:
    """The model's weight bytes from its files when it is a local folder or file (safetensors,
    .bin, .gguf sizes), else None."""
    if not model or not Path(model).exists():
        return None
    m = Path(model)
    if m.is_file():
        return m.stat().st_size
    files = [f for f in m.iterdir() if f.suffix in (".safetensors", ".bin", ".gguf")]
    return sum(f.stat().st_size for f in files if f.is_file()) or None


def check_free_space(path: str | Path, need: int | None, flag: str = "--output") -> None:
    """The file system of `path` has at least `need` bytes free (None: unknown, not checked)."""
    if not need:
        return
    parent = Path(path).resolve().parent
    while not parent.exists():
        parent = parent.parent
    try:
        free = shutil.disk_usage(parent).free
    except OSError:
        return
    if free < need:
        raise OutputError(
            f"{flag} {str(path)!r}: the output needs about {_human(need)} but only {_human(free)} "
            f"is free in {str(parent)!r}: free space or choose another disk"
        )
