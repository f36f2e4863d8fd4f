"""The validation layer under random inputs.

Properties: random config values and random file contents are accepted or end in `TrimpruneError` (one line
for the command line), never another exception. Decided outcomes (the second half): configurations drawn from
the valid ranges must be accepted with their values; a valid configuration with one field, or one pair of
fields, made invalid must be rejected with a `ConfigError` naming it."""

import gzip
import io
import json
import re
import tempfile
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from trimprune import PruneConfig
from trimprune.algo.allocation.base import from_file, read_allocation_file
from trimprune.calib.data import probe_rows, read_rows
from trimprune.errors import ConfigError, InputFileError, TrimpruneError
from trimprune.io.models import check_model_source

FUZZ = settings(
    max_examples=120,
    deadline=None,
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much],
)

KEYS = sorted(PruneConfig.flat_fields())
SCALARS = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-(10**20), 10**20),
    st.floats(allow_nan=True),
    st.text(max_size=12),
    st.sampled_from(
        [
            "2:4",
            "4:8",
            "1:0",
            "0:4",
            "sample:8",
            "sample:0",
            "all",
            "last-token",
            "file:",
            "file:/nonexistent",
            "owl",
            "wanda",
            "c4",
            "self",
            "cosim_flat",
            "tf32",
            "auto",
            "0.5",
            "1e-3",
            "true",
            "no",
            "-1",
        ]
    ),
)
VALUES = st.recursive(
    SCALARS,
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=6), inner, max_size=3)
    ),
    max_leaves=6,
)
FLAT = st.dictionaries(st.one_of(st.sampled_from(KEYS), st.text(max_size=8)), VALUES, max_size=6)


def _accepted_or_trimprune_error(fn, *args):
    try:
        fn(*args)
    except TrimpruneError as e:
        assert "\n" not in str(e) and str(e), repr(e)


@FUZZ
@given(FLAT)
def test_random_flat_configs(flat):
    _accepted_or_trimprune_error(PruneConfig.from_flat, flat)


@FUZZ
@given(
    st.dictionaries(
        st.sampled_from(
            ["sparsity", "mask_structure", "scorer", "allocation", "calib", "trim", "run"]
        ),
        VALUES,
        max_size=4,
    )
)
def test_random_nested_configs(kwargs):
    _accepted_or_trimprune_error(lambda kw: PruneConfig(**kw), kwargs)


@FUZZ
@given(
    FLAT.map(
        lambda d: json.loads(
            json.dumps(d, default=str).replace("NaN", "null").replace("Infinity", "1e999")
        )
    )
)
def test_random_yaml_recipes(data):
    import yaml

    text = yaml.safe_dump(data, allow_unicode=True) + "\n"
    _accepted_or_trimprune_error(PruneConfig.from_yaml, text)


@FUZZ
@given(st.text(max_size=200))
def test_random_recipe_text(text):
    _accepted_or_trimprune_error(PruneConfig.from_yaml, text + "\n")


def _yamlish(value) -> bytes:
    return json.dumps(value, default=str).encode()


CONTENTS = st.one_of(
    st.binary(max_size=300),
    st.text(max_size=300).map(lambda t: t.encode("utf-8", "surrogatepass")),
    st.lists(
        st.one_of(
            st.dictionaries(st.sampled_from(["text", "sentence", "x"]), VALUES, max_size=2), VALUES
        ),
        max_size=5,
    ).map(lambda rows: b"\n".join(_yamlish(r) for r in rows)),
)


@FUZZ
@given(
    CONTENTS,
    st.sampled_from(["c.txt", "c.raw", "c.jsonl", "c.json", "c.jsonl.gz", "c.parquet", "c.bin"]),
    st.booleans(),
    st.sampled_from(["text", "sentence"]),
)
def test_random_data_files(content, name, gz, field):
    with tempfile.TemporaryDirectory() as d:
        p = Path(d) / name
        if name.endswith(".gz") and gz:
            content = gzip.compress(content)
        if name.endswith(".parquet") and gz:  # a real parquet file of random strings
            import pyarrow as pa
            import pyarrow.parquet as pq

            buf = io.BytesIO()
            pq.write_table(pa.table({field: [content.decode("utf-8", "replace")]}), buf)
            content = buf.getvalue()
        p.write_bytes(content)
        for fn in (probe_rows, read_rows):
            _accepted_or_trimprune_error(fn, p, None, field, "--calib-data")


NUMELS = {
    f"model.layers.{b}.{n}": 64 * (i + 1)
    for b in range(3)
    for i, n in enumerate(["q", "k", "mlp.down"])
}
BLOCK_OF = {k: int(k.split(".")[2]) for k in NUMELS}


@FUZZ
@given(
    st.one_of(
        CONTENTS,
        VALUES.map(_yamlish),
        st.lists(st.floats(0, 0.99), min_size=1, max_size=4).map(_yamlish),
        st.dictionaries(
            st.sampled_from(
                ["0", "1", "2", "3", "1.q", "model.layers.0.q", "per_block", "per_linear"]
            ),
            VALUES,
            max_size=4,
        ).map(_yamlish),
    ),
    st.one_of(st.none(), st.floats(0, 0.99)),
)
def test_random_allocation_files(content, requested):
    with tempfile.TemporaryDirectory() as d:
        p = Path(d) / "alloc.json"
        p.write_bytes(content)
        _accepted_or_trimprune_error(read_allocation_file, p)
        _accepted_or_trimprune_error(from_file, str(p), requested, NUMELS, BLOCK_OF)


