"""Property: random config values and random file contents given to the validation layer are accepted or
end in `TrimpruneError` (one line for the command line), never another exception."""

import gzip
import io
import json
import tempfile
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from trimprune import PruneConfig
from trimprune.algo.allocation.base import from_file, read_allocation_file
from trimprune.calib.data import probe_rows, read_rows
from trimprune.errors import TrimpruneError
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


@pytest.mark.parametrize(
    "flat",
    [
        {"mask_structure": "2:4", "allocation": "file:/x"},
        {"sparsity": None, "allocation": "file:/x", "mask_structure": "4:8"},
        {"sparsity": None, "allocation": "file:/x", "trim": True},
        {"scorer": {"name": "wanda"}},
        {"calib": {"nsamples": "8"}},
    ],
)
def test_combinations(flat):
    _accepted_or_trimprune_error(PruneConfig.from_flat, flat)
    _accepted_or_trimprune_error(lambda kw: PruneConfig(**kw), flat)
