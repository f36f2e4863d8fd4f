"""Structural checks of the weight files trimprune reads, before anything trusts them.

A truncated or damaged file must end in one line (`CorruptFileError`, exit 2) before any expensive
work, not in a `struct.error` or `SafetensorError` traceback from the library that reads it later.
Both checks read only the file's header (no tensor data), with every read bounds-checked against the
file's size; they take milliseconds (SmolLM2-135M's GGUF, whose header holds a 49k-token vocabulary:
about 50 ms).

`check_gguf_file(path)`: the GGUF layout (github.com/ggml-org/ggml, docs/gguf.md), read by this
module's own reader (not the `gguf` package's, which trusts the counts it reads):

    magic "GGUF", version (2 or 3, little-endian), tensor count, key-value count (each no more than
    the file's bytes can hold), every key-value pair (key, value type, value; arrays of any type)
    and every tensor-info entry (name, dimensions, ggml type, offset) inside the file;
    general.alignment (a power of two; 32 when absent); every tensor's data (offset from the data
    section, which starts at the header's end rounded up to the alignment; size from its type's
    block size and bytes per block, and its shape) aligned, inside the file, and not overlapping
    another's.

`check_safetensors_file(path)`: the 8-byte little-endian header length inside the file (at most 100
MB, safetensors' own limit), a JSON object as the header, every tensor with a known dtype, a shape
of non-negative integers and data_offsets [begin, end] whose length is numel x the dtype's size; the
tensors, ordered by offset, tile the data section from 0 without gaps or overlaps, and the data
section is exactly as long as the last tensor's end (safetensors' own rules).

`check_model_folder(folder)`: the safetensors a model folder's loaders read (model.safetensors, the
shards its index lists, a compact model.compact.safetensors).
"""

from __future__ import annotations

import json
import mmap
import os
import struct
from dataclasses import dataclass, field
from pathlib import Path

from trimprune.errors import CorruptFileError

GGUF_FIX = "download the file again (or restore it from its source)"
MODEL_FIX = "download the model again (or restore the folder from its source)"

# -----------------------------------------------------------------------------------------------
# GGUF
GGUF_MAGIC = b"GGUF"
GGUF_VERSIONS = (2, 3)
GGUF_DEFAULT_ALIGNMENT = 32
GGML_MAX_DIMS = 4
_SCALAR_BYTES = {
    0: 1,
    1: 1,
    2: 2,
    3: 2,
    4: 4,
    5: 4,
    6: 4,
    7: 1,
    10: 8,
    11: 8,
    12: 8,
}  # value type -> bytes
_STRING, _ARRAY = 8, 9
_MAX_ARRAY_DEPTH = 8
# ggml tensor type -> (elements per block, bytes per block), as gguf.constants.GGML_QUANT_SIZES
GGML_BLOCKS = {
    0: (1, 4),
    1: (1, 2),
    2: (32, 18),
    3: (32, 20),
    6: (32, 22),
    7: (32, 24),
    8: (32, 34),
    9: (32, 40),
    10: (256, 84),
    11: (256, 110),
    12: (256, 144),
    13: (256, 176),
    14: (256, 210),
    15: (256, 292),
    16: (256, 66),
    17: (256, 74),
    18: (256, 98),
    19: (256, 50),
    20: (32, 18),
    21: (256, 110),
    22: (256, 82),
    23: (256, 136),
    24: (1, 1),
    25: (1, 2),
    26: (1, 4),
    27: (1, 8),
    28: (1, 8),
    29: (256, 56),
    30: (1, 2),
    34: (256, 54),
    35: (256, 66),
    39: (32, 17),
    40: (64, 36),
    41: (128, 18),
}
# the smallest a key-value pair (empty key, u8 value) and a tensor-info entry (empty name, no dims)
# take
_MIN_KV, _MIN_TENSOR = 8 + 4 + 1, 8 + 4 + 4 + 8