@FUZZ
@given(st.one_of(st.none(), CONTENTS), st.sampled_from(["folder", "model.gguf", "model.bin"]))
def test_random_model_folders(config, name):
    with tempfile.TemporaryDirectory() as d:
        p = Path(d) / name
        if name == "folder":
            p.mkdir()
            if config is not None:
                (p / "config.json").write_bytes(config)
        else:
            p.write_bytes(config or b"")
        _accepted_or_trimprune_error(check_model_source, str(p), None)


@pytest.mark.parametrize(
    "value", [float("nan"), float("inf"), -0.0, 10**30, "", "  ", [], {}, [[]]]
)
def test_edge_values_for_every_field(value):
    for key in KEYS:
        _accepted_or_trimprune_error(PruneConfig.from_flat, {key: value})


# ----------------------------------------------------------------------------------------------------------------
# Decided outcomes. The tests above only ask for "accepted or TrimpruneError"; the ones below know the answer
# before the config is made: configurations drawn from the documented valid ranges must be accepted with the
# values they were given, and a valid configuration with one field (or one pair of fields) made invalid must be
# rejected with a ConfigError whose one line names that field. The rules are written out here, not read from
# trimprune.config, so that a changed rule there fails a test here.
DECIDED = settings(
    max_examples=100,
    deadline=None,
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much],
)

SCORERS = ["magnitude", "wanda", "sparsegpt"]
ALLOCATIONS = [
    "uniform",
    "owl",
    "alphapruning",
    "atp",
    "layerif",
    "lua",
    "expert",
    "search",
]  # file:PATH
EXPERT_LAYERWISE = ["uniform", "owl", "alphapruning", "atp"]
ALPHA_METRICS = ["alpha_peak", "alpha_mid"]
ALPHA_MAPPINGS = ["block_wise", "per_matrix"]
CALIB_SOURCES = ["c4", "wikitext2", "ptb", "self"]
CALIB_FORMATS = ["txt", "jsonl", "parquet"]
TRIM_LAYER_METRICS = [
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
]
TRIM_DIM_METRICS = ["cosim", "mse", "psnr"]
GRAM_LAYER_METRICS = [
    "cosim_flat",
    "cosim_dim",
    "mse",
    "mse_dim",
    "snr",
]  # what --trim-inputs all allows
GRAM_DIM_METRICS = ["cosim", "mse"]
TRIM_PRECISIONS = ["fp32", "tf32", "bf16"]
LR_SEARCHES = ["auto", "parallel", "sequential"]
TRIM_GUARDS = ["block", "model"]
TRIM_SPARSEGPT = ["counts", "steer"]
SEARCH_SPACES = ["rules", "free", "trim", "experts", "layerif", "lua"]
LAYERIF_HESSIANS = ["datainf", "identity"]
LAYERIF_SCORES = ["positive", "signed"]
SEARCH_OBJECTIVES = ["kl", "nll"]
SEARCH_PRUNERS = ["none", "median"]


def _floats(lo=None, hi=None, *, lo_open=False, hi_open=False):
    """Finite floats in the interval, open ends excluded by comparison (so -0.0 never passes for "< 0")."""
    s = st.floats(
        lo,
        hi,
        allow_nan=False,
        allow_infinity=False,
        exclude_min=lo_open and lo is not None,
        exclude_max=hi_open and hi is not None,
    )
    return s.filter(
        lambda v: (
            (lo is None or (v > lo if lo_open else v >= lo))
            and (hi is None or (v < hi if hi_open else v <= hi))
        )
    )


BIG = 10**12
POSITIVE = _floats(0, lo_open=True) | st.integers(1, BIG)  # > 0
NON_NEGATIVE = _floats(0) | st.integers(0, BIG)  # >= 0
FRACTION = _floats(0, 1, hi_open=True) | st.just(0)  # [0, 1)
UNIT = _floats(0, 1) | st.sampled_from([0, 1])  # [0, 1]
NAME = st.text(max_size=8)
NON_BLANK = st.text(min_size=1, max_size=8).filter(str.strip)

