"""`PruneConfig`: everything that decides how a model is pruned, composed of small dataclasses.

    PruneConfig(sparsity, mask_structure,
                scorer=ScorerConfig, allocation=AllocationConfig, calib=CalibConfig,
                trim=TrimConfig, run=RunConfig, search=SearchConfig)

Every field carries its flat name (the recipe key and, with dashes, the command-line flag) and its
help text in the field metadata: the CLI builds its flags from them, so a new field is one edit.
Every config validates itself once, when it is made (frozen dataclasses; change one with
`dataclasses.replace`, which validates again). Shorthands: `scorer="wanda"`, `allocation="owl"`,
`calib="c4"`, `trim=True`. `PruneConfig.from_flat({...})` takes the flat names (`trim_inputs`,
`nsamples`, ...); YAML recipes may be flat or nested (`to_yaml` writes the nested form).
"""

from __future__ import annotations

import dataclasses
import math
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from trimprune.errors import ConfigError, InputFileError, register_fields
from trimprune.limits import load_yaml, read_limited

SCORERS = ("magnitude", "wanda", "sparsegpt")
CALIB_SOURCES = ("c4", "wikitext2", "ptb", "self")
CALIB_FORMATS = ("txt", "jsonl", "parquet")
# Layer metrics and dimension-wise metrics of TRIM (reference: flobk/TRIM lib/trim.py).
TRIM_LAYER_METRICS = (
    "cosim_flat",
    "cosim_dim",
    "cosim_sample",
    "mse",
    "mse_dim",
    "mae",
    "snr",
    "psnr_flat",
    "psnr_dim",
    "psnr_sample",
)
TRIM_DIM_METRICS = ("cosim", "mse", "psnr")
# Metrics that are functions of W, W' and the Gram matrix G = X^T X alone.
GRAM_LAYER_METRICS = ("cosim_flat", "cosim_dim", "mse", "mse_dim", "snr")
GRAM_DIM_METRICS = ("cosim", "mse")
ALPHA_METRICS = ("alpha_peak", "alpha_mid")
ALPHA_MAPPINGS = ("block_wise", "per_matrix")
TRIM_PRECISIONS = ("fp32", "tf32", "bf16")
LR_SEARCHES = ("auto", "parallel", "sequential")
OFFLOADS = (
    "cpu",
    "disk",
)  # where offloaded weights live (RunConfig.offload; false: on the compute device)
ALLOCATIONS = ("uniform", "owl", "alphapruning", "atp", "layerif", "lua", "expert", "search")
LAYERIF_HESSIANS = ("datainf", "identity")  # --layerif-hessian (algo.allocation.layerif)
LAYERIF_SCORES = ("positive", "signed")  # --layerif-score (algo.allocation.layerif)
EXPERT_LAYERWISE = ("uniform", "owl", "alphapruning", "atp")  # the rules --allocation expert uses
TRIM_GUARDS = ("block", "model")
TRIM_SPARSEGPT = ("counts", "steer")  # --trim-sparsegpt (algo.trim.steer)
SEARCH_SPACES = ("rules", "free", "trim", "experts", "layerif", "lua")
SEARCH_OBJECTIVES = ("kl", "nll")
SEARCH_PRUNERS = ("none", "median")


def option(default, key: str, help: str, *, choices=None, metavar: str | None = None, const=None):
    """A config field with its flat name (`key`: recipe key; CLI flag `--key` with dashes, or
    `--no-key` for a boolean that defaults to true) and its help text. `const`: a field that is
    false or one of `choices` (the flag alone means `const`)."""
    meta = {"key": key, "help": help, "choices": choices, "metavar": metavar, "const": const}
    if isinstance(default, (list, tuple)):
        return field(default_factory=lambda: tuple(default), metadata=meta)
    return field(default=default, metadata=meta)


def flag_of(f: dataclasses.Field) -> str:
    key = f.metadata["key"].replace("_", "-")
    return f"--no-{key}" if f.default is True else f"--{key}"


def parse_nm(structure: str | None) -> tuple[int, int] | None:
    """Parse "N:M" (N of every M consecutive weights are pruned) into (N, M)."""
    if structure in (None, "", "unstructured"):
        return None
    m = re.fullmatch(r"\s*(\d+)\s*:\s*(\d+)\s*", str(structure))
    if not m:
        raise ConfigError(
            f"{{mask_structure}} {structure!r} is malformed: use N:M such as 2:4 or 4:8"
        )
    n, mm = int(m.group(1)), int(m.group(2))
    if not (0 < n < mm):
        raise ConfigError(f"{{mask_structure}} {structure!r} needs 0 < N < M, e.g. 2:4 or 4:8")
    return n, mm


@dataclass(frozen=True)
class TrimInputs:
    """What TRIM measures its metrics on: every calibration token through the Gram matrix ("all"),
    the last token of every sequence ("last-token", the reference), or a seeded sample of N
    tokens."""

    mode: str  # all | last-token | sample
    sample: int | None = None

    @classmethod
    def parse(cls, spec: str) -> TrimInputs:
        if spec in ("all", "last-token"):
            return cls(spec)
        m = re.fullmatch(r"sample:(\d+)", str(spec))
        if m and int(m.group(1)) > 0:
            return cls("sample", int(m.group(1)))
        raise ConfigError(
            f"{{trim_inputs}} {spec!r} is not valid: use all, last-token or sample:N (N > 0)"
        )


# ------------------------------------------------------------------------------------------ checks
def _describe(tp) -> str:
    if typing.get_origin(tp) is tuple:
        return "a list of numbers"
    return {bool: "true or false", int: "an integer", float: "a number", str: "a string"}.get(
        tp, str(tp)
    )