class _Bad(Exception):
    """What is wrong with the file (the caller turns it into one `CorruptFileError` line)."""


@dataclass
class GGUFInfo:
    """What the check read: enough to tell a caller the file's layout."""

    version: int
    n_tensors: int
    n_kv: int
    alignment: int
    data_start: int
    file_size: int
    scalars: dict = field(default_factory=dict)  # key -> value of the integer key-value pairs


class _Reader:
    """Little-endian reads from a buffer, each one refused when it would pass the end of the
    file."""

    def __init__(self, buf, size: int):
        self.buf, self.size, self.pos = buf, size, 0

    def need(self, n: int, what: str) -> None:
        if n < 0 or self.pos + n > self.size:
            raise _Bad(
                f"{what} at byte {self.pos} needs {n} bytes, the file ends at byte {self.size} "
                "(truncated?)"
            )

    def skip(self, n: int, what: str) -> None:
        self.need(n, what)
        self.pos += n

    def unpack(self, fmt: str, n: int, what: str):
        self.need(n, what)
        v = struct.unpack_from(fmt, self.buf, self.pos)[0]
        self.pos += n
        return v

    def u32(self, what: str) -> int:
        return self.unpack("<I", 4, what)

    def u64(self, what: str) -> int:
        return self.unpack("<Q", 8, what)

    def string(self, what: str) -> bytes:
        n = self.u64(f"the length of {what}")
        self.need(n, what)
        s = bytes(self.buf[self.pos : self.pos + n])
        self.pos += n
        return s

    def skip_strings(self, count: int, what: str) -> None:
        """`count` strings (u64 length + bytes) in a row: the vocabulary arrays, read without
        copies."""
        unpack, buf, size, pos = struct.unpack_from, self.buf, self.size, self.pos
        for i in range(count):
            if pos + 8 > size:
                self.pos = pos
                raise _Bad(
                    f"{what} item {i} at byte {pos} runs past the end of the file at byte {size} "
                    "(truncated?)"
                )
            n = unpack("<Q", buf, pos)[0]
            pos += 8 + n
            if pos > size:
                self.pos = pos - n
                raise _Bad(
                    f"{what} item {i} ({n} bytes) runs past the end of the file at byte {size} "
                    "(truncated?)"
                )
        self.pos = pos


def _skip_value(r: _Reader, vtype: int, what: str, depth: int = 0):
    """Read past one value of type `vtype`; an integer scalar is returned (the others: None)."""
    if vtype in _SCALAR_BYTES:
        n = _SCALAR_BYTES[vtype]
        if vtype in (0, 1, 2, 3, 4, 5, 10, 11):
            fmt = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 10: "<Q", 11: "<q"}[vtype]
            return r.unpack(fmt, n, what)
        r.skip(n, what)
        return None
    if vtype == _STRING:
        r.string(what)
        return None
    if vtype == _ARRAY:
        if depth >= _MAX_ARRAY_DEPTH:
            raise _Bad(f"{what} nests arrays more than {_MAX_ARRAY_DEPTH} deep")
        itype = r.u32(f"the item type of {what}")
        count = r.u64(f"the length of {what}")
        left = r.size - r.pos
        if itype in _SCALAR_BYTES:
            if count * _SCALAR_BYTES[itype] > left:
                raise _Bad(
                    f"{what} claims {count} items of {_SCALAR_BYTES[itype]} bytes, more than the "
                    f"{left} bytes left in the file (truncated?)"
                )
            r.skip(count * _SCALAR_BYTES[itype], what)
        elif itype == _STRING:
            if count * 8 > left:
                raise _Bad(
                    f"{what} claims {count} strings, more than the {left} bytes left in the file "
                    "can hold"
                )
            r.skip_strings(count, what)
        elif itype == _ARRAY:
            if count * 12 > left:
                raise _Bad(
                    f"{what} claims {count} arrays, more than the {left} bytes left in the file "
                    "can hold"
                )
            for i in range(count):
                _skip_value(r, _ARRAY, f"{what} item {i}", depth + 1)
        else:
            raise _Bad(f"{what} has items of unknown type {itype}")
        return None
    raise _Bad(f"{what} has unknown value type {vtype}")


