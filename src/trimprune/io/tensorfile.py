"""safetensors files with the same bytes for the same contents.

`safetensors` writes its `__metadata__` mapping in an order that changes from process to process (a
hash map): two identical runs gave masks files with equal tensors and different bytes.
`save_tensors` writes the file, then rewrites its JSON header with the metadata keys sorted (the
same length, so in place; the tensors' entries and data keep their order, which safetensors already
fixes)."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import save_file


def _canonical_header(raw: bytes) -> bytes:
    header = json.loads(raw)
    meta = header.pop("__metadata__", None)
    out = {} if meta is None else {"__metadata__": dict(sorted(meta.items()))}
    out.update(header)
    return json.dumps(out, separators=(",", ":"), ensure_ascii=False).encode("utf-8")


def canonicalize(path: str | Path) -> None:
    """Rewrite the header of the safetensors file `path` with its metadata keys sorted."""
    with open(path, "r+b") as f:
        n = int.from_bytes(f.read(8), "little")
        new = _canonical_header(f.read(n))
        if len(new) <= n:  # padded with spaces, as safetensors pads its header
            f.seek(8)
            f.write(new + b" " * (n - len(new)))
            return
        data = f.read()  # never seen: a header that grew; rewrite the file
        size = len(new) + (-len(new)) % 8
        f.seek(0)
        f.write(size.to_bytes(8, "little") + new + b" " * (size - len(new)) + data)
        f.truncate()


def save_tensors(
    tensors: dict[str, torch.Tensor], path: str | Path, metadata: dict[str, str] | None = None
) -> None:
    """`safetensors.torch.save_file`, byte-reproducible (sorted metadata)."""
    save_file(tensors, str(path), metadata=metadata)
    canonicalize(path)
