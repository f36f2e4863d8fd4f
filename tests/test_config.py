"""PruneConfig: parts that validate themselves, flat and nested recipes, typed fields, generated flags."""

import dataclasses

import pytest

from trimprune import PruneConfig, TrimConfig, TrimpruneError
from trimprune.cli import build_parser, config_from_args


def test_flat_and_nested_recipes_give_the_same_config():
    flat = PruneConfig.from_yaml(
        "scorer: sparsegpt\nsparsity: 0.7\ntrim: true\ntrim_inputs: sample:64\n"
        "nsamples: 16\nowl_m: 7\n"
    )
    nested = PruneConfig.from_yaml(
        "scorer: {name: sparsegpt}\nsparsity: 0.7\ntrim: {enabled: true, inputs: "
        "'sample:64'}\ncalib: {nsamples: 16}\nallocation: {owl_m: 7}\n"
    )
    assert (
        flat
        == nested
        == PruneConfig(
            scorer="sparsegpt",
            sparsity=0.7,
            trim=TrimConfig(enabled=True, inputs="sample:64"),
            calib={"nsamples": 16},
            allocation={"owl_m": 7},
        )
    )
    assert PruneConfig.from_yaml(nested.to_yaml()) == nested
    assert PruneConfig.from_flat(nested.to_flat()) == nested
    assert nested.trim.input_mode.sample == 64


@pytest.mark.parametrize(
    "text,needle",
    [
        ("trim: 'false'", "trim.enabled 'false' must be true or false"),
        ("offload: 'no'", "run.offload 'no' is unknown: choose one of cpu, disk or false"),
        ("seed: abc", "seed 'abc' must be an integer"),
        ("blocksize: true", "blocksize True must be an integer"),
        ("mask_structure: 2:4", "quote it"),  # YAML 1.1 reads 2:4 as the integer 124
        ("percdamp: x", "percdamp 'x' must be a number"),
        ("trim_lrs: abc", "trim.lrs 'abc' must be a list of numbers"),
        ("allocation: 5", "allocation.method 5 must be a string"),
        ("trim: {inputs: all, speed: 3}", "trim.speed is unknown"),
        ("sparsty: 0.5", "recipe key 'sparsty' is unknown"),
    ],
)
def test_recipe_values_of_the_wrong_type_are_one_line_errors(text, needle):
    with pytest.raises(TrimpruneError, match=None) as e:
        PruneConfig.from_yaml(text + "\n")
    assert needle in str(e.value) and "\n" not in str(e.value), str(e.value)


def test_parts_validate_themselves_when_made_or_replaced():
    cfg = PruneConfig(trim=True)
    with pytest.raises(TrimpruneError, match="trim.iterations 0"):
        dataclasses.replace(cfg.trim, iterations=0)
    with pytest.raises(TrimpruneError, match="need explicit outputs"):
        dataclasses.replace(cfg, trim=dataclasses.replace(cfg.trim, metric="mae"))
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.trim.iterations = 3
    assert (
        PruneConfig(mask_structure="2:4").sparsity == 0.5
        and PruneConfig(mask_structure="1:4").sparsity == 0.25
    )


def test_every_config_field_has_a_generated_flag():
    parser = build_parser()
    prune = next(
        a for a in parser._subparsers._group_actions[0].choices.values() if a.prog.endswith("prune")
    )
    dests = {a.dest for a in prune._actions}
    assert set(PruneConfig.flat_fields()) <= dests
    args = parser.parse_args(
        [
            "prune",
            "--model",
            "m",
            "--output",
            "o",
            "--trim",
            "--trim-lrs",
            "0.1",
            "0.3",
            "--no-trim-block-safeguard",
            "--owl-m",
            "4",
            "--offload",
        ]
    )
    cfg = config_from_args(args)
    assert cfg.trim.lrs == (0.1, 0.3) and not cfg.trim.block_safeguard and cfg.trim.safeguard
    assert cfg.allocation.owl_m == 4.0 and cfg.run.offload and cfg.sparsity == 0.5
    cfg = config_from_args(
        parser.parse_args(["prune", "--model", "m", "--output", "o", "--mask-structure", "1:4"])
    )
    assert cfg.sparsity == 0.25 and cfg.nm == (1, 4)
    help_text = prune.format_help()
    assert (
        "--trim-max-row-sparsity" in help_text
        and "upper bound of every row's sparsity" in help_text
    )


def test_errors_name_the_python_field_and_the_cli_prints_the_flag(capsys):
    from trimprune.cli import main
    from trimprune.errors import ConfigError

    with pytest.raises(ConfigError) as e:
        TrimConfig(iterations=0)
    assert "trim.iterations 0" in str(e.value) and "--trim-iterations" not in str(e.value)
    assert e.value.fields == ("trim_iterations",)
    assert e.value.cli_message() == "--trim-iterations 0 must be an integer >= 1"
    with pytest.raises(ConfigError) as e:
        PruneConfig(sparsity=1.5)
    assert str(e.value).startswith("sparsity 1.5 is outside")
    assert main(["prune", "--model", "m", "--output", "o", "--trim-iterations", "0"]) == 2
    err = [line for line in capsys.readouterr().err.splitlines() if line]
    assert err == ["trimprune: error: --trim-iterations 0 must be an integer >= 1"], err


def test_a_message_with_two_fields_renders_both():
    from trimprune.errors import ConfigError

    with pytest.raises(ConfigError) as e:
        PruneConfig(allocation="search", calib={"nsamples": 8}, search={"holdout": 8})
    assert e.value.fields == ("search_holdout", "nsamples")
    assert str(e.value) == (
        "search.holdout 8 leaves no calibration sequence to prune with out of calib.nsamples 8: "
        "use more calib.nsamples or a smaller search.holdout"
    )
    assert e.value.cli_message() == (
        "--search-holdout 8 leaves no calibration sequence to prune with out of --nsamples 8: "
        "use more --nsamples or a smaller --search-holdout"
    )


def test_plain_messages_and_other_braces_stay_as_they_are():
    e = TrimpruneError("  --output 'x' is\n a file: {not_a_field} {seqlen}  ")
    assert e.fields == ("seqlen",)
    assert str(e) == "--output 'x' is a file: {not_a_field} calib.seqlen"
    assert e.cli_message() == "--output 'x' is a file: {not_a_field} --seqlen"
    plain = TrimpruneError("--model 'x' does not exist")
    assert str(plain) == plain.cli_message() == "--model 'x' does not exist"
    assert plain.fields == ()


def test_every_shipped_recipe_loads():
    """The recipes in recipes/ are valid configs (what `--recipe` reads)."""
    from pathlib import Path

    paths = sorted((Path(__file__).resolve().parents[1] / "recipes").glob("*.yaml"))
    assert len(paths) >= 3
    for p in paths:
        cfg = PruneConfig.from_yaml(str(p))
        assert cfg.sparsity is not None or cfg.mask_structure, p
    lua = PruneConfig.from_yaml(str(paths[0].parent / "lua-wanda-70.yaml"))
    assert lua.allocation.method == "lua" and lua.allocation.lua_steps == 100 and lua.trim.enabled