# fields whose valid values do not depend on other fields
FREE = {
    "scorer": st.sampled_from(SCORERS),
    "percdamp": POSITIVE,
    "owl_m": POSITIVE,
    "owl_lambda": FRACTION,
    "alpha_metric": st.sampled_from(ALPHA_METRICS),
    "alpha_eps": FRACTION,
    "alpha_mapping": st.sampled_from(ALPHA_MAPPINGS),
    "alpha_cache_dir": st.none() | NAME,
    "atp_beta": UNIT,
    "layerif_hessian": st.sampled_from(LAYERIF_HESSIANS),
    "layerif_score": st.sampled_from(LAYERIF_SCORES),
    "layerif_damping": POSITIVE,
    "layerif_per_linear": st.booleans(),
    "lua_steps": st.integers(1, BIG),
    "lua_lr": POSITIVE,
    "lua_temperature": _floats(0, 1, lo_open=True) | st.just(1),
    "lua_batch": st.integers(1, BIG),
    "expert_layerwise": st.sampled_from(EXPERT_LAYERWISE),
    "expert_lambda": FRACTION,
    "expert_beta": UNIT,
    "calib_format": st.none() | st.sampled_from(CALIB_FORMATS),
    "seqlen": st.integers(2, BIG),
    "seed": st.integers(-BIG, BIG),
    "trim_input_recalc": st.booleans(),
    "moe_calibration": st.sampled_from(["routed", "all"]),
    "moe_min_tokens": st.integers(0, BIG),
    "trim_iterations": st.integers(1, BIG),
    "trim_lrs": st.lists(POSITIVE, min_size=1, max_size=4),
    "trim_neg_lrs": st.lists(_floats(hi=0, hi_open=True) | st.integers(-BIG, -1), max_size=4),
    "trim_forbid_neg_lr": st.booleans(),
    "trim_safeguard": st.booleans(),
    "trim_block_safeguard": st.booleans(),
    "trim_max_row_sparsity": _floats(0, 1, lo_open=True) | st.just(1),  # (0, 1]
    "trim_precision": st.sampled_from(TRIM_PRECISIONS),
    "trim_lr_search": st.sampled_from(LR_SEARCHES),
    "batch_size": st.integers(0, BIG),
    "keep_checkpoint": st.booleans(),
    "allow_unpruned": st.booleans(),
    "search_objective": st.sampled_from(SEARCH_OBJECTIVES),
    "search_trials": st.integers(1, BIG),
    "search_timeout": NON_NEGATIVE,
    "search_seed": st.integers(-BIG, BIG),
    "search_seeds": st.integers(1, 64),
    "search_rung": _floats(0, 1, lo_open=True, hi_open=True),
    "search_storage": st.none() | st.tuples(NAME, NAME).map("://".join),
    "search_study": st.none() | NON_BLANK,
}
# fields whose valid values depend on others: drawn in valid_configs
DEPENDENT = {
    "sparsity",
    "mask_structure",
    "blocksize",
    "allocation",
    "trim",
    "calib",
    "calib_data",
    "trim_inputs",
    "trim_metric",
    "trim_dim_metric",
    "search_space",
    "trim_guard",
    "trim_sparsegpt",
    "search_pruner",
    "nsamples",
    "search_holdout",
    "layerif_holdout",
    "offload",
    "checkpoint_dir",
    "resume",
}


@st.composite
def valid_configs(draw):
    """(flat config that must be accepted, the flat values it must come out with). Each field is given or
    left at its default; the cross-field rules are respected by construction."""
    flat = {}

    def put(key, strategy):
        if draw(st.booleans()):
            flat[key] = draw(strategy)
        return flat.get(key)

    for key, strategy in FREE.items():
        put(key, strategy)
    nm = draw(
        st.none()
        | st.integers(2, 16).flatmap(lambda m: st.tuples(st.integers(1, m - 1), st.just(m)))
    )
    if nm:  # N:M: sparsity N/M, uniform, no TRIM, blocksize a multiple of M
        n, m = nm
        flat["mask_structure"] = draw(st.sampled_from([f"{n}:{m}", f" {n} : {m} "]))
        flat["blocksize"] = m * draw(st.integers(1, 64))
        put("sparsity", st.sampled_from([None, n / m]))
        put("allocation", st.just("uniform"))
        put("trim", st.just(False))
    else:
        put("mask_structure", st.sampled_from([None, "", "unstructured"]))
        put("blocksize", st.integers(1, BIG))
        put("sparsity", st.none() | FRACTION)
        put(
            "allocation",
            st.sampled_from(ALLOCATIONS) | st.text(min_size=1, max_size=8).map("file:".__add__),
        )
        put("trim", st.booleans())
    allocation, trim = flat.get("allocation", "uniform"), flat.get("trim", False)
    search = allocation == "search"

    source = put("calib", st.sampled_from(CALIB_SOURCES)) or "c4"
    put("calib_data", st.sampled_from([None, ""]) if source == "self" else st.none() | NAME)

    inputs = (
        put(
            "trim_inputs",
            st.sampled_from(["all", "last-token"]) | st.integers(1, BIG).map("sample:{}".format),
        )
        or "all"
    )
    gram_only = trim and inputs == "all"
    put("trim_metric", st.sampled_from(GRAM_LAYER_METRICS if gram_only else TRIM_LAYER_METRICS))
    put("trim_dim_metric", st.sampled_from(GRAM_DIM_METRICS if gram_only else TRIM_DIM_METRICS))

    parts = draw(
        st.none()
        | st.lists(st.sampled_from(SEARCH_SPACES), min_size=1, max_size=4).filter(
            lambda p: bool(set(p) & {"rules", "free", "layerif", "lua"})
        )
    )
    if parts is not None:
        flat["search_space"] = draw(st.sampled_from([",", ", "])).join(parts)
    trim_searched = search and "trim" in (parts or [])
    guard = (
        put("trim_guard", st.sampled_from(TRIM_GUARDS if trim or trim_searched else ["block"]))
        or "block"
    )
    whole_model = (
        search or guard == "model"
    )  # prunes the whole model more than once; holds sequences out
    layerif = allocation == "layerif" or (search and "layerif" in (parts or []))
    if whole_model or layerif:
        nsamples = flat["nsamples"] = draw(st.integers(2, 10**4))
    if whole_model:
        put("search_holdout", st.integers(0, nsamples - 1))  # 0: nsamples // 8, at least 1
    else:
        if not layerif:
            put("nsamples", st.integers(1, BIG))
        put("search_holdout", st.integers(0, BIG))
    if layerif:  # its validation sequences held out of the influence functions' examples
        put("layerif_holdout", st.integers(0, nsamples - 1))
    else:
        put("layerif_holdout", st.integers(0, BIG))
    pruner = put("search_pruner", st.sampled_from(SEARCH_PRUNERS if search else ["none"]))
    offload = put(
        "offload",
        st.sampled_from(
            [False]
            if layerif
            or allocation == "lua"
            or (search and "lua" in (parts or []))
            or pruner not in (None, "none")
            else [False, True, "cpu"] + ([] if whole_model else ["disk"])
        ),
    )
    if not whole_model and offload != "disk":
        put("checkpoint_dir", st.none() | NON_BLANK)
    put("resume", st.booleans() if flat.get("checkpoint_dir") else st.just(False))
    put(
        "trim_sparsegpt",
        st.sampled_from(TRIM_SPARSEGPT if flat.get("scorer") == "sparsegpt" else ["counts"]),
    )

    want = dict(flat)
    if flat.get("offload") is True:  # the boolean of earlier recipes means cpu
        want["offload"] = "cpu"
    if flat.get("sparsity") is None:  # left out: N/M, else 0.5; an allocation file's own mean
        want["sparsity"] = (
            None if allocation.startswith("file:") else (nm[0] / nm[1] if nm else 0.5)
        )
    return flat, want