def _type_ok(value, tp) -> bool:
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        return any(_type_ok(value, a) for a in typing.get_args(tp))
    if tp is type(None):
        return value is None
    if origin is tuple:
        return isinstance(value, (list, tuple)) and all(
            _type_ok(v, typing.get_args(tp)[0]) for v in value
        )
    if tp is bool:
        return isinstance(value, bool)
    if tp is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if tp is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    return isinstance(value, tp) if isinstance(tp, type) else True


def _number_hint(value, tp) -> str:
    """A hint for YAML's readings of values meant as numbers: `5e-1` (text in YAML 1.1), `2:4`
    (124)."""
    if isinstance(value, str):
        try:
            float(value)
        except ValueError:
            return ""
        return (
            f" (YAML reads {value} as text: write a plain number such as {float(value)!r}, "
            "without quotes)"
        )
    return ""


def _finite(value) -> bool:
    if isinstance(value, float):
        return math.isfinite(value)
    if isinstance(value, (list, tuple)):
        return all(_finite(v) for v in value)
    return True


def _check_types(obj) -> None:
    """Every field has the declared type: a recipe's "false" is not a boolean, YAML's 2:4 (read as
    the integer 124) is not an N:M string, a number is finite."""
    hints = typing.get_type_hints(type(obj))
    for f in dataclasses.fields(obj):
        if "key" not in f.metadata:
            continue
        v = getattr(obj, f.name)
        if not _type_ok(v, hints[f.name]):
            tp = hints[f.name]
            union = typing.get_origin(tp) in (typing.Union, types.UnionType)
            args = [a for a in typing.get_args(tp) if a is not type(None)] if union else [tp]
            hint = (
                " (in YAML, quote it: '2:4')"
                if f.name == "mask_structure" and isinstance(v, int)
                else ""
            )
            if args[0] in (int, float):
                hint = _number_hint(v, args[0])
            what = (
                f"{', '.join(f.metadata['choices'])} or false"
                if f.metadata.get("const")
                else _describe(args[0])
            )
            raise ConfigError(f"{{{f.metadata['key']}}} {_shown(v)} must be {what}{hint}")
        if not _finite(v):
            raise ConfigError(f"{{{f.metadata['key']}}} {_shown(v)} must be a finite number")
        if isinstance(v, list):
            object.__setattr__(obj, f.name, tuple(v))
        if (
            f.metadata.get("choices")
            and v is not None
            and v is not False
            and v not in f.metadata["choices"]
        ):
            off = " or false" if f.metadata.get("const") else ""
            raise ConfigError(
                f"{{{f.metadata['key']}}} {_shown(v)} is unknown: choose one of "
                f"{', '.join(f.metadata['choices'])}{off}"
            )


def _shown(v) -> str:
    """A value as an error message shows it: its repr, cut at 60 characters."""
    r = repr(v)
    return r if len(r) <= 60 else r[:57] + "..."


def _in_range(value, ok: bool, message: str) -> None:
    if not ok:
        raise ConfigError(message)


# ------------------------------------------------------------------------------------------ parts
@dataclass(frozen=True)
class ScorerConfig:
    """The importance score and, for SparseGPT, its solver (Frantar & Alistarh 2023)."""

    name: str = option("wanda", "scorer", "importance score", choices=SCORERS)
    blocksize: int = option(128, "blocksize", "SparseGPT: columns per block")
    percdamp: float = option(
        0.01, "percdamp", "SparseGPT: dampening, fraction of the mean of diag(H)"
    )

    def __post_init__(self):
        _check_types(self)
        _in_range(
            self.blocksize,
            self.blocksize >= 1,
            f"{{blocksize}} {self.blocksize!r} must be an integer >= 1",
        )
        _in_range(
            self.percdamp,
            self.percdamp > 0,
            f"{{percdamp}} {self.percdamp!r} must be > 0, e.g. 0.01",
        )


