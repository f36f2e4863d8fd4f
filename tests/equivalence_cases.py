"""Behaviour fixtures: digests of what `prune` decides for a fixed set of configurations.

Each case prunes a model (tiny random models of every family, or SmolLM2 on CPU) and digests
  - the masks (names, shapes and the bit-packed bytes, exactly),
  - the per-linear and block-safeguard records: everything but computed floats (learning rates,
    iterations, choices, counts, strings, shapes) as an exact digest, and the computed floats
    themselves (8 significant digits, in sorted-key order), compared with a relative tolerance of
    1e-4 (`compare`), so a different CPU ISA, BLAS build or CUDA cannot fail it on the last bits.
`tests/fixtures/equivalence.json` holds the digests the code produced when they were recorded;
`tests/test_equivalence.py` checks the current code reproduces every one. Re-record after an
intended change of behaviour with

    TRIMPRUNE_DATA=../shared/data python tests/equivalence_cases.py --write [--smollm2]

(`--dump FILE` writes the undigested records with exact floats, for a bit-for-bit diff.)
"""

from __future__ import annotations

import argparse
import hashlib
import itertools
import json
import math
import os
import sys
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
FIXTURE = HERE / "fixtures" / "equivalence.json"

TINY_FAMILIES = [
    "llama",
    "qwen2",
    "mistral",
    "phi3",
    "gemma",
    "gemma2",
    "gemma3",
    "opt",
    "gpt2",
    "gpt_neox",
]
TINY_BASE = {"nsamples": 8, "seqlen": 24}


def tiny_cases() -> dict[str, dict]:
    """families x scorers x TRIM (none / all / last-token) x 50 / 70 %, and the other paths once."""
    out = {}
    for fam, sc, tr, sp in itertools.product(
        TINY_FAMILIES, ["magnitude", "wanda", "sparsegpt"], [None, "all", "last-token"], [0.5, 0.7]
    ):
        flat = dict(TINY_BASE, scorer=sc, sparsity=sp)
        if tr:
            flat.update(trim=True, trim_inputs=tr)
        out[f"tiny/{fam}/{sc}/{tr or 'none'}/{sp}"] = {"family": fam, "config": flat}
    extra = {
        "owl-wanda-trim": dict(scorer="wanda", sparsity=0.7, allocation="owl", trim=True),
        "owl-sparsegpt": dict(scorer="sparsegpt", sparsity=0.6, allocation="owl"),
        "alpha-wanda-trim": dict(
            scorer="wanda",
            sparsity=0.7,
            allocation="alphapruning",
            trim=True,
            alpha_mapping="per_matrix",
        ),
        "alpha-magnitude": dict(
            scorer="magnitude", sparsity=0.6, allocation="alphapruning", alpha_metric="alpha_mid"
        ),
        "nm24-wanda": dict(scorer="wanda", sparsity=0.5, mask_structure="2:4"),
        "nm48-sparsegpt": dict(
            scorer="sparsegpt", sparsity=0.5, mask_structure="4:8", blocksize=16
        ),
        "nm24-magnitude": dict(scorer="magnitude", sparsity=0.5, mask_structure="2:4"),
        "recalc-wanda": dict(scorer="wanda", sparsity=0.6, trim_input_recalc=True),
        "recalc-wanda-trim": dict(scorer="wanda", sparsity=0.7, trim=True, trim_input_recalc=True),
        "recalc-sparsegpt-trim": dict(
            scorer="sparsegpt", sparsity=0.7, trim=True, trim_input_recalc=True
        ),
        "sample64-wanda-trim": dict(
            scorer="wanda", sparsity=0.7, trim=True, trim_inputs="sample:64"
        ),
        "sample64-psnr": dict(
            scorer="wanda",
            sparsity=0.6,
            trim=True,
            trim_inputs="sample:64",
            trim_metric="psnr_dim",
            trim_dim_metric="psnr",
        ),
        "lastok-mae": dict(
            scorer="magnitude", sparsity=0.6, trim=True, trim_inputs="last-token", trim_metric="mae"
        ),
        "parallel-wanda-trim": dict(
            scorer="wanda", sparsity=0.7, trim=True, trim_lr_search="parallel"
        ),
        "parallel-sparsegpt-trim": dict(
            scorer="sparsegpt", sparsity=0.7, trim=True, trim_lr_search="parallel"
        ),
        "parallel-neg": dict(
            scorer="wanda", sparsity=0.5, trim=True, trim_lr_search="parallel", trim_lrs=[0.9, 2.0]
        ),
        "sequential-neg": dict(
            scorer="wanda",
            sparsity=0.5,
            trim=True,
            trim_lr_search="sequential",
            trim_lrs=[0.9, 2.0],
        ),
        "noneg-wanda-trim": dict(scorer="wanda", sparsity=0.6, trim=True, trim_forbid_neg_lr=True),
        "mse-mse": dict(
            scorer="wanda", sparsity=0.6, trim=True, trim_metric="mse", trim_dim_metric="mse"
        ),
        "snr-cosim": dict(scorer="sparsegpt", sparsity=0.6, trim=True, trim_metric="snr"),
        "cosimdim-lasttok": dict(
            scorer="wanda",
            sparsity=0.7,
            trim=True,
            trim_inputs="last-token",
            trim_metric="cosim_dim",
        ),
        "no-safeguards": dict(scorer="wanda", sparsity=0.7, trim=True, trim_safeguard=False),
        "no-block-safeguard": dict(
            scorer="magnitude", sparsity=0.7, trim=True, trim_block_safeguard=False
        ),
        "iters3-cap08": dict(
            scorer="wanda", sparsity=0.6, trim=True, trim_iterations=3, trim_max_row_sparsity=0.8
        ),
        "batch3-sparsegpt": dict(
            scorer="sparsegpt", sparsity=0.6, batch_size=3, percdamp=0.05, blocksize=8
        ),
    }
    for name, flat in extra.items():
        for fam in ("llama", "gpt2"):
            out[f"tiny/{fam}/extra/{name}"] = {"family": fam, "config": dict(TINY_BASE, **flat)}
    return out