def test_the_rules_here_cover_every_config_field():
    assert set(FREE) | DEPENDENT == set(INVALID) == set(PruneConfig.flat_fields())


@DECIDED
@given(valid_configs(), st.booleans())
def test_valid_configs_are_accepted_with_their_values(case, dashes):
    flat, want = case
    given_flat = {k.replace("_", "-") if dashes else k: v for k, v in flat.items()}
    cfg = PruneConfig.from_flat(given_flat)
    got = cfg.to_flat()
    assert {k: got[k] for k in want} == want
    nm = flat.get("mask_structure")
    if nm and nm != "unstructured":
        assert cfg.nm == tuple(int(x) for x in nm.split(":"))
    assert PruneConfig.from_dict(cfg.to_dict()) == cfg  # the nested form gives the same config


@pytest.mark.parametrize(
    "kwargs,check",
    [
        (
            {
                "sparsity": None,
                "allocation": "file:/x",
                "trim": True,
            },  # the file's own mean; TRIM on all tokens
            lambda c: c.sparsity is None and c.trim.enabled and c.allocation.method == "file:/x",
        ),
        ({"scorer": {"name": "wanda"}}, lambda c: c.scorer.name == "wanda"),
        ({"calib": {"nsamples": 8}}, lambda c: c.calib.nsamples == 8 and c.calib.source == "c4"),
        (
            {"scorer": "sparsegpt", "allocation": "owl", "calib": "self", "trim": True},
            lambda c: (
                (c.scorer.name, c.allocation.method, c.calib.source, c.trim.enabled)
                == ("sparsegpt", "owl", "self", True)
            ),
        ),
        ({"mask_structure": "2:4"}, lambda c: c.sparsity == 0.5 and c.nm == (2, 4)),
        (
            {"mask_structure": "1:4", "sparsity": 0.25, "scorer": {"blocksize": 64}},
            lambda c: c.scorer.blocksize == 64,
        ),
        (
            {"allocation": "search", "search": {"space": "rules,trim"}, "trim": {"guard": "model"}},
            lambda c: c.holdout == 16 and c.search_spaces == ("rules", "trim"),
        ),
        ({"run": {"offload": True}}, lambda c: c.run.offload == "cpu"),
    ],
)
def test_nested_configs_that_must_pass(kwargs, check):
    assert check(PruneConfig(**kwargs))
    assert check(PruneConfig.from_dict(kwargs))  # a recipe's nested form


def test_nested_recipe_values_are_checked_like_flat_ones():
    with pytest.raises(ConfigError, match=r"^calib\.nsamples '8' must be an integer"):
        PruneConfig.from_yaml("calib: {nsamples: '8'}\n")


def _value_shown(value) -> str:
    return " ".join(repr(value).split())[:40]


def _names_field(msg: str, key: str) -> bool:
    """The message names the field: by its Python name (`trim.iterations`), its flat name or its
    flag (messages without field tokens)."""
    dashed = key.replace("_", "-")
    part, f = PruneConfig.flat_fields()[key]
    python = f.name if part is None else f"{part}.{f.name}"
    return any(
        re.search(rf"(?<![\w.-]){re.escape(name)}(?![\w-])", msg)
        for name in (python, key, f"--{dashed}", f"--no-{dashed}")
    )


def _shown(strategy):  # the message shows the value
    return strategy.map(lambda v: (v, True))


def _hidden(strategy):  # the message names the field only
    return strategy.map(lambda v: (v, False))


def _one_of_values(*values):
    return st.sampled_from(values)