@dataclass(frozen=True)
class AllocationConfig:
    """Layer-wise allocation: uniform, OWL (Yin et al. 2024), AlphaPruning (Lu et al. 2024), ATP
    (Huang et al. 2025), LayerIF (Askari et al. 2025), expert-aware (per-expert sparsities within
    MoE blocks on top of one of these), a search over these rules and free profiles
    (`SearchConfig`), or a file."""

    method: str = option(
        "uniform",
        "allocation",
        "layer-wise allocation: uniform, owl, alphapruning, atp, layerif, lua, expert, search or "
        "file:PATH",
        metavar="METHOD",
    )
    owl_m: float = option(5.0, "owl_m", "OWL outlier threshold M")
    owl_lambda: float = option(0.08, "owl_lambda", "OWL sparsity range lambda")
    alpha_metric: str = option(
        "alpha_peak", "alpha_metric", "AlphaPruning heavy-tail metric", choices=ALPHA_METRICS
    )
    alpha_eps: float = option(0.3, "alpha_eps", "AlphaPruning range epsilon")
    alpha_mapping: str = option(
        "block_wise", "alpha_mapping", "AlphaPruning mapping", choices=ALPHA_MAPPINGS
    )
    alpha_cache_dir: str | None = option(
        None, "alpha_cache_dir", "cache folder of AlphaPruning metrics", metavar="DIR"
    )
    atp_beta: float = option(
        0.2,
        "atp_beta",
        "ATP: sparsity of the last block minus that of the first (a linear "
        "rise with depth; per-block step beta / (blocks - 1))",
    )
    layerif_hessian: str = option(
        "datainf",
        "layerif_hessian",
        "LayerIF: the inverse Hessian of its influence functions (DataInf's closed form, or the "
        "identity: TracIn's gradient dot products)",
        choices=LAYERIF_HESSIANS,
    )
    layerif_damping: float = option(
        0.1,
        "layerif_damping",
        "LayerIF with DataInf: damping lambda_l = this x the mean squared gradient entry of "
        "layer l",
    )
    layerif_score: str = option(
        "positive",
        "layerif_score",
        "LayerIF: a layer's score from its influences, the sum of the positive ones (the paper's "
        "cumulative positive influence) or of all of them, signed (where most layers have no "
        "positive influence)",
        choices=LAYERIF_SCORES,
    )
    layerif_per_linear: bool = option(
        False, "layerif_per_linear", "LayerIF: one influence score per linear (default: per block)"
    )
    layerif_holdout: int = option(
        0,
        "layerif_holdout",
        "LayerIF: the last calibration sequences held out as its validation set (0: nsamples // 8, "
        "at least 1); the prune itself uses every sequence",
    )
    lua_steps: int = option(
        100, "lua_steps", "Lua-LLM: gradient steps of the per-linear sparsity thresholds"
    )
    lua_lr: float = option(0.005, "lua_lr", "Lua-LLM: Adam's learning rate for the thresholds")
    lua_temperature: float = option(
        0.02,
        "lua_temperature",
        "Lua-LLM: tau of the soft mask sigmoid((rank - threshold) / tau), ranks in (0, 1)",
    )
    lua_batch: int = option(2, "lua_batch", "Lua-LLM: calibration sequences per step")
    expert_layerwise: str = option(
        "uniform",
        "expert_layerwise",
        "--allocation expert: the layer-wise rule giving each block its sparsity",
        choices=EXPERT_LAYERWISE,
    )
    expert_lambda: float = option(
        0.08,
        "expert_lambda",
        "--allocation expert: experts of a MoE block span its sparsity +- lambda (rarely "
        "routed experts pruned harder)",
    )
    expert_beta: float = option(
        0.0,
        "expert_beta",
        "--allocation expert: weight of the experts' outlier ratios in their score (0: routing "
        "frequency alone, 1: outlier ratios alone)",
    )

    def __post_init__(self):
        _check_types(self)
        a = self.method
        _in_range(
            a,
            a in ALLOCATIONS or (a.startswith("file:") and len(a) > 5),
            f"{{allocation}} {a!r} is unknown: use {', '.join(ALLOCATIONS)} or file:PATH",
        )
        _in_range(self.owl_m, self.owl_m > 0, f"{{owl_m}} {self.owl_m!r} must be > 0 (default 5)")
        _in_range(
            self.owl_lambda,
            0 <= self.owl_lambda < 1,
            f"{{owl_lambda}} {self.owl_lambda!r} must be in [0, 1) (default 0.08)",
        )
        _in_range(
            self.alpha_eps,
            0 <= self.alpha_eps < 1,
            f"{{alpha_eps}} {self.alpha_eps!r} must be in [0, 1) (default 0.3)",
        )
        _in_range(
            self.layerif_damping,
            self.layerif_damping > 0,
            f"{{layerif_damping}} {self.layerif_damping!r} must be > 0 (default 0.1)",
        )
        _in_range(
            self.layerif_holdout,
            self.layerif_holdout >= 0,
            f"{{layerif_holdout}} {self.layerif_holdout!r} must be >= 1 (or 0 for nsamples // 8)",
        )
        _in_range(
            self.lua_steps,
            self.lua_steps >= 1,
            f"{{lua_steps}} {self.lua_steps!r} must be an integer >= 1 (default 100)",
        )
        _in_range(
            self.lua_lr,
            self.lua_lr > 0 and math.isfinite(self.lua_lr),
            f"{{lua_lr}} {self.lua_lr!r} must be > 0 (default 0.005)",
        )
        _in_range(
            self.lua_temperature,
            0 < self.lua_temperature <= 1,
            f"{{lua_temperature}} {self.lua_temperature!r} must be in (0, 1] (default 0.02)",
        )
        _in_range(
            self.lua_batch,
            self.lua_batch >= 1,
            f"{{lua_batch}} {self.lua_batch!r} must be an integer >= 1 (default 2)",
        )
        _in_range(
            self.atp_beta,
            0 <= self.atp_beta <= 1,
            f"{{atp_beta}} {self.atp_beta!r} must be in [0, 1] (default 0.2)",
        )
        _in_range(
            self.expert_lambda,
            0 <= self.expert_lambda < 1,
            f"{{expert_lambda}} {self.expert_lambda!r} must be in [0, 1) (default 0.08)",
        )
        _in_range(
            self.expert_beta,
            0 <= self.expert_beta <= 1,
            f"{{expert_beta}} {self.expert_beta!r} must be in [0, 1] (default 0)",
        )