def smollm2_cases() -> dict[str, dict]:
    """SmolLM2-135M on CPU, C4 8 x 128: scorers x TRIM x allocations."""
    out = {}
    for sc, tr, al in itertools.product(
        ["wanda", "sparsegpt", "magnitude"], [False, True], ["uniform", "owl", "alphapruning"]
    ):
        flat = dict(
            scorer=sc,
            sparsity=0.7 if al != "uniform" else 0.6,
            allocation=al,
            trim=tr,
            calib="c4",
            nsamples=8,
            seqlen=128,
        )
        out[f"smollm2/{sc}/{'trim' if tr else 'alone'}/{al}"] = {
            "family": "smollm2",
            "config": flat,
        }
    return out


# ------------------------------------------------------------------------------------------ digests
def _plain(o):
    """Records as JSON-like data (`to_dict`)."""
    if hasattr(o, "to_dict"):
        return _plain(o.to_dict())
    if isinstance(o, dict):
        return {str(k): _plain(v) for k, v in o.items()}
    if isinstance(o, (list, tuple)):
        return [_plain(v) for v in o]
    if isinstance(o, torch.Tensor):
        return _plain(o.tolist())
    return o


# Floats that are chosen from a configured grid, not computed: compared exactly.
EXACT_FLOAT_KEYS = frozenset({"lr"})
FLOAT = "<f>"  # placeholder of a float in the exact part of the records
FLOAT_DIGITS = 8  # significant digits of the stored floats
# Float records are compared with a tolerance, not exactly: a different CPU ISA (AVX2 / AVX-512 /
# ARM), BLAS build or CUDA changes the last bits of reductions, and TRIM / SparseGPT metrics are
# sums over many products, so the recorded values are reproduced only to their last bits across
# machines (and a difference there can grow through the following layers).
# Anything that is a decision (masks, chosen learning rates, iterations, counts, strings) is exact.
REL_TOL = 1e-4
ABS_TOL = 1e-6


