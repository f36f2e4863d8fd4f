"""The `Allocation` record and helpers shared by the allocators."""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from trimprune.errors import InputFileError
from trimprune.limits import check_depth, load_yaml, read_limited


def weighted_mean(values: dict[str, float], numels: dict[str, int]) -> float:
    tot = sum(numels[k] for k in values)
    return sum(values[k] * numels[k] for k in values) / tot


@dataclass
class Allocation:
    method: str
    requested: float
    per_linear: dict[str, float]  # full linear name -> target sparsity
    numels: dict[str, int]
    block_of: dict[str, int]  # full linear name -> block index
    details: dict = field(default_factory=dict)

    @property
    def achieved(self) -> float:
        return weighted_mean(self.per_linear, self.numels)

    def per_block(self) -> list[float]:
        nb = max(self.block_of.values()) + 1
        num = [0.0] * nb
        den = [0] * nb
        for k, s in self.per_linear.items():
            b = self.block_of[k]
            num[b] += s * self.numels[k]
            den[b] += self.numels[k]
        return [n / d if d else 0.0 for n, d in zip(num, den)]

    def to_dict(self) -> dict:
        """The replayable form (`--allocation file:PATH` reads it back)."""
        return {
            "method": self.method,
            "requested_sparsity": self.requested,
            "achieved_sparsity": self.achieved,
            "per_block": self.per_block(),
            "per_linear": dict(self.per_linear),
        }

    def save(self, path: str | Path) -> None:
        p = Path(path)
        d = self.to_dict()
        if p.suffix in (".yaml", ".yml"):
            p.write_text(yaml.safe_dump(d, sort_keys=False))
        else:
            p.write_text(json.dumps(d, indent=1))


def uniform(sparsity: float, numels: dict[str, int], block_of: dict[str, int]) -> Allocation:
    return Allocation("uniform", sparsity, {k: float(sparsity) for k in numels}, numels, block_of)


MEAN_TOLERANCE = 1e-4  # an allocation file's weighted mean may differ from --sparsity by this much


def _sparsity_value(where: str, key, v) -> float:
    if (
        isinstance(v, bool)
        or not isinstance(v, (int, float))
        or not math.isfinite(v)
        or not 0.0 <= v < 1.0
    ):
        shown = repr(v) if len(repr(v)) <= 40 else repr(v)[:37] + "..."
        raise InputFileError(
            f"{where} gives {key} the sparsity {shown}: every value must be a number in [0, 1)"
        )
    return float(v)