@dataclass(frozen=True)
class CalibConfig:
    """Calibration data and how its statistics are gathered."""

    source: str = option("c4", "calib", "calibration source", choices=CALIB_SOURCES)
    data: str | None = option(
        None, "calib_data", "local .txt/.jsonl/.parquet file for --calib", metavar="PATH"
    )
    format: str | None = option(
        None,
        "calib_format",
        "format of --calib-data when its extension is ambiguous",
        choices=CALIB_FORMATS,
    )
    nsamples: int = option(128, "nsamples", "calibration sequences")
    seqlen: int = option(2048, "seqlen", "tokens per calibration sequence (and evaluation window)")
    seed: int = option(0, "seed", "seed of the calibration sampling")
    input_recalc: bool = option(
        False,
        "trim_input_recalc",
        "recompute the inputs of later linears of a block after earlier ones are pruned",
    )
    moe: str = option(
        "routed",
        "moe_calibration",
        "mixture-of-experts: each expert's statistics from the tokens routed to it, or from every "
        "token (statistics only; outputs follow the router)",
        choices=("routed", "all"),
    )
    moe_min_tokens: int = option(
        64,
        "moe_min_tokens",
        "experts routed fewer calibration tokens take every token's statistics (listed in the "
        "report)",
    )

    def __post_init__(self):
        _check_types(self)
        _in_range(
            self.moe_min_tokens,
            self.moe_min_tokens >= 0,
            f"{{moe_min_tokens}} {self.moe_min_tokens!r} must be an integer >= 0",
        )
        if self.source == "self" and self.data:
            raise ConfigError(
                "{calib} self samples from the model and takes no {calib_data}: drop {calib_data}"
            )
        _in_range(
            self.nsamples,
            self.nsamples >= 1,
            f"{{nsamples}} {self.nsamples!r} must be an integer >= 1",
        )
        _in_range(
            self.seqlen, self.seqlen >= 2, f"{{seqlen}} {self.seqlen!r} must be an integer >= 2"
        )


@dataclass(frozen=True)
class TrimConfig:
    """TRIM (Beck, Rudman & Eickhoff 2025): row-wise sparsity search and its safeguards."""

    enabled: bool = option(False, "trim", "row-wise sparsity search (TRIM)")
    inputs: str = option(
        "all",
        "trim_inputs",
        "all (exact, Gram matrix over all tokens), last-token (reference) or sample:N",
        metavar="MODE",
    )
    iterations: int = option(10, "trim_iterations", "iterations per learning rate")
    metric: str = option("cosim_flat", "trim_metric", "layer metric", choices=TRIM_LAYER_METRICS)
    dim_metric: str = option(
        "cosim", "trim_dim_metric", "per-row quality metric", choices=TRIM_DIM_METRICS
    )
    lrs: tuple[float, ...] = option(
        (0.01, 0.02, 0.04, 0.08, 0.12, 0.16),
        "trim_lrs",
        "learning rates, tried upward",
        metavar="LR",
    )
    neg_lrs: tuple[float, ...] = option(
        (-0.01, -0.02, -0.04),
        "trim_neg_lrs",
        "negative learning rates, tried when no positive one beats uniform",
        metavar="LR",
    )
    forbid_neg_lr: bool = option(False, "trim_forbid_neg_lr", "never try negative learning rates")
    safeguard: bool = option(
        True,
        "trim_safeguard",
        "turn off the linear safeguard (and with it the block safeguard): TRIM's allocation is "
        "kept in every linear, even where its layer metric is worse than the scorer alone's (on "
        "by default: kept only where at least as good)",
    )
    block_safeguard: bool = option(
        True,
        "trim_block_safeguard",
        "turn off the block safeguard: each block keeps the linear safeguard's choices, even "
        "where its output on 1/8 of the calibration sequences is further from the dense model's "
        "than with the scorer alone (on by default: the block then drops TRIM)",
    )
    max_row_sparsity: float = option(
        0.95, "trim_max_row_sparsity", "upper bound of every row's sparsity"
    )
    precision: str = option(
        "tf32",
        "trim_precision",
        "matmul precision of the Gram-based metric on GPU (CPU: always fp32)",
        choices=TRIM_PRECISIONS,
    )
    lr_search: str = option(
        "auto",
        "trim_lr_search",
        "learning rates as one batched sweep (parallel) or one after "
        "the other with the reference's early stop (sequential): same result; auto: parallel "
        "for small matrices on GPU",
        choices=LR_SEARCHES,
    )
    guard: str = option(
        "block",
        "trim_guard",
        "block: the safeguards above; model: also prune without TRIM from the "
        "same activations and keep the model with the lower held-out objective (--search-objective "
        "on --search-holdout sequences)",
        choices=TRIM_GUARDS,
    )
    sparsegpt: str = option(
        "counts",
        "trim_sparsegpt",
        "how TRIM acts on SparseGPT: counts (the search's row counts fix SparseGPT's selection; "
        "the paper's TRIM) or steer (row weights on SparseGPT's saliency, searched on the "
        "reconstructed weights; a linear keeps them only where they beat SparseGPT alone)",
        choices=TRIM_SPARSEGPT,
    )

    def __post_init__(self):
        _check_types(self)
        mode = TrimInputs.parse(self.inputs)
        object.__setattr__(self, "_input_mode", mode)  # parsed once (not a field)
        if (
            self.enabled
            and mode.mode == "all"
            and (self.metric not in GRAM_LAYER_METRICS or self.dim_metric not in GRAM_DIM_METRICS)
        ):
            raise ConfigError(
                f"{{trim_metric}} {self.metric} / {{trim_dim_metric}} {self.dim_metric} need "
                "explicit outputs, which {trim_inputs} all does not keep: use {trim_inputs} "
                f"sample:N or last-token, or a Gram metric ({', '.join(GRAM_LAYER_METRICS)} / "
                f"{', '.join(GRAM_DIM_METRICS)})"
            )
        _in_range(
            self.iterations,
            self.iterations >= 1,
            f"{{trim_iterations}} {self.iterations!r} must be an integer >= 1",
        )
        _in_range(
            self.lrs,
            bool(self.lrs) and all(lr > 0 for lr in self.lrs),
            f"{{trim_lrs}} {list(self.lrs)!r} must be a non-empty list of positive learning rates",
        )
        _in_range(
            self.neg_lrs,
            all(lr < 0 for lr in self.neg_lrs),
            f"{{trim_neg_lrs}} {list(self.neg_lrs)!r} must hold negative learning rates only",
        )
        _in_range(
            self.max_row_sparsity,
            0 < self.max_row_sparsity <= 1,
            f"{{trim_max_row_sparsity}} {self.max_row_sparsity!r} must be in (0, 1]",
        )

    @property
    def input_mode(self) -> TrimInputs:
        return self._input_mode

    @property
    def runs_block_safeguard(self) -> bool:
        """Whether the block-level safeguard runs (it compares against the per-linear choices)."""
        return self.enabled and self.block_safeguard and self.safeguard


