"""`PruneConfig`: everything that decides how a model is pruned, loadable from / savable to YAML."""
from __future__ import annotations

import dataclasses
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from .errors import TrimpruneError

SCORERS = ("magnitude", "wanda", "sparsegpt")
CALIB_SOURCES = ("c4", "wikitext2", "ptb", "self")
CALIB_FORMATS = ("txt", "jsonl", "parquet")
# Layer metrics and dimension-wise metrics of TRIM (reference: flobk/TRIM lib/trim.py).
TRIM_LAYER_METRICS = ("cosim_flat", "cosim_dim", "cosim_sample", "mse", "mse_dim", "mae", "snr",
                      "psnr_flat", "psnr_dim", "psnr_sample")
TRIM_DIM_METRICS = ("cosim", "mse", "psnr")
# Metrics that are functions of W, W' and the Gram matrix G = X^T X alone.
GRAM_LAYER_METRICS = ("cosim_flat", "cosim_dim", "mse", "mse_dim", "snr")
GRAM_DIM_METRICS = ("cosim", "mse")
ALPHA_METRICS = ("alpha_peak", "alpha_mid")
ALPHA_MAPPINGS = ("block_wise", "per_matrix")


def parse_nm(structure: str | None) -> tuple[int, int] | None:
    """Parse "N:M" (N of every M consecutive weights are pruned) into (N, M)."""
    if structure in (None, "", "unstructured"):
        return None
    m = re.fullmatch(r"\s*(\d+)\s*:\s*(\d+)\s*", str(structure))
    if not m:
        raise TrimpruneError(f"--mask-structure {structure!r} is malformed: use N:M such as 2:4 or 4:8")
    n, mm = int(m.group(1)), int(m.group(2))
    if not (0 < n < mm):
        raise TrimpruneError(f"--mask-structure {structure!r} needs 0 < N < M, e.g. 2:4 or 4:8")
    return n, mm


def parse_trim_inputs(spec: str) -> tuple[str, int | None]:
    """'all' | 'last-token' | 'sample:N' -> (mode, N)."""
    if spec in ("all", "last-token"):
        return spec, None
    m = re.fullmatch(r"sample:(\d+)", str(spec))
    if m and int(m.group(1)) > 0:
        return "sample", int(m.group(1))
    raise TrimpruneError(f"--trim-inputs {spec!r} is not valid: use all, last-token or sample:N (N > 0)")