def _name(raw: bytes, what: str) -> str:
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        raise _Bad(f"{what} is not UTF-8 ({raw[:40]!r})") from None


def _read_gguf(buf, size: int) -> GGUFInfo:
    r = _Reader(buf, size)
    if size < 4 or bytes(buf[:4]) != GGUF_MAGIC:
        raise _Bad("no GGUF magic bytes")
    r.pos = 4
    version = r.u32("the version")
    if version not in GGUF_VERSIONS:
        swapped = int.from_bytes(version.to_bytes(4, "little"), "big")
        if swapped in GGUF_VERSIONS:
            raise _Bad(f"it is a big-endian GGUF (version {swapped}), which cannot be read here")
        raise _Bad(f"version {version} (readable: {', '.join(map(str, GGUF_VERSIONS))})")
    n_tensors = r.u64("the tensor count")
    n_kv = r.u64("the key-value count")
    room = size - r.pos
    if n_kv * _MIN_KV > room:
        raise _Bad(
            f"its key-value count {n_kv} is more than the file's {size} bytes can hold "
            "(truncated, or a damaged count)"
        )
    if n_tensors * _MIN_TENSOR > room:
        raise _Bad(
            f"its tensor count {n_tensors} is more than the file's {size} bytes can hold "
            "(truncated, or a damaged count)"
        )
    alignment, scalars = _read_key_values(r, n_kv)
    tensors, names = [], set()
    for i in range(n_tensors):
        name = _name(r.string(f"tensor-info entry {i}'s name"), f"tensor-info entry {i}'s name")
        what = f"tensor {name!r} (tensor-info entry {i} of {n_tensors})"
        if name in names:
            raise _Bad(f"tensor name {name!r} appears twice (tensor-info entry {i})")
        names.add(name)
        n_dims = r.u32(f"the dimension count of {what}")
        if n_dims > GGML_MAX_DIMS:
            raise _Bad(f"{what} has {n_dims} dimensions (at most {GGML_MAX_DIMS})")
        dims = [r.u64(f"dimension {d} of {what}") for d in range(n_dims)]
        ttype = r.u32(f"the type of {what}")
        offset = r.u64(f"the data offset of {what}")
        if ttype not in GGML_BLOCKS:
            raise _Bad(f"{what} has unknown tensor type {ttype}")
        block, block_bytes = GGML_BLOCKS[ttype]
        numel = 1
        for d in dims:
            numel *= d
        if dims and dims[0] % block:
            raise _Bad(
                f"{what}: its first dimension {dims[0]} is not a multiple of its type's block of "
                f"{block}"
            )
        nbytes = numel // block * block_bytes
        tensors.append((offset, nbytes, what))
    data_start = -(-r.pos // alignment) * alignment
    end_of_prev, prev = 0, None
    for offset, nbytes, what in sorted(tensors):
        if offset % alignment:
            raise _Bad(
                f"{what}: its data offset {offset} is not a multiple of the alignment {alignment}"
            )
        if data_start + offset + nbytes > size:
            raise _Bad(
                f"{what}: its data (bytes {data_start + offset}..{data_start + offset + nbytes}) "
                f"runs past the end of the file at byte {size} (truncated?)"
            )
        if offset < end_of_prev:
            raise _Bad(
                f"{what}: its data (from offset {offset}) overlaps {prev}'s (up to offset "
                f"{end_of_prev})"
            )
        end_of_prev, prev = offset + nbytes, what
    return GGUFInfo(version, n_tensors, n_kv, alignment, data_start, size, scalars)


def _read_key_values(r: _Reader, n_kv: int) -> tuple[int, dict]:
    alignment, scalars, keys = GGUF_DEFAULT_ALIGNMENT, {}, set()
    for i in range(n_kv):
        key = _name(r.string(f"key-value pair {i}'s key"), f"key-value pair {i}'s key")
        what = f"the value of {key!r} (key-value pair {i} of {n_kv})"
        if key in keys:
            raise _Bad(f"key {key!r} appears twice (key-value pair {i})")
        keys.add(key)
        vtype = r.u32(f"the type of {what}")
        value = _skip_value(r, vtype, what)
        if value is not None:
            scalars[key] = value
        if key == "general.alignment":
            if vtype != 4 or not value or value & (value - 1):
                raise _Bad(
                    f"general.alignment is {value!r} (type {vtype}), not a power of two stored as "
                    "uint32"
                )
            alignment = value
    return alignment, scalars


def check_gguf_file(path: str | Path, fix: str = GGUF_FIX) -> GGUFInfo:
    """The GGUF file at `path` is whole (module docstring); its layout, or `CorruptFileError` naming
    the file, what is wrong and `fix`."""
    p = Path(path)
    try:
        with open(p, "rb") as f:
            size = os.fstat(f.fileno()).st_size
            if size == 0:
                raise _Bad("it is empty")
            with mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as mm:
                return _read_gguf(mm, size)
    except _Bad as e:
        raise CorruptFileError(
            f"GGUF file {str(p)!r} is damaged or truncated: {e}: {fix}", p
        ) from None
    except OSError as e:
        raise CorruptFileError(
            f"GGUF file {str(p)!r} cannot be read ({e.strerror or e}): check the path and its "
            "permissions",
            p,
        ) from None


# -----------------------------------------------------------------------------------------------
# safetensors
SAFETENSORS_MAX_HEADER = 100_000_000
# dtype -> bits per element (safetensors 0.8's list)
SAFETENSORS_BITS = {
    "BOOL": 8,
    "F4": 4,
    "F6_E2M3": 6,
    "F6_E3M2": 6,
    "U8": 8,
    "I8": 8,
    "F8_E5M2": 8,
    "F8_E4M3": 8,
    "F8_E8M0": 8,
    "F8_E4M3FNUZ": 8,
    "F8_E5M2FNUZ": 8,
    "I16": 16,
    "U16": 16,
    "F16": 16,
    "BF16": 16,
    "I32": 32,
    "U32": 32,
    "F32": 32,
    "C64": 64,
    "F64": 64,
    "I64": 64,
    "U64": 64,
}


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _read_safetensors(f, size: int) -> dict:
    if size < 8:
        raise _Bad(f"it is {size} bytes, less than the 8-byte header length")
    n = int.from_bytes(f.read(8), "little")
    if n > SAFETENSORS_MAX_HEADER:
        raise _Bad(
            f"its header length {n} is above safetensors' limit of {SAFETENSORS_MAX_HEADER} bytes"
        )
    if 8 + n > size:
        raise _Bad(
            f"its header ({n} bytes) runs past the end of the file at byte {size} (truncated?)"
        )
    raw = f.read(n)
    try:
        header = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, ValueError) as e:
        raise _Bad(f"its header is not JSON ({str(e)[:80]})") from None
    if not isinstance(header, dict):
        raise _Bad(f"its header is a JSON {type(header).__name__}, not an object")
    meta = header.get("__metadata__")
    if meta is not None and not (
        isinstance(meta, dict) and all(isinstance(v, str) for v in meta.values())
    ):
        raise _Bad("its __metadata__ is not a mapping of strings")
    spans = []
    for name, info in header.items():
        if name == "__metadata__":
            continue
        if not isinstance(info, dict):
            raise _Bad(f"tensor {name!r}'s entry is not an object")
        dtype, shape, offsets = info.get("dtype"), info.get("shape"), info.get("data_offsets")
        if dtype not in SAFETENSORS_BITS:
            raise _Bad(f"tensor {name!r} has unknown dtype {dtype!r}")
        if not isinstance(shape, list) or not all(_is_int(d) and d >= 0 for d in shape):
            raise _Bad(f"tensor {name!r} has shape {shape!r}, not a list of non-negative integers")
        if not (
            isinstance(offsets, list)
            and len(offsets) == 2
            and all(_is_int(o) for o in offsets)
            and 0 <= offsets[0] <= offsets[1]
        ):
            raise _Bad(
                f"tensor {name!r} has data_offsets {offsets!r}, not [begin, end] with 0 <= begin "
                "<= end"
            )
        numel = 1
        for d in shape:
            numel *= d
        bits = numel * SAFETENSORS_BITS[dtype]
        if bits % 8 or bits // 8 != offsets[1] - offsets[0]:
            raise _Bad(
                f"tensor {name!r} ({dtype} {shape}) takes {bits / 8:g} bytes, its data_offsets "
                f"{offsets} hold {offsets[1] - offsets[0]}"
            )
        spans.append((offsets[0], offsets[1], name))
    spans.sort()
    end = 0
    for begin, stop, name in spans:
        if begin != end:
            what = (
                "overlaps the tensor before it" if begin < end else f"leaves a gap after byte {end}"
            )
            raise _Bad(f"tensor {name!r} (data bytes {begin}..{stop}) {what}")
        end = stop
    data = size - 8 - n
    if data != end:
        cut = " (truncated?)" if data < end else ""
        raise _Bad(f"its data section is {data} bytes, its tensors take {end}{cut}")
    return header