NONFINITE = _one_of_values(float("nan"), float("inf"), float("-inf"))
NOT_BOOL = _one_of_values(0, 1, "true", "no", None, 1.0, [])
NOT_INT = _one_of_values(True, False, None, 2.0, 0.5, "8", "", [1]) | NONFINITE
NOT_FLOAT = _one_of_values(True, False, None, "0.5", "1e-3", "", [0.5], {}) | NONFINITE
NOT_OPT_FLOAT = _one_of_values(True, False, "0.5", [0.5]) | NONFINITE
NOT_STR = _one_of_values(None, 5, 2.5, True, False, ["x"])
NOT_OPT_STR = _one_of_values(5, 2.5, True, ["x"], {})
NOT_FLOATS = _one_of_values(
    0.1, "0.1", [True], ["0.1"], [None], [float("nan")], [0.1, float("inf")]
)
LETTERS = st.text(alphabet="abcdefghijklmnopqrstuvwxyz:_- ", max_size=10)  # no digits


def _not_in(choices, wrong_type=NOT_STR):
    return _shown(wrong_type | NAME.filter(lambda s: s not in choices))


def _lists_with(bad, good):
    return st.tuples(st.lists(good, max_size=2), bad, st.integers(0, 2)).map(
        lambda t: t[0][: t[2]] + [t[1]] + t[0][t[2] :]
    )


# one invalid value per field, valid or not whatever the other fields are: (value, whether the message shows it)
INVALID = {
    "sparsity": _shown(
        NOT_OPT_FLOAT
        | _floats(hi=0, hi_open=True)
        | _floats(lo=1)
        | st.integers(1, BIG)
        | st.integers(-BIG, -1)
    ),
    "mask_structure": _shown(
        _one_of_values(
            124,
            2.5,
            True,
            ["2:4"],
            "2:2",
            "4:2",
            "0:4",
            "2:0",
            "2/4",
            "2:",
            ":4",
            "2:4:8",
            "-1:4",
            "24",
            "two:four",
        )
        | LETTERS.filter(lambda s: s not in ("", "unstructured"))
    ),
    "scorer": _not_in(SCORERS),
    "blocksize": _shown(NOT_INT | st.integers(-BIG, 0)),
    "percdamp": _shown(NOT_FLOAT | _floats(hi=0) | st.integers(-BIG, 0)),
    "allocation": _shown(
        NOT_STR
        | _one_of_values("file:", "file", "OWL", "alpha", "")
        | NAME.filter(lambda s: s not in ALLOCATIONS and not (s.startswith("file:") and len(s) > 5))
    ),
    "owl_m": _shown(NOT_FLOAT | _floats(hi=0) | st.integers(-BIG, 0)),
    "owl_lambda": _shown(
        NOT_FLOAT | _floats(hi=0, hi_open=True) | _floats(lo=1) | st.integers(1, BIG)
    ),
    "alpha_metric": _not_in(ALPHA_METRICS),
    "alpha_eps": _shown(
        NOT_FLOAT | _floats(hi=0, hi_open=True) | _floats(lo=1) | st.integers(1, BIG)
    ),
    "alpha_mapping": _not_in(ALPHA_MAPPINGS),
    "alpha_cache_dir": _shown(NOT_OPT_STR),
    "layerif_hessian": _not_in(LAYERIF_HESSIANS),
    "layerif_score": _not_in(LAYERIF_SCORES),
    "layerif_damping": _shown(NOT_FLOAT | _floats(hi=0) | st.integers(-BIG, 0)),
    "layerif_per_linear": _shown(NOT_BOOL),
    "layerif_holdout": _shown(NOT_INT | st.integers(-BIG, -1)),
    "lua_steps": _shown(NOT_INT | st.integers(-BIG, 0)),
    "lua_lr": _shown(NOT_FLOAT | _floats(hi=0) | st.integers(-BIG, 0)),
    "lua_temperature": _shown(
        NOT_FLOAT | _floats(hi=0) | _floats(lo=1, lo_open=True) | st.integers(2, BIG)
    ),
    "lua_batch": _shown(NOT_INT | st.integers(-BIG, 0)),
    "atp_beta": _shown(
        NOT_FLOAT | _floats(hi=0, hi_open=True) | _floats(lo=1, lo_open=True) | st.integers(2, BIG)
    ),
    "expert_layerwise": _not_in(EXPERT_LAYERWISE),
    "expert_lambda": _shown(
        NOT_FLOAT | _floats(hi=0, hi_open=True) | _floats(lo=1) | st.integers(1, BIG)
    ),
    "expert_beta": _shown(
        NOT_FLOAT | _floats(hi=0, hi_open=True) | _floats(lo=1, lo_open=True) | st.integers(2, BIG)
    ),
    "calib": _not_in(CALIB_SOURCES),
    "calib_data": _shown(NOT_OPT_STR),
    "calib_format": _shown(NOT_OPT_STR | NAME.filter(lambda s: s not in CALIB_FORMATS)),
    "nsamples": _shown(NOT_INT | st.integers(-BIG, 0)),
    "seqlen": _shown(NOT_INT | st.integers(-BIG, 1)),
    "seed": _shown(NOT_INT),
    "trim_input_recalc": _shown(NOT_BOOL),
    "moe_calibration": _not_in(["routed", "all"]),
    "moe_min_tokens": _shown(NOT_INT | st.integers(-BIG, -1)),
    "trim": _shown(NOT_BOOL),
    "trim_inputs": _shown(
        NOT_STR
        | _one_of_values(
            "sample:0", "sample:", "sample:-1", "sample:x", "sample", "last", "ALL", "all ", ""
        )
        | LETTERS.filter(lambda s: s not in ("all", "last-token"))
    ),
    "trim_iterations": _shown(NOT_INT | st.integers(-BIG, 0)),
    "trim_metric": _not_in(TRIM_LAYER_METRICS),
    "trim_dim_metric": _not_in(TRIM_DIM_METRICS),
    "trim_lrs": _shown(
        NOT_FLOATS | st.just([]) | _lists_with(_floats(hi=0) | st.integers(-BIG, 0), POSITIVE)
    ),
    "trim_neg_lrs": _shown(
        NOT_FLOATS | _lists_with(_floats(lo=0) | st.integers(0, BIG), _floats(hi=0, hi_open=True))
    ),
    "trim_forbid_neg_lr": _shown(NOT_BOOL),
    "trim_safeguard": _shown(NOT_BOOL),
    "trim_block_safeguard": _shown(NOT_BOOL),
    "trim_max_row_sparsity": _shown(
        NOT_FLOAT
        | _floats(hi=0)
        | _floats(lo=1, lo_open=True)
        | st.integers(-BIG, 0)
        | st.integers(2, BIG)
    ),
    "trim_precision": _not_in(TRIM_PRECISIONS),
    "trim_lr_search": _not_in(LR_SEARCHES),
    "trim_guard": _not_in(TRIM_GUARDS),
    "trim_sparsegpt": _not_in(TRIM_SPARSEGPT),
    "batch_size": _shown(NOT_INT | st.integers(-BIG, -1)),
    "offload": _shown(_one_of_values(None, 0, 1, 2.5, ["cpu"], "gpu", "CPU", "", "true")),
    "checkpoint_dir": _shown(NOT_OPT_STR) | _hidden(_one_of_values("", " ", "\t ")),
    "resume": _shown(NOT_BOOL),
    "keep_checkpoint": _shown(NOT_BOOL),
    "allow_unpruned": _shown(NOT_BOOL),
    "search_space": _shown(
        NOT_STR
        | _one_of_values("", ",", " , ", "rules,bogus", "RULES", "rules;free")
        | LETTERS.filter(
            lambda s: (
                not {p.strip() for p in s.split(",") if p.strip()} <= set(SEARCH_SPACES)
                or not s.strip(", ")
            )
        )
    )
    | _hidden(_one_of_values("trim", " trim ", "trim,trim", "experts", "trim,experts")),
    "search_objective": _not_in(SEARCH_OBJECTIVES),
    "search_holdout": _shown(NOT_INT | st.integers(-BIG, -1)),
    "search_trials": _shown(NOT_INT | st.integers(-BIG, 0)),
    "search_timeout": _shown(NOT_FLOAT | _floats(hi=0, hi_open=True) | st.integers(-BIG, -1)),
    "search_seed": _shown(NOT_INT),
    "search_seeds": _shown(NOT_INT | st.integers(-BIG, 0) | st.integers(65, BIG)),
    "search_pruner": _not_in(SEARCH_PRUNERS),
    "search_rung": _shown(NOT_FLOAT | _floats(hi=0) | _floats(lo=1)),
    "search_storage": _shown(NOT_OPT_STR | NAME.filter(lambda s: "://" not in s)),
    "search_study": _shown(NOT_OPT_STR) | _hidden(_one_of_values("", " ", "\t")),
}