@dataclass(frozen=True)
class RunConfig:
    """How the work is laid out and kept; results do not depend on it beyond floating-point
    summation order (a resumed run gives the uninterrupted run's masks and weights exactly)."""

    batch_size: int = option(
        0,
        "batch_size",
        "calibration sequences per forward pass while pruning (0 = from free memory); the "
        "evaluations have their own: --eval-batch-size, --tasks-batch-size",
    )
    offload: bool | str = option(
        False,
        "offload",
        "cpu: weights in pinned CPU memory; disk: weights read from the "
        "model's safetensors as each block is needed and the pruned blocks written to --output "
        "as they finish (a bare --offload is cpu); blocks visit the GPU one at a time",
        choices=OFFLOADS,
        metavar="{cpu,disk}",
        const="cpu",
    )
    checkpoint_dir: str | None = option(
        None,
        "checkpoint_dir",
        "after each pruned block, save what a resumed run "
        "needs into DIR (the block's weights, masks and records, the hidden states "
        "entering the next block, the allocation); see --resume",
        metavar="DIR",
    )
    resume: bool = option(
        False,
        "resume",
        "continue the run whose resume state is in --checkpoint-dir after its last "
        "complete block (starts at block 0 when there is none); refuses a resume state of another "
        "config, model or calibration",
    )
    keep_checkpoint: bool = option(
        False,
        "keep_checkpoint",
        "keep --checkpoint-dir after the output is written "
        "(by default the command line removes it then)",
    )
    allow_unpruned: bool = option(
        False,
        "allow_unpruned",
        "prune a model whose blocks hold 2-D or 3-D weights trimprune cannot prune (above 1 "
        "percent of a block's parameters, or fused experts of an unknown layout): they stay "
        "dense and the report lists them (refused otherwise)",
    )

    def __post_init__(self):
        if self.offload is True:  # the boolean of earlier recipes and of the Python API
            object.__setattr__(self, "offload", "cpu")
        _check_types(self)
        if self.offload == "disk" and self.checkpoint_dir:
            raise ConfigError(
                "{checkpoint_dir} is not supported with {offload} disk (the pruned blocks go "
                "straight to --output): use {offload} cpu, or leave {checkpoint_dir} out"
            )
        _in_range(
            self.batch_size,
            self.batch_size >= 0,
            f"{{batch_size}} {self.batch_size!r} must be >= 1 (or 0 for automatic)",
        )
        if self.resume and not self.checkpoint_dir:
            raise ConfigError(
                "{resume} needs {checkpoint_dir} DIR: the folder of the interrupted run's "
                "resume state"
            )
        if self.checkpoint_dir is not None and not self.checkpoint_dir.strip():
            raise ConfigError(
                "{checkpoint_dir} '' is empty: give a folder, e.g. {checkpoint_dir} out/ckpt"
            )