def _split(o, floats: list, key=None):
    """The records with every computed finite float replaced by FLOAT, the floats appended to
    `floats` in a deterministic order (dict keys sorted, lists in order)."""
    if isinstance(o, float):
        if key in EXACT_FLOAT_KEYS or not math.isfinite(o):
            return repr(o) if not math.isfinite(o) else o
        floats.append(o)
        return FLOAT
    if isinstance(o, dict):
        return {k: _split(o[k], floats, k) for k in sorted(o)}
    if isinstance(o, (list, tuple)):
        return [_split(v, floats, key) for v in o]
    return o


def outcome(result) -> dict:
    """The undigested outcome of one prune: records (exact floats), guard records, packed masks."""
    layers = {k: _plain(v) for k, v in result.layers.items()}
    guard = [_plain(b) for b in result.block_safeguard]
    masks = {k: bytes(v.contiguous().numpy().tobytes()) for k, v in result.masks.items()}
    return {"layers": layers, "block_safeguard": guard, "masks": masks}


def _round(x: float) -> float:
    return x if x == 0 else float(f"{x:.{FLOAT_DIGITS}g}")


def digest(out: dict) -> dict:
    """masks: exact digest of the masks; records_exact: exact digest of everything in the records
    that is not a computed float; floats: those floats (rounded to FLOAT_DIGITS significant digits),
    compared with `floats_close`; trim_lrs / trim_kept: exact."""
    h = hashlib.sha256()
    for k in sorted(out["masks"]):
        h.update(
            k.encode()
            + b"\0"
            + json.dumps(out["layers"][k]["shape"]).encode()
            + b"\0"
            + out["masks"][k]
        )
    floats: list[float] = []
    skel = json.dumps(
        _split({"layers": out["layers"], "block_safeguard": out["block_safeguard"]}, floats),
        sort_keys=True,
    )
    lrs = sorted({str(r["trim"]["lr"]) for r in out["layers"].values() if r.get("trim")})
    kept = sum(1 for r in out["layers"].values() if r.get("trim") and r["trim"]["kept"] == "trim")
    return {
        "masks": h.hexdigest()[:32],
        "records_exact": hashlib.sha256(skel.encode()).hexdigest()[:32],
        "trim_lrs": lrs,
        "trim_kept": kept,
        "floats": [_round(x) for x in floats],
    }


def floats_close(got: list[float], want: list[float]) -> list[str]:
    """The differences beyond tolerance between two float lists (empty: close)."""
    if len(got) != len(want):
        return [f"{len(got)} floats != recorded {len(want)}"]
    return [
        f"float #{i}: {g!r} != recorded {w!r}"
        for i, (g, w) in enumerate(zip(got, want))
        if not math.isclose(g, w, rel_tol=REL_TOL, abs_tol=ABS_TOL)
    ]


def compare(got: dict, want: dict) -> list[str]:
    """What differs between a digest and the recorded one: exact keys exactly, floats within
    REL_TOL / ABS_TOL (empty: the same)."""
    bad = [
        f"{k}: {got.get(k)!r} != recorded {want.get(k)!r}"
        for k in sorted((set(got) | set(want)) - {"floats"})
        if got.get(k) != want.get(k)
    ]
    bad += floats_close(got.get("floats", []), want.get("floats", []))
    return bad


def compare_recorded(got: dict, want: dict) -> list[str]:
    """`compare` against the recorded outcome and, where the case has them, against the
    `alternatives` recorded on CPUs of another instruction set (`cpu`: torch's CPU capability):
    a case whose TRIM or SparseGPT decision is a near-tie (margins of ~1e-4) legitimately decides
    otherwise when the last bits of a sum differ. Empty: the outcome equals one recorded outcome
    (exactly, floats within the tolerance); else the differences from the main recording."""
    main = {k: v for k, v in want.items() if k != "alternatives"}
    bad = compare(got, main)
    for alt in want.get("alternatives", []):
        d = alt["digest"]
        # an alternative recorded before the records were digested holds masks, trim_lrs, trim_kept
        if bad and not compare({k: got[k] for k in d} if "records_exact" not in d else got, d):
            return []
    return bad