def _rejected(flat, key, value, shown, build=PruneConfig.from_flat):
    with pytest.raises(ConfigError) as e:
        build(flat)
    msg = str(e.value)
    assert msg and "\n" not in msg, repr(msg)
    assert _names_field(msg, key), (key, msg)
    if shown:
        assert _value_shown(value) in msg, (value, msg)


@pytest.mark.parametrize("key", sorted(INVALID))
@settings(DECIDED, max_examples=4)
@given(base=valid_configs(), data=st.data())
def test_one_invalid_field_is_rejected_naming_it(key, base, data):
    """A valid config with one field replaced by a value outside its type or range."""
    value, shown = data.draw(INVALID[key], label=key)
    _rejected({**base[0], key: value}, key, value, shown)


# the ends of every range, always tried (a handful of random examples may miss an off-by-one)
EDGES_INVALID = [
    ("sparsity", 1),
    ("sparsity", 1.0),
    ("sparsity", -1e-12),
    ("sparsity", float("nan")),
    ("sparsity", "0.5"),
    ("mask_structure", "2:2"),
    ("mask_structure", "0:4"),
    ("mask_structure", 24),
    ("blocksize", 0),
    ("blocksize", True),
    ("blocksize", 128.0),
    ("percdamp", 0),
    ("percdamp", -0.0),
    ("owl_m", 0.0),
    ("owl_lambda", 1),
    ("owl_lambda", -1e-12),
    ("alpha_eps", 1.0),
    ("alpha_eps", -1e-12),
    ("atp_beta", 1 + 1e-9),
    ("atp_beta", -1e-12),
    ("allocation", "file:"),
    ("nsamples", 0),
    ("nsamples", 8.0),
    ("seqlen", 1),
    ("seed", "0"),
    ("trim", "false"),
    ("trim_inputs", "sample:0"),
    ("trim_iterations", 0),
    ("trim_lrs", []),
    ("trim_lrs", [0.0]),
    ("trim_lrs", [0.1, -0.0]),
    ("trim_neg_lrs", [0.0]),
    ("trim_neg_lrs", [-0.1, -0.0]),
    ("trim_max_row_sparsity", 0),
    ("trim_max_row_sparsity", 1 + 1e-9),
    ("batch_size", -1),
    ("offload", "no"),
    ("checkpoint_dir", " "),
    ("search_space", "trim"),
    ("search_space", ""),
    ("search_holdout", -1),
    ("search_trials", 0),
    ("search_timeout", -1e-12),
    ("search_rung", 0),
    ("search_rung", 1),
    ("search_storage", "sqlite:/x.db"),
    ("search_study", " "),
]
EDGES_VALID = [
    ("sparsity", 0),
    ("sparsity", 0.0),
    ("sparsity", 0.9999999),
    ("mask_structure", "1:2"),
    ("mask_structure", "15:16"),
    ("blocksize", 1),
    ("percdamp", 5e-324),
    ("owl_m", 1e-300),
    ("owl_lambda", 0),
    ("owl_lambda", 0.9999999),
    ("alpha_eps", 0),
    ("alpha_eps", 0.9999999),
    ("atp_beta", 0),
    ("atp_beta", 1),
    ("allocation", "file:x"),
    ("nsamples", 1),
    ("seqlen", 2),
    ("seed", -1),
    ("trim_inputs", "sample:1"),
    ("trim_iterations", 1),
    ("trim_lrs", [5e-324]),
    ("trim_neg_lrs", []),
    ("trim_neg_lrs", [-5e-324]),
    ("trim_max_row_sparsity", 1),
    ("trim_max_row_sparsity", 5e-324),
    ("batch_size", 0),
    ("offload", False),
    ("search_space", "free"),
    ("search_space", "rules,trim"),
    ("search_holdout", 0),
    ("search_trials", 1),
    ("search_timeout", 0),
    ("search_rung", 5e-324),
    ("search_rung", 0.9999999),
    ("search_storage", "a://"),
    ("search_study", "s"),
]