@dataclass(frozen=True)
class SearchConfig:
    """`--allocation search`: Optuna's TPE over allocation rules and free depth profiles, scored on
    held-out calibration sequences; the held-out objective also decides `--trim-guard model`."""

    space: str = option(
        "rules,free",
        "search_space",
        "comma list: rules (OWL, AlphaPruning, ATP parameters), free "
        "(Chebyshev profile over depth), trim (TRIM on/off per trial), experts (per-expert "
        "sparsities in MoE blocks: expert lambda and beta per trial), layerif (LayerIF's scores, "
        "computed once with the --layerif-* settings, and its range epsilon per trial), lua "
        "(Lua-LLM's thresholds, trained once with the --lua-* settings, and the strength of "
        "their deviations per trial)",
        metavar="LIST",
    )
    objective: str = option(
        "kl",
        "search_objective",
        "held-out objective: kl (KL(dense || pruned) per token) or nll",
        choices=SEARCH_OBJECTIVES,
    )
    holdout: int = option(
        0,
        "search_holdout",
        "calibration sequences held out from the statistics for the "
        "objective, the last ones of --nsamples (0 = nsamples // 8, at least 1)",
    )
    trials: int = option(50, "search_trials", "trials of this run (a resumed study adds them)")
    timeout: float = option(
        0.0, "search_timeout", "no new trial after this many seconds (0 = no limit)"
    )
    seed: int = option(0, "search_seed", "seed of the TPE sampler")
    seeds: int = option(
        1,
        "search_seeds",
        "independent studies with seeds --search-seed, +1, ..., each of --search-trials trials; "
        "the best held-out trial of all wins and the report shows the spread across seeds",
        metavar="K",
    )
    pruner: str = option(
        "none",
        "search_pruner",
        "multi-fidelity stage: median stops a trial whose held-out objective, measured when "
        "--search-rung of the blocks are pruned (the later ones still dense), is worse than the "
        "median of the earlier trials there (Optuna's MedianPruner; the warm starts always run "
        "whole); none runs every trial whole",
        choices=SEARCH_PRUNERS,
    )
    rung: float = option(
        0.5,
        "search_rung",
        "fraction of the blocks pruned when --search-pruner measures the partial objective",
        metavar="F",
    )
    storage: str | None = option(
        None,
        "search_storage",
        "Optuna storage URL, e.g. sqlite:///study.db: the study "
        "resumes there and several processes can share it",
        metavar="URL",
    )
    study: str | None = option(
        None,
        "search_study",
        "study name (default: from the config, model and calibration)",
        metavar="NAME",
    )

    def __post_init__(self):
        _check_types(self)
        parts = [p.strip() for p in self.space.split(",") if p.strip()]
        bad = [p for p in parts if p not in SEARCH_SPACES]
        _in_range(
            self.space,
            not bad and bool(parts),
            f"{{search_space}} {self.space!r} is unknown: use a comma list of "
            f"{', '.join(SEARCH_SPACES)}",
        )
        _in_range(
            self.space,
            bool(set(parts) & {"rules", "free", "layerif", "lua"}),
            f"{{search_space}} {self.space} needs rules or free too: e.g. rules,free,"
            f"{','.join(p for p in dict.fromkeys(parts) if p not in ('rules', 'free'))}",
        )
        _in_range(
            self.holdout,
            self.holdout >= 0,
            f"{{search_holdout}} {self.holdout!r} must be >= 1 (or 0 for nsamples // 8)",
        )
        _in_range(
            self.trials,
            self.trials >= 1,
            f"{{search_trials}} {self.trials!r} must be an integer >= 1",
        )
        _in_range(
            self.seeds,
            1 <= self.seeds <= 64,
            f"{{search_seeds}} {self.seeds!r} must be an integer in [1, 64]",
        )
        _in_range(
            self.rung,
            0 < self.rung < 1,
            f"{{search_rung}} {self.rung!r} must be in (0, 1), e.g. 0.5 (half of the blocks)",
        )
        _in_range(
            self.timeout,
            self.timeout >= 0,
            f"{{search_timeout}} {self.timeout!r} must be >= 0 (0 = no limit)",
        )
        _in_range(
            self.storage,
            self.storage is None or "://" in self.storage,
            f"{{search_storage}} {self.storage!r} is not a database URL: use e.g. sqlite:///study.db",
        )
        _in_range(
            self.study,
            self.study is None or bool(self.study.strip()),
            "{search_study} must not be empty: give a name or leave it out",
        )

    @property
    def spaces(self) -> tuple[str, ...]:
        return tuple(dict.fromkeys(p.strip() for p in self.space.split(",") if p.strip()))

    def holdout_for(self, nsamples: int) -> int:
        """The held-out sequences out of `nsamples` calibration sequences."""
        return self.holdout or max(1, nsamples // 8)


PARTS = {
    "scorer": (ScorerConfig, "name"),
    "allocation": (AllocationConfig, "method"),
    "calib": (CalibConfig, "source"),
    "trim": (TrimConfig, "enabled"),
    "run": (RunConfig, None),
    "search": (SearchConfig, None),
}


@dataclass(frozen=True)
class PruneConfig:
    """How to prune: the target, and one sub-config per concern."""

    sparsity: float | None = option(
        None, "sparsity", "target fraction of pruned weights in [0, 1); N/M with --mask-structure"
    )
    mask_structure: str | None = option(
        None, "mask_structure", "N:M semi-structured pattern, e.g. 2:4", metavar="N:M"
    )
    scorer: ScorerConfig = field(default_factory=ScorerConfig)
    allocation: AllocationConfig = field(default_factory=AllocationConfig)
    calib: CalibConfig = field(default_factory=CalibConfig)
    trim: TrimConfig = field(default_factory=TrimConfig)
    run: RunConfig = field(default_factory=RunConfig)
    search: SearchConfig = field(default_factory=SearchConfig)

    def __post_init__(self):
        self._expand_parts()
        nm = parse_nm(self.mask_structure) if isinstance(self.mask_structure, str) else None
        if self.sparsity is None and not self.allocation.method.startswith("file:"):
            object.__setattr__(self, "sparsity", nm[0] / nm[1] if nm else 0.5)
        _check_types(self)
        s = self.sparsity
        if s is not None and (
            math.isnan(s) or not (0.0 <= s < 1.0)
        ):  # None: an allocation file's own mean
            raise ConfigError(f"{{sparsity}} {s!r} is outside [0, 1): give a fraction such as 0.5")
        self._check_combinations()
        if nm is not None:
            self._check_mask_structure(nm, s)

    def _expand_parts(self) -> None:
        for name, (cls, short) in PARTS.items():  # shorthands: scorer="wanda", trim=True, {...}
            v = getattr(self, name)
            if isinstance(v, dict):
                names = {f.name for f in dataclasses.fields(cls)}
                unknown = [str(k) for k in v if k not in names]
                if unknown:
                    raise ConfigError(
                        f"{name}.{unknown[0]} is unknown: valid keys are "
                        f"{', '.join(f'{name}.{n}' for n in sorted(names))}"
                    )
                object.__setattr__(self, name, cls(**v))
            elif not isinstance(v, cls):
                if short is None:
                    raise ConfigError(f"{name} {_shown(v)} must be a {cls.__name__}")
                object.__setattr__(self, name, cls(**{short: v}))

    def _check_trim_scorer(self) -> None:
        if self.trim.sparsegpt == "steer" and self.scorer.name != "sparsegpt":
            raise ConfigError(
                f"{{trim_sparsegpt}} steer weights SparseGPT's saliency, not {{scorer}} "
                f"{self.scorer.name}'s: add {{scorer}} sparsegpt, or leave {{trim_sparsegpt}} out"
            )

    def _check_combinations(self) -> None:
        self._check_trim_scorer()
        if (
            self.trim.guard == "model"
            and not self.trim.enabled
            and "trim" not in self.search_spaces
        ):
            raise ConfigError("{trim_guard} model compares TRIM with the scorer alone: add {trim}")
        if self.holdout is not None and self.holdout >= self.calib.nsamples:
            raise ConfigError(
                f"{{search_holdout}} {self.holdout} leaves no calibration sequence to prune with "
                f"out of {{nsamples}} {self.calib.nsamples}: use more {{nsamples}} or a smaller "
                "{search_holdout}"
            )
        if (self.allocation.method == "lua" or "lua" in self.search_spaces) and self.run.offload:
            what = (
                "{allocation} lua"
                if self.allocation.method == "lua"
                else f"{{search_space}} {self.search.space}"
            )
            raise ConfigError(
                f"{what} trains Lua-LLM's thresholds through the whole model at once and cannot "
                "be combined with {offload}: use another {allocation}, or write its allocation on "
                "a larger device and prune with {allocation} file:PATH"
            )
        if self.search.pruner != "none" and self.allocation.method != "search":
            raise ConfigError(
                f"{{search_pruner}} {self.search.pruner} stops trials of the allocation search: "
                "add {allocation} search, or leave {search_pruner} out"
            )
        if self.search.pruner != "none" and self.run.offload:
            raise ConfigError(
                f"{{search_pruner}} {self.search.pruner} measures the model between two blocks and "
                "cannot be combined with {offload}: leave {search_pruner} out (none)"
            )
        if self.allocation.method == "layerif" or "layerif" in self.search_spaces:
            k = self.allocation.layerif_holdout or max(1, self.calib.nsamples // 8)
            if k >= self.calib.nsamples:
                raise ConfigError(
                    f"{{layerif_holdout}} {k} leaves no calibration sequence to score with out "
                    f"of {{nsamples}} {self.calib.nsamples}: use more {{nsamples}} or a smaller "
                    "{layerif_holdout}"
                )
            if self.run.offload:
                what = (
                    "{allocation} layerif"
                    if self.allocation.method == "layerif"
                    else f"{{search_space}} {self.search.space}"
                )
                raise ConfigError(
                    f"{what} backpropagates through the whole model at once (LayerIF) and "
                    "cannot be combined with {offload}: use another {allocation}, or write its "
                    "allocation on a larger device and prune with {allocation} file:PATH"
                )
        if self.run.checkpoint_dir and self.allocation.method == "search":
            raise ConfigError(
                "{checkpoint_dir} cannot be combined with {allocation} search (its trials prune "
                "the whole model again and again): a search resumes from its {search_storage}, "
                "e.g. sqlite:///study.db; to keep a resume state of the final prune, prune with "
                "the search's allocation.json through {allocation} file:PATH {checkpoint_dir} DIR"
            )
        if self.run.offload == "disk" and (
            self.allocation.method == "search" or self.trim.guard == "model"
        ):
            what = (
                "{allocation} search"
                if self.allocation.method == "search"
                else "{trim_guard} model"
            )
            raise ConfigError(
                f"{{offload}} disk cannot be combined with {what} (it prunes the whole model "
                "several times from the dense weights; disk offload writes each block out once): "
                "use {offload} cpu"
            )
        if self.run.checkpoint_dir and self.trim.guard == "model":
            raise ConfigError(
                "{checkpoint_dir} cannot be combined with {trim_guard} model (it prunes the whole "
                "model twice and keeps one): use {trim_guard} block, or leave {checkpoint_dir} out"
            )

    def _check_mask_structure(self, nm: tuple[int, int], s: float | None) -> None:
        if s is not None and abs(s - nm[0] / nm[1]) > 1e-9:
            raise ConfigError(
                f"{{mask_structure}} {self.mask_structure} prunes exactly {nm[0] / nm[1]:g} of the "
                "weights but "
                f"{{sparsity}} is {s:g}: use {{sparsity}} {nm[0] / nm[1]:g} (or leave it out)"
            )
        if self.trim.enabled:
            raise ConfigError(
                "{trim} cannot be combined with {mask_structure} "
                f"{self.mask_structure}: N:M fixes every row's sparsity; drop one of them"
            )
        if self.allocation.method != "uniform":
            raise ConfigError(
                f"{{allocation}} {self.allocation.method} cannot be combined with "
                f"{{mask_structure}} {self.mask_structure}: N:M fixes every layer's sparsity; use "
                "{allocation} uniform"
            )
        if self.scorer.blocksize % nm[1] != 0:
            raise ConfigError(
                f"{{blocksize}} {self.scorer.blocksize} must be a multiple of M={nm[1]} for "
                f"{{mask_structure}} {self.mask_structure}"
            )

    @property
    def nm(self) -> tuple[int, int] | None:
        return parse_nm(self.mask_structure)

    @property
    def search_spaces(self) -> tuple[str, ...]:
        """The search space's parts with `--allocation search`, else none."""
        return self.search.spaces if self.allocation.method == "search" else ()

    @property
    def mode(self) -> str:
        """How `prune` runs this config: "search" (`--allocation search`), "model-safeguard"
        (`--trim-guard model`: with and without TRIM, the better kept) or "plain" (one prune)."""
        if self.allocation.method == "search":
            return "search"
        return "model-safeguard" if self.trim.guard == "model" else "plain"

    @property
    def holdout(self) -> int | None:
        """The held-out calibration sequences (the last ones) of a search or of `--trim-guard
        model`; None when every sequence goes to the statistics."""
        if self.allocation.method != "search" and self.trim.guard != "model":
            return None
        return self.search.holdout_for(self.calib.nsamples)

    # ------------------------------------------------------------------ flat names, YAML
    @classmethod
    def flat_fields(cls) -> dict[str, tuple[str | None, dataclasses.Field]]:
        """flat name -> (sub-config attribute or None for a top-level field, the field)."""
        out = {}
        for f in dataclasses.fields(cls):
            if "key" in f.metadata:
                out[f.metadata["key"]] = (None, f)
        for part, (sub, _) in PARTS.items():
            for f in dataclasses.fields(sub):
                out[f.metadata["key"]] = (part, f)
        return out

    @classmethod
    def from_flat(cls, data: dict[str, Any]) -> PruneConfig:
        """A config from flat names (recipe keys / CLI destinations: `trim_inputs`, `nsamples`,
        ...)."""
        fields = cls.flat_fields()
        top, parts = {}, {p: {} for p in PARTS}
        for k, v in data.items():
            key = str(k).replace("-", "_")
            if key not in fields:
                raise ConfigError(
                    f"recipe key {key!r} is unknown: valid keys are {', '.join(sorted(fields))}"
                )
            part, f = fields[key]
            (top if part is None else parts[part])[f.name] = v
        return cls(**top, **{p: PARTS[p][0](**kw) for p, kw in parts.items()})

    def to_flat(self) -> dict[str, Any]:
        out = {}
        for key, (part, f) in self.flat_fields().items():
            v = getattr(self if part is None else getattr(self, part), f.name)
            out[key] = list(v) if isinstance(v, tuple) else v
        return out

    def to_dict(self) -> dict[str, Any]:
        """The nested form (report.json, `to_yaml`)."""

        def plain(x):
            return list(x) if isinstance(x, tuple) else x

        d = dataclasses.asdict(self)
        return {
            k: ({kk: plain(vv) for kk, vv in v.items()} if isinstance(v, dict) else v)
            for k, v in d.items()
        }

    @classmethod
    def flat_of(cls, data: dict[str, Any]) -> dict[str, Any]:
        """The flat names and values of a nested (`trim: {inputs: all}`) or flat (`trim_inputs:
        all`) mapping, or a mix; unknown keys are an error."""
        if not isinstance(data, dict):
            raise ConfigError(
                f"a recipe must be a mapping of PruneConfig fields, got {type(data).__name__}"
            )
        fields = cls.flat_fields()
        flat = {}
        for k, v in data.items():
            key = str(k).replace("-", "_")
            if key in PARTS and isinstance(v, dict):
                sub = PARTS[key][0]
                names = {f.name: f.metadata["key"] for f in dataclasses.fields(sub)}
                for kk, vv in v.items():
                    if str(kk) not in names:
                        raise ConfigError(
                            f"recipe key {key}.{kk} is unknown: valid keys are "
                            f"{', '.join(f'{key}.{n}' for n in names)}"
                        )
                    flat[names[str(kk)]] = vv
            elif key not in fields:
                raise ConfigError(
                    f"recipe key {key!r} is unknown: valid keys are {', '.join(sorted(fields))}"
                )
            else:
                flat[key] = v
        return flat

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> PruneConfig:
        """Nested (`trim: {inputs: all}`) or flat (`trim_inputs: all`) keys, or a mix."""
        return cls.from_flat(cls.flat_of(data))

    def to_yaml(self, path: str | Path | None = None) -> str:
        text = yaml.safe_dump(self.to_dict(), sort_keys=False)
        if path is not None:
            Path(path).write_text(text)
        return text

    @classmethod
    def recipe_flat(cls, path_or_text: str | Path) -> dict[str, Any]:
        """The flat names and values a YAML recipe (a file, or the text itself) gives, before
        defaults: what it sets and nothing else (the command line puts its flags on top)."""
        p = Path(path_or_text)
        if isinstance(path_or_text, Path) or (
            len(str(path_or_text)) < 4096 and "\n" not in str(path_or_text)
        ):
            if p.is_dir():
                raise InputFileError(
                    f"--recipe {str(path_or_text)!r} is a folder: give the path of a YAML file"
                )
            if not p.is_file():
                raise InputFileError(
                    f"--recipe {str(path_or_text)!r} does not exist: give the path of a YAML file"
                )
            try:
                text = read_limited(p, f"--recipe {str(path_or_text)!r}")
            except UnicodeDecodeError:
                raise InputFileError(
                    f"--recipe {str(path_or_text)!r} is not UTF-8 text: give a YAML file"
                ) from None
            except OSError as e:
                raise InputFileError(
                    f"--recipe {str(path_or_text)!r} cannot be read ({e.strerror or e})"
                ) from e
        else:
            text = str(path_or_text)
        try:
            data = load_yaml(text, f"recipe {str(path_or_text)[:80]!r}")
        except (
            yaml.YAMLError,
            ValueError,
            TypeError,
            RecursionError,
        ) as e:  # a date like 2024-13-01: ValueError
            first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise InputFileError(
                f"recipe {str(path_or_text)[:80]!r} is not valid YAML: {first}"
            ) from e
        return cls.flat_of({} if data is None else data)

    @classmethod
    def from_yaml(cls, path_or_text: str | Path) -> PruneConfig:
        """A config from a YAML recipe: a file, or the text itself."""
        return cls.from_flat(cls.recipe_flat(path_or_text))


register_fields(
    {
        key: (f.name if part is None else f"{part}.{f.name}", flag_of(f))
        for key, (part, f) in PruneConfig.flat_fields().items()
    }
)