def _parse_allocation(text: str, where: str):
    """JSON first (its `5e-1` is the number 0.5, which YAML 1.1 reads as text), else YAML; both
    within the limits of `trimprune.limits` (size, depth before parsing, no YAML aliases)."""
    check_depth(text, where)
    try:
        return json.loads(text)
    except (ValueError, RecursionError):
        pass
    try:
        return load_yaml(text, where)  # YAML is a superset of JSON
    except (yaml.YAMLError, ValueError, TypeError, RecursionError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise InputFileError(f"{where} is not valid JSON/YAML: {first}") from e


def _check_keys(where: str, data: dict) -> None:
    """Mapping keys are block indices in ASCII digits or linear names: a key such as "²" or "٣"
    (a digit outside ASCII) is neither."""
    for k in data:
        if isinstance(k, bool) or not isinstance(k, (str, int)):
            raise InputFileError(
                f"{where} has the key {k!r}: keys must be block indices (0, 1, ...) or linear names"
            )
        t = str(k)
        if any(c.isdigit() and not c.isascii() for c in t) or not t.isascii():
            shown = repr(t) if len(t) <= 40 else repr(t[:37]) + "..."
            raise InputFileError(
                f"{where} has the key {shown}, which is neither a block index in ASCII digits "
                "(0, 1, ...) nor a linear name: rewrite it"
            )


def read_allocation_file(path: str | Path) -> list[float] | dict[str, float]:
    """Before the model loads: the sparsities an allocation file gives, checked for type and range:
    a list (one per block), or a mapping of block index or linear name -> sparsity, optionally under
    a `per_linear` or `per_block` key (what every run writes). JSON or YAML."""
    where = f"{{allocation}} file:{path}"
    p = Path(path)
    if p.is_dir():
        raise InputFileError(
            f"{where} is a folder: give a JSON or YAML file, e.g. a run's allocation.json"
        )
    if not p.is_file():
        raise InputFileError(f"{where} does not exist: give a JSON or YAML file")
    data = _parse_allocation(read_limited(p, where), where)
    if isinstance(data, dict) and "per_linear" in data:
        data = data["per_linear"]
    elif isinstance(data, dict) and "per_block" in data:
        data = data["per_block"]
    if isinstance(data, list) and data:
        return [_sparsity_value(where, f"block {i}", v) for i, v in enumerate(data)]
    if isinstance(data, dict) and data:
        _check_keys(where, data)
        return {str(k): _sparsity_value(where, repr(str(k)), v) for k, v in data.items()}
    kind = "nothing" if data is None or data in ([], {}) else f"a {type(data).__name__}"
    raise InputFileError(
        f"{where} holds {kind}: it must hold a list of block sparsities or a mapping of blocks or "
        "linears to sparsities (e.g. a run's allocation.json)"
    )


def from_file(
    path: str, requested: float | None, numels: dict[str, int], block_of: dict[str, int]
) -> Allocation:
    """Read per-block or per-linear sparsities from JSON/YAML (`read_allocation_file`). Accepted
    shapes: a list (one value per block), a mapping block index -> value, a mapping linear name ->
    value (full names such as ``model.layers.3.mlp.down_proj`` or block-relative
    ``3.mlp.down_proj``), or a mapping with a ``per_linear`` or ``per_block`` key (what every run
    writes). The parameter-weighted mean must equal `requested` within `MEAN_TOLERANCE`; `requested`
    None: the mean is the target (`Allocation.requested`)."""
    data = read_allocation_file(path)
    nblocks = max(block_of.values()) + 1
    per: dict[str, float] = {}
    if isinstance(data, list):
        if len(data) != nblocks:
            raise InputFileError(
                f"{{allocation}} file:{path} lists {len(data)} block sparsities but the model has "
                f"{nblocks} blocks: give one value per block"
            )
        per = {k: data[block_of[k]] for k in numels}
    elif all(k.isascii() and k.isdigit() for k in data):
        missing_blocks = [b for b in range(nblocks) if str(b) not in data]
        if missing_blocks:
            raise InputFileError(
                f"{{allocation}} file:{path} has no sparsity for block {missing_blocks[0]}: "
                f"give every block 0..{nblocks - 1}"
            )
        extra = [k for k in data if int(k) >= nblocks]
        if extra:
            raise InputFileError(
                f"{{allocation}} file:{path} gives block {extra[0]}, but the model has {nblocks} "
                f"blocks (0..{nblocks - 1})"
            )
        per = {k: data[str(block_of[k])] for k in numels}
    else:
        prefix = {}
        for full in numels:
            parts = full.split(".")
            # also accept names relative to the block stack: "<block>.<linear>"
            for i, part in enumerate(parts):
                if part.isdigit() and int(part) == block_of[full]:
                    prefix[".".join(parts[i:])] = full
                    break
        for k, v in data.items():
            target = k if k in numels else prefix.get(k)
            if target is None:
                raise InputFileError(
                    f"{{allocation}} file:{path} names {k!r}, which is not a prunable linear "
                    f"of this model (e.g. {next(iter(numels))})"
                )
            per[target] = v
        missing = [k for k in numels if k not in per]
        if missing:
            raise InputFileError(
                f"{{allocation}} file:{path} has no sparsity for {missing[0]}: give every "
                "prunable linear, or use per-block values"
            )
    mean = weighted_mean(per, numels)
    if requested is not None and abs(mean - requested) > MEAN_TOLERANCE:
        raise InputFileError(
            f"{{allocation}} file:{path} has a parameter-weighted mean sparsity of {mean:.6g}, not "
            f"{{sparsity}} {requested:g} (they differ by more than {MEAN_TOLERANCE:g}): "
            f"give {{sparsity}} {mean:.6g}, or leave {{sparsity}} out to prune to the file's mean"
        )
    details = (
        {}
        if requested is not None
        else {"target": "the file's parameter-weighted mean (no --sparsity given)"}
    )
    return Allocation(
        f"file:{path}", mean if requested is None else requested, per, numels, block_of, details
    )


def clip_to_mean(values, weights, mean: float, lo: float, hi: float, mode: str = "shift"):
    """Clip `values` into [lo, hi] while keeping the `weights`-weighted mean exactly `mean`.

    mode "shift": v + t, clipped (keeps differences, e.g. OWL's +-lambda range);
    mode "scale": c * v, clipped (keeps ratios, e.g. AlphaPruning's multiplicative scaler).
    t or c is found by bisection; the result is the unique monotone adjustment that hits the
    mean."""
    import torch

    v = torch.as_tensor(values, dtype=torch.float64)
    w = torch.as_tensor(weights, dtype=torch.float64)
    w = w / w.sum()

    def f(p):
        x = (v + p) if mode == "shift" else (v * p)
        return x.clamp(lo, hi)

    if mode == "shift":
        a, b = lo - float(v.max()) - 1.0, hi - float(v.min()) + 1.0
    else:
        a, b = 0.0, max(1.0, hi / max(float(v[v > 0].min()) if (v > 0).any() else 1.0, 1e-12)) * 2
    for _ in range(200):
        mid = 0.5 * (a + b)
        if float((f(mid) * w).sum()) < mean:
            a = mid
        else:
            b = mid
    out = f(0.5 * (a + b))
    # remove the last float residue without leaving the bounds
    resid = mean - float((out * w).sum())
    free = (out > lo) & (out < hi)
    if free.any() and resid != 0.0:
        out = torch.where(free, out + resid / float(w[free].sum()), out).clamp(lo, hi)
    return out