def write_fixture(fixture: dict, path: Path = FIXTURE) -> None:
    """One case a line (compact), sorted by name."""
    path.parent.mkdir(parents=True, exist_ok=True)
    lines = [
        f"{json.dumps(k)}: {json.dumps(v, separators=(',', ':'))}"
        for k, v in sorted(fixture.items())
    ]
    path.write_text("{\n" + ",\n".join(lines) + "\n}\n")


# ------------------------------------------------------------------------------------------ running
_SMOL = {}


def _smollm2():
    from trimprune import load_model

    if "m" not in _SMOL:
        model, tok = load_model("smollm2-135m", device="cpu", dtype="float32")
        _SMOL["m"] = (model, tok, {k: v.clone() for k, v in model.state_dict().items()})
    return _SMOL["m"]


def run_case(case: dict, alpha_cache: str | None = None) -> dict:
    from tiny_models import calib, make
    from trimprune import PruneConfig, prune
    from trimprune.calib.data import get_calibration

    flat = dict(case["config"])
    if flat.get("allocation") == "alphapruning" and alpha_cache:
        flat["alpha_cache_dir"] = alpha_cache
    cfg = PruneConfig.from_flat(flat)
    if case["family"] == "smollm2":
        model, tok, state = _smollm2()
        model.load_state_dict(state)
        ids = get_calibration(cfg.calib, tok)
        return outcome(prune(model, tok, cfg, calibration=ids, progress=False))
    ids = calib(flat["nsamples"], flat["seqlen"])
    return outcome(prune(make(case["family"]), None, cfg, calibration=ids, progress=False))


def _cpu_model() -> str:
    """The CPU's model name from /proc/cpuinfo ('unknown' elsewhere)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return "unknown"


def main(argv=None):
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--write", action="store_true", help="write tests/fixtures/equivalence.json")
    ap.add_argument(
        "--smollm2", action="store_true", help="also the SmolLM2 cases (needs TRIMPRUNE_DATA)"
    )
    ap.add_argument("--only", default=None, help="substring of the case names to run")
    ap.add_argument(
        "--alternative",
        action="store_true",
        help="with --write: keep the recorded outcomes and add this CPU's outcome as an "
        "alternative where it equals none of them (a near-tie decided otherwise by another ISA)",
    )
    ap.add_argument(
        "--dump", default=None, help="write the undigested outcomes (exact floats) as JSON"
    )
    args = ap.parse_args(argv)
    torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))
    cases = tiny_cases() | (smollm2_cases() if args.smollm2 else {})
    if args.only:
        cases = {k: v for k, v in cases.items() if args.only in k}
    import tempfile

    fixture = json.loads(FIXTURE.read_text()) if FIXTURE.is_file() else {}
    dump, bad = {}, []
    with tempfile.TemporaryDirectory() as ac:
        for name, case in cases.items():
            t0 = time.perf_counter()
            out = run_case(case, ac)
            d = digest(out)
            if args.dump:
                dump[name] = {
                    "layers": out["layers"],
                    "block_safeguard": out["block_safeguard"],
                    "masks": {k: hashlib.sha256(v).hexdigest() for k, v in out["masks"].items()},
                }
            want = fixture.get(name)
            status = (
                "new" if want is None else ("DIFFERENT" if compare_recorded(d, want) else "same")
            )
            if status == "DIFFERENT":
                bad.append(name)
            print(
                f"{name:<55} {status:<9} {time.perf_counter() - t0:6.2f} s  kept {d['trim_kept']}",
                flush=True,
            )
            if not args.alternative or want is None:
                fixture[name] = d
            elif status == "DIFFERENT":
                cpu = f"{torch.backends.cpu.get_cpu_capability()} ({_cpu_model()})"
                want.setdefault("alternatives", []).append({"cpu": cpu, "digest": d})
    if args.write:
        write_fixture(fixture)
    if args.dump:
        Path(args.dump).write_text(json.dumps(dump, sort_keys=True))
    print(f"{len(cases)} cases, {len(bad)} different" + (f": {bad}" if bad else ""))
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
