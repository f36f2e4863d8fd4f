"""The sha256 manifest of the resume state (`--checkpoint-dir` / `--resume`, `io.resume`).

The resume state's state.json is its manifest: besides the committed state it records, under
`files`, the size and sha256 of every file it names (block tensors, block records, the streams, the
allocation), and under `state_sha256` the sha256 of its own bytes (with that value written as 64
zeros). `seal` fills `files` before each commit (a file is hashed once, right after it was written,
while it is still in the page cache); `sealed_writer` writes state.json with its own hash.

On `--resume`, before anything is restored: `check_state` verifies state.json's bytes
(`read_state`), and `verify_files` every file it names, the size first (a truncated file), then the
sha256. Any difference is a `CorruptFileError` naming the file and its block, with the fix: remove
the folder and start afresh. The hashes `verify_files` computed are remembered in the process for
files whose size, modification time and inode have not changed (the command line verifies before its
dense evaluation and `prune` again when it opens the resume state).
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from collections.abc import Callable
from pathlib import Path

from trimprune.errors import CorruptFileError

FILES = "files"  # state.json: file name -> {"bytes": n, "sha256": hex}
SELF = "state_sha256"  # state.json: the sha256 of its own bytes, this value written as zeros
_ZERO = "0" * 64
FIX = (
    "remove the folder to start afresh (without {resume}, or with {resume} in an empty "
    "{checkpoint_dir})"
)
_CHUNK = 1 << 22

_verified: dict[
    tuple, str
] = {}  # (path, size, mtime_ns, ino) -> sha256, of files verify_files hashed


def digest(path: str | Path) -> dict:
    """{"bytes": size, "sha256": hex} of a file."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        size = os.fstat(f.fileno()).st_size
        while chunk := f.read(_CHUNK):
            h.update(chunk)
    return {"bytes": size, "sha256": h.hexdigest()}


def seal(folder: Path, state: dict, names: list[str]) -> None:
    """state[FILES]: the size and sha256 of every file in `names` (the files the state names); a
    file already recorded keeps its entry (the resume state writes each file name once)."""
    old = state.get(FILES) or {}
    state[FILES] = {n: old[n] if n in old else digest(folder / n) for n in names}


def sealed_text(state: dict, default=None) -> str:
    """state.json's text: `state` (indented JSON) with `SELF` last, the sha256 of the text with it
    zeroed."""
    body = {k: v for k, v in state.items() if k != SELF}
    body[SELF] = _ZERO
    text = json.dumps(body, indent=1, default=default)
    token = f'"{SELF}": "{_ZERO}"'
    i = text.rfind(token)
    own = hashlib.sha256(text.encode()).hexdigest()
    return text[:i] + f'"{SELF}": "{own}"' + text[i + len(token) :]


def sealed_writer(state: dict) -> Callable[[str], None]:
    """The writer of state.json for `io.resume._write_atomic` (the commit stays atomic)."""
    from trimprune.io.export import _json_default

    text = sealed_text(state, _json_default)

    def write(path: str) -> None:
        with open(path, "w") as f:
            f.write(text)

    return write


def _block_note(state: dict) -> str:
    last = state.get("last_block") if isinstance(state, dict) else None
    return (
        f"the commit of block {last}"
        if isinstance(last, int) and last >= 0
        else "the commit before block 0"
    )


def check_state(path: Path, state, fmt: str) -> None:
    """state.json (at `path`, parsed: `state`) has the sha256 it records. A state of another format
    (no `SELF`) is left to the format check that follows."""
    if not isinstance(state, dict):
        return
    stored = state.get(SELF)
    folder = str(path.parent)
    if stored is None:
        if state.get("format") == fmt:
            raise CorruptFileError(
                f"{{checkpoint_dir}} {folder!r}: {path.name} ({_block_note(state)}) is damaged: it "
                f"has no {SELF}, which this trimprune writes: {FIX}",
                path,
            )
        return
    raw = path.read_bytes()
    token = f'"{SELF}": "{stored}"'.encode() if isinstance(stored, str) else None
    i = raw.rfind(token) if token is not None else -1
    own = (
        hashlib.sha256(
            raw[:i] + f'"{SELF}": "{_ZERO}"'.encode() + raw[i + len(token) :]
        ).hexdigest()
        if i >= 0
        else None
    )
    if own != stored:
        raise CorruptFileError(
            f"{{checkpoint_dir}} {folder!r}: {path.name} ({_block_note(state)}) is damaged: its "
            f"bytes do not match the sha256 it records: {FIX}",
            path,
        )


def unreadable_state(path: Path, e: ValueError) -> CorruptFileError:
    """The error for a state.json that is not JSON (or not UTF-8): cut or damaged."""
    why = str(e).splitlines()[0][:120] if str(e) else type(e).__name__
    return CorruptFileError(
        f"{{checkpoint_dir}} {str(path.parent)!r}: {path.name} (the commit of the last finished "
        f"block) is damaged: it is not JSON ({why}): {FIX}",
        path,
    )


def describe(name: str, state: dict) -> str:
    """What a resume-state file holds, naming its block."""
    for entry in state.get("blocks", []):
        if name == entry.get("tensors"):
            return f"block {entry.get('block')}'s pruned weights and masks"
        if name == entry.get("records"):
            return f"block {entry.get('block')}'s records"
    m = re.fullmatch(r"streams\.block(\d+)\.rank(\d+)\.safetensors", name)
    if m:
        return (
            f"the hidden states entering block {int(m.group(1)) + 1}, written after block "
            f"{int(m.group(1))}"
        )
    if name == state.get("allocation"):
        return "the allocation, written before block 0"
    return "a file of the resume state"


def verify_files(folder: Path, state: dict, names: list[str]) -> None:
    """Every file in `names` exists and has the size and sha256 state.json records (`FILES`)."""
    recorded = state.get(FILES)
    if not isinstance(recorded, dict):
        raise CorruptFileError(
            f"{{resume}}: state.json in {str(folder)!r} ({_block_note(state)}) records no sha256 "
            f"of its files: {FIX}",
            folder / "state.json",
        )
    for name in names:
        p = folder / name
        where = f"{{resume}}: {name} in {str(folder)!r} ({describe(name, state)})"
        want = recorded.get(name)
        if (
            not isinstance(want, dict)
            or not isinstance(want.get("sha256"), str)
            or not _is_int(want.get("bytes"))
        ):
            raise CorruptFileError(f"{where} has no sha256 in state.json: {FIX}", p)
        try:
            st = p.stat()
        except OSError:
            raise CorruptFileError(f"{where} is missing: {FIX}", p) from None
        if st.st_size != want["bytes"]:
            raise CorruptFileError(
                f"{where} is damaged: it is {st.st_size} bytes, state.json records {want['bytes']}"
                f"{' (truncated)' if st.st_size < want['bytes'] else ''}: {FIX}",
                p,
            )
        key = (str(p.resolve()), st.st_size, st.st_mtime_ns, st.st_ino)
        sha = _verified.get(key) or digest(p)["sha256"]
        if sha != want["sha256"]:
            raise CorruptFileError(
                f"{where} is damaged: its sha256 {sha[:12]}... differs from the "
                f"{want['sha256'][:12]}... state.json records: {FIX}",
                p,
            )
        _verified[key] = sha


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)