@pytest.mark.parametrize("key,value", EDGES_INVALID)
def test_values_just_outside_a_range_are_rejected(key, value):
    shown = (key, value) not in [
        ("checkpoint_dir", " "),
        ("search_space", "trim"),
        ("search_study", " "),
    ]
    _rejected({key: value}, key, value, shown)


@pytest.mark.parametrize("key,value", EDGES_VALID)
def test_values_at_the_ends_of_a_range_are_accepted(key, value):
    assert PruneConfig.from_flat({key: value}).to_flat()[key] == value


@settings(DECIDED, max_examples=40)
@given(
    st.integers(2, 16).flatmap(lambda m: st.tuples(st.integers(1, m - 1), st.just(m))), st.data()
)
def test_fields_that_contradict_n_m_are_rejected(nm, data):
    """--mask-structure N:M fixes every row's sparsity: a different --sparsity, --trim, a non-uniform
    allocation or a blocksize that is not a multiple of M is an error naming both."""
    n, m = nm
    flat = {"mask_structure": f"{n}:{m}", "blocksize": m * data.draw(st.integers(1, 64))}
    key = data.draw(st.sampled_from(["sparsity", "trim", "allocation", "blocksize"]))
    value = data.draw(
        {
            "sparsity": FRACTION.filter(lambda s: abs(s - n / m) > 1e-6),
            "trim": st.just(True),
            "allocation": st.sampled_from(ALLOCATIONS[1:] + ["file:a.json"]),
            "blocksize": st.tuples(st.integers(0, 64), st.integers(1, m - 1)).map(
                lambda t: t[0] * m + t[1]
            ),
        }[key],
        label=key,
    )
    flat[key] = value
    _rejected(flat, key, None, False)
    _rejected(flat, "mask_structure", None, False)


@settings(DECIDED, max_examples=30)
@given(
    st.integers(1, 64).flatmap(lambda n: st.tuples(st.just(n), st.integers(n, 2 * n + 8))),
    st.sampled_from([{"allocation": "search"}, {"trim": True, "trim_guard": "model"}]),
)
def test_a_holdout_that_leaves_no_sequence_is_rejected(nsamples_holdout, whole_model):
    nsamples, holdout = nsamples_holdout
    flat = {**whole_model, "nsamples": nsamples, "search_holdout": holdout}
    _rejected(flat, "search_holdout", None, False)
    _rejected(flat, "nsamples", None, False)