def check_safetensors_file(path: str | Path, fix: str = MODEL_FIX) -> dict:
    """The safetensors file at `path` is whole (module docstring); its header, or `CorruptFileError`
    naming the file, what is wrong and `fix`."""
    p = Path(path)
    try:
        with open(p, "rb") as f:
            return _read_safetensors(f, os.fstat(f.fileno()).st_size)
    except _Bad as e:
        raise CorruptFileError(
            f"safetensors file {str(p)!r} is damaged or truncated: {e}: {fix}", p
        ) from None
    except OSError as e:
        raise CorruptFileError(
            f"safetensors file {str(p)!r} cannot be read ({e.strerror or e}): check the path and "
            "its permissions",
            p,
        ) from None


SINGLE, INDEX, COMPACT = (
    "model.safetensors",
    "model.safetensors.index.json",
    "model.compact.safetensors",
)


def model_files(folder: str | Path) -> list[Path]:
    """The safetensors files of a model folder that its loaders read and that exist:
    model.compact.safetensors, model.safetensors, the shards model.safetensors.index.json lists (a
    damaged index: `CorruptFileError`)."""
    folder = Path(folder)
    files = [folder / n for n in (COMPACT, SINGLE) if (folder / n).is_file()]
    if (folder / INDEX).is_file():
        try:
            weight_map = json.loads((folder / INDEX).read_text(encoding="utf-8"))["weight_map"]
            shards = sorted(set(weight_map.values()))
            if not all(isinstance(s, str) for s in shards):
                raise TypeError("a shard name is not a string")
        except (OSError, UnicodeDecodeError, ValueError, KeyError, TypeError, AttributeError) as e:
            raise CorruptFileError(
                f"{str(folder / INDEX)!r} is not a safetensors index ({type(e).__name__}: "
                f"{str(e)[:80]}): {MODEL_FIX}",
                folder / INDEX,
            ) from None
        files += [folder / s for s in shards if (folder / s).is_file() and folder / s not in files]
    return files


def check_model_folder(folder: str | Path, fix: str = MODEL_FIX) -> None:
    """Every safetensors file the folder's loaders read is whole (`model_files`,
    `check_safetensors_file`)."""
    for f in model_files(folder):
        check_safetensors_file(f, fix)