@dataclass
class PruneConfig:
    """How to prune. Field names match the CLI flags (`--trim-inputs` -> `trim_inputs`)."""

    # importance score and target
    scorer: str = "wanda"
    sparsity: float = 0.5
    mask_structure: str | None = None          # "2:4", "4:8" or None for unstructured
    allocation: str = "uniform"                # uniform | owl | alphapruning | file:PATH
    # calibration
    calib: str = "c4"
    calib_data: str | None = None
    calib_format: str | None = None
    nsamples: int = 128
    seqlen: int = 2048
    seed: int = 0
    batch_size: int = 0                        # 0 = choose from free memory
    offload: bool = False
    # SparseGPT (Frantar & Alistarh 2023)
    blocksize: int = 128
    percdamp: float = 0.01
    # TRIM (Beck, Rudman & Eickhoff 2025)
    trim: bool = False
    trim_inputs: str = "all"                   # all | last-token | sample:N
    trim_iterations: int = 10
    trim_metric: str = "cosim_flat"
    trim_dim_metric: str = "cosim"
    trim_lrs: list[float] = field(default_factory=lambda: [0.01, 0.02, 0.04, 0.08, 0.12, 0.16])
    trim_neg_lrs: list[float] = field(default_factory=lambda: [-0.01, -0.02, -0.04])
    trim_forbid_neg_lr: bool = False
    trim_input_recalc: bool = False
    trim_safeguard: bool = True
    trim_block_safeguard: bool = True          # compare whole blocks against the dense model (1/8 of calib)
    trim_max_row_sparsity: float = 0.95
    trim_precision: str = "tf32"               # fp32 | tf32 | bf16: GPU matmuls of the Gram metric (CPU: fp32)
    trim_lr_search: str = "auto"               # auto | parallel | sequential (same result, different speed)
    # OWL (Yin et al. 2024)
    owl_m: float = 5.0
    owl_lambda: float = 0.08
    # AlphaPruning (Lu et al. 2024)
    alpha_metric: str = "alpha_peak"
    alpha_eps: float = 0.3
    alpha_mapping: str = "block_wise"
    alpha_cache_dir: str | None = None

    # ------------------------------------------------------------------ validation
    @property
    def nm(self) -> tuple[int, int] | None:
        return parse_nm(self.mask_structure)

    def validate(self, max_context: int | None = None) -> "PruneConfig":
        """Raise TrimpruneError (one line, naming the value and the fix) on any bad field."""
        if self.scorer not in SCORERS:
            raise TrimpruneError(f"--scorer {self.scorer!r} is unknown: choose one of {', '.join(SCORERS)}")
        s = self.sparsity
        if not isinstance(s, (int, float)) or math.isnan(s) or not (0.0 <= s < 1.0):
            raise TrimpruneError(f"--sparsity {s!r} is outside [0, 1): give a fraction such as 0.5")
        nm = self.nm
        if nm is not None and abs(s - nm[0] / nm[1]) > 1e-9:
            raise TrimpruneError(
                f"--mask-structure {self.mask_structure} prunes exactly {nm[0] / nm[1]:g} of the weights but "
                f"--sparsity is {s:g}: use --sparsity {nm[0] / nm[1]:g} (or leave it out)")
        if nm is not None and self.trim:
            raise TrimpruneError("--trim cannot be combined with --mask-structure "
                                 f"{self.mask_structure}: N:M fixes every row's sparsity; drop one of them")
        if nm is not None and self.allocation != "uniform":
            raise TrimpruneError(f"--allocation {self.allocation} cannot be combined with --mask-structure "
                                 f"{self.mask_structure}: N:M fixes every layer's sparsity; use --allocation uniform")
        if self.calib not in CALIB_SOURCES:
            raise TrimpruneError(f"--calib {self.calib!r} is unknown: choose one of {', '.join(CALIB_SOURCES)}")
        if self.calib == "self" and self.calib_data:
            raise TrimpruneError("--calib self samples from the model and takes no --calib-data: drop --calib-data")
        if self.calib_format is not None and self.calib_format not in CALIB_FORMATS:
            raise TrimpruneError(f"--calib-format {self.calib_format!r} is unknown: choose one of "
                                 f"{', '.join(CALIB_FORMATS)}")
        if not isinstance(self.nsamples, int) or self.nsamples < 1:
            raise TrimpruneError(f"--nsamples {self.nsamples!r} must be an integer >= 1")
        if not isinstance(self.seqlen, int) or self.seqlen < 2:
            raise TrimpruneError(f"--seqlen {self.seqlen!r} must be an integer >= 2")
        if max_context is not None and self.seqlen > max_context:
            raise TrimpruneError(f"--seqlen {self.seqlen} is above the model's context of {max_context} tokens: "
                                 f"use --seqlen {max_context} or less")
        if not isinstance(self.batch_size, int) or self.batch_size < 0:
            raise TrimpruneError(f"--batch-size {self.batch_size!r} must be >= 1 (or 0 for automatic)")
        if not isinstance(self.blocksize, int) or self.blocksize < 1:
            raise TrimpruneError(f"--blocksize {self.blocksize!r} must be an integer >= 1")
        if nm is not None and self.blocksize % nm[1] != 0:
            raise TrimpruneError(f"--blocksize {self.blocksize} must be a multiple of M={nm[1]} for "
                                 f"--mask-structure {self.mask_structure}")
        if not (self.percdamp > 0):
            raise TrimpruneError(f"--percdamp {self.percdamp!r} must be > 0, e.g. 0.01")
        parse_trim_inputs(self.trim_inputs)
        if self.trim_metric not in TRIM_LAYER_METRICS:
            raise TrimpruneError(f"--trim-metric {self.trim_metric!r} is unknown: choose one of "
                                 f"{', '.join(TRIM_LAYER_METRICS)}")
        if self.trim_dim_metric not in TRIM_DIM_METRICS:
            raise TrimpruneError(f"--trim-dim-metric {self.trim_dim_metric!r} is unknown: choose one of "
                                 f"{', '.join(TRIM_DIM_METRICS)}")
        if self.trim and self.trim_inputs == "all":
            if self.trim_metric not in GRAM_LAYER_METRICS or self.trim_dim_metric not in GRAM_DIM_METRICS:
                raise TrimpruneError(
                    f"--trim-metric {self.trim_metric} / --trim-dim-metric {self.trim_dim_metric} need explicit "
                    "outputs, which --trim-inputs all does not keep: use --trim-inputs sample:N or last-token, "
                    f"or a Gram metric ({', '.join(GRAM_LAYER_METRICS)} / {', '.join(GRAM_DIM_METRICS)})")
        if not isinstance(self.trim_iterations, int) or self.trim_iterations < 1:
            raise TrimpruneError(f"--trim-iterations {self.trim_iterations!r} must be an integer >= 1")
        if not self.trim_lrs or any(lr <= 0 for lr in self.trim_lrs):
            raise TrimpruneError(f"trim_lrs {self.trim_lrs!r} must be a non-empty list of positive learning rates")
        if any(lr >= 0 for lr in self.trim_neg_lrs):
            raise TrimpruneError(f"trim_neg_lrs {self.trim_neg_lrs!r} must hold negative learning rates only")
        if not (0 < self.trim_max_row_sparsity <= 1):
            raise TrimpruneError(f"trim_max_row_sparsity {self.trim_max_row_sparsity!r} must be in (0, 1]")
        if self.trim_lr_search not in ("auto", "parallel", "sequential"):
            raise TrimpruneError(f"--trim-lr-search {self.trim_lr_search!r} is unknown: use auto, parallel or sequential")
        if self.trim_precision not in ("fp32", "tf32", "bf16"):
            raise TrimpruneError(f"--trim-precision {self.trim_precision!r} is unknown: use fp32, tf32 or bf16")
        alloc = self.allocation
        if not (alloc in ("uniform", "owl", "alphapruning") or (alloc.startswith("file:") and len(alloc) > 5)):
            raise TrimpruneError(f"--allocation {alloc!r} is unknown: use uniform, owl, alphapruning or file:PATH")
        if not (self.owl_m > 0):
            raise TrimpruneError(f"--owl-m {self.owl_m!r} must be > 0 (default 5)")
        if not (0 <= self.owl_lambda < 1):
            raise TrimpruneError(f"--owl-lambda {self.owl_lambda!r} must be in [0, 1) (default 0.08)")
        if self.alpha_metric not in ALPHA_METRICS:
            raise TrimpruneError(f"--alpha-metric {self.alpha_metric!r} is unknown: use {' or '.join(ALPHA_METRICS)}")
        if not (0 <= self.alpha_eps < 1):
            raise TrimpruneError(f"--alpha-eps {self.alpha_eps!r} must be in [0, 1) (default 0.3)")
        if self.alpha_mapping not in ALPHA_MAPPINGS:
            raise TrimpruneError(f"--alpha-mapping {self.alpha_mapping!r} is unknown: use "
                                 f"{' or '.join(ALPHA_MAPPINGS)}")
        return self

    # ------------------------------------------------------------------ YAML
    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "PruneConfig":
        if not isinstance(data, dict):
            raise TrimpruneError(f"a recipe must be a mapping of PruneConfig fields, got {type(data).__name__}")
        names = {f.name for f in dataclasses.fields(cls)}
        data = {str(k).replace("-", "_"): v for k, v in data.items()}
        unknown = sorted(set(data) - names)
        if unknown:
            raise TrimpruneError(f"recipe key {unknown[0]!r} is unknown: valid keys are {', '.join(sorted(names))}")
        return cls(**data)

    def to_yaml(self, path: str | Path | None = None) -> str:
        text = yaml.safe_dump(self.to_dict(), sort_keys=False)
        if path is not None:
            Path(path).write_text(text)
        return text

    @classmethod
    def from_yaml(cls, path_or_text: str | Path) -> "PruneConfig":
        p = Path(path_or_text)
        if isinstance(path_or_text, Path) or (len(str(path_or_text)) < 4096 and "\n" not in str(path_or_text)):
            if not p.is_file():
                raise TrimpruneError(f"--recipe {str(path_or_text)!r} does not exist: give the path of a YAML file")
            text = p.read_text()
        else:
            text = str(path_or_text)
        try:
            data = yaml.safe_load(text) or {}
        except yaml.YAMLError as e:
            raise TrimpruneError(f"recipe {str(path_or_text)[:80]!r} is not valid YAML: {str(e).splitlines()[0]}")
        return cls.from_dict(data)