# pairs of fields that are each valid alone; the message names both (regular expression)
CONFLICTS = [
    (
        {"mask_structure": "2:4", "allocation": "file:/x"},
        r"allocation\.method file:/x .*mask_structure 2:4",
    ),
    (
        {"sparsity": None, "allocation": "file:/x", "mask_structure": "4:8"},
        r"allocation\.method file:/x .*mask_structure 4:8",
    ),
    ({"mask_structure": "2:4", "sparsity": 0.6}, r"mask_structure 2:4 .*sparsity is 0.6"),
    ({"mask_structure": "2:4", "trim": True}, r"trim\.enabled .*mask_structure 2:4"),
    ({"mask_structure": "4:8", "blocksize": 12}, r"scorer\.blocksize 12 .*M=8"),
    ({"trim_guard": "model"}, r"trim\.guard model .*add trim\.enabled"),
    (
        {"trim_sparsegpt": "steer", "scorer": "wanda"},
        r"trim\.sparsegpt steer .*not scorer\.name wanda's: add scorer\.name sparsegpt",
    ),
    (
        {"trim_guard": "model", "allocation": "search", "search_space": "rules,free"},
        r"trim\.guard model .*trim\.enabled",
    ),
    ({"allocation": "search", "nsamples": 1}, r"search\.holdout 1 .*calib\.nsamples 1"),
    (
        {"trim": True, "trim_guard": "model", "nsamples": 8, "search_holdout": 8},
        r"search\.holdout 8 .*calib\.nsamples 8",
    ),
    (
        {"allocation": "search", "checkpoint_dir": "ck"},
        r"run\.checkpoint_dir .*allocation\.method search",
    ),
    (
        {"trim": True, "trim_guard": "model", "checkpoint_dir": "ck"},
        r"run\.checkpoint_dir .*trim\.guard model",
    ),
    ({"allocation": "search", "offload": "disk"}, r"run\.offload disk .*allocation\.method search"),
    (
        {"trim": True, "trim_guard": "model", "offload": "disk"},
        r"run\.offload disk .*trim\.guard model",
    ),
    ({"offload": "disk", "checkpoint_dir": "ck"}, r"run\.checkpoint_dir .*run\.offload disk"),
    ({"resume": True}, r"run\.resume .*run\.checkpoint_dir"),
    ({"resume": True, "checkpoint_dir": ""}, r"run\.resume .*run\.checkpoint_dir"),
    ({"calib": "self", "calib_data": "c.txt"}, r"calib\.source self .*calib\.data"),
    ({"trim": True, "trim_metric": "mae"}, r"trim\.metric mae .*trim\.inputs all"),
    ({"trim": True, "trim_dim_metric": "psnr"}, r"trim\.dim_metric psnr .*trim\.inputs all"),
    ({"search_space": "trim"}, r"search\.space trim needs rules or free"),
    (
        {"allocation": "layerif", "nsamples": 1},
        r"allocation\.layerif_holdout 1 .*calib\.nsamples 1",
    ),
    (
        {"allocation": "layerif", "nsamples": 8, "layerif_holdout": 8},
        r"allocation\.layerif_holdout 8 .*calib\.nsamples 8",
    ),
    ({"allocation": "layerif", "offload": "cpu"}, r"allocation\.method layerif .*run\.offload"),
    (
        {"allocation": "search", "search_space": "rules,layerif", "offload": "cpu"},
        r"search\.space rules,layerif .*run\.offload",
    ),
    (
        {"scorer": {"name": "wanda"}},
        r"^scorer\.name \{'name': 'wanda'\} must be a string",
    ),  # flat names take no parts
    ({"calib": {"nsamples": "8"}}, r"^calib\.source \{'nsamples': '8'\} must be a string"),
    ({"sparsity_target": 0.5}, r"^recipe key 'sparsity_target' is unknown"),
]


@pytest.mark.parametrize("flat,pattern", CONFLICTS)
def test_conflicting_flat_configs_are_rejected(flat, pattern):
    import yaml

    builds = [PruneConfig.from_flat]
    if not any(
        isinstance(v, dict) for v in flat.values()
    ):  # a recipe may nest: scorer: {name: wanda}
        builds.append(lambda f: PruneConfig.from_yaml(yaml.safe_dump(f) + "\n"))
    for build in builds:
        with pytest.raises(ConfigError, match=pattern) as e:
            build(flat)
        assert "\n" not in str(e.value)


@pytest.mark.parametrize(
    "kwargs,error,pattern",
    [
        (
            {"calib": {"nsamples": "8"}},
            ConfigError,
            r"^calib\.nsamples '8' must be an integer \(YAML reads 8 as text",
        ),
        ({"trim": {"bogus": 1}}, ConfigError, r"^trim\.bogus is unknown"),
        ({"run": "fast"}, ConfigError, r"^run 'fast' must be a RunConfig"),
        ({"search": 3}, ConfigError, r"^search 3 must be a SearchConfig"),
        ({"scorer": "bogus"}, ConfigError, r"^scorer\.name 'bogus' is unknown"),
        (
            {"mask_structure": "2:4", "scorer": {"blocksize": 6}},
            ConfigError,
            r"^scorer\.blocksize 6 must be a multiple of M=4",
        ),
    ],
)
def test_nested_configs_that_must_be_rejected(kwargs, error, pattern):
    with pytest.raises(error, match=pattern) as e:
        PruneConfig(**kwargs)
    assert type(e.value) is error and "\n" not in str(e.value)


@pytest.mark.parametrize(
    "text,pattern",
    [
        ("sparsity: [0.5\n", r"^recipe 'sparsity: \[0.5\\n' is not valid YAML"),
        ("/nonexistent/recipe.yaml", r"^--recipe '/nonexistent/recipe.yaml' does not exist"),
    ],
)
def test_unreadable_recipes_are_input_file_errors(text, pattern):
    with pytest.raises(InputFileError, match=pattern):
        PruneConfig.from_yaml(text)
