"""Compact checkpoints: bitmask + kept values, an exact round trip, the size bound, dense export."""

import pytest
import torch
from transformers import AutoModelForCausalLM

from tiny_models import calib, make
from trimprune import PruneConfig, load_pruned, prune
from trimprune.cli import main
from trimprune.io.compact import COMPACT_FILE
from trimprune.io.export import write_outputs
from trimprune.io.report import build_report, markdown


def _pruned(family, sparsity, dtype=torch.float32):
    model = make(family)
    res = prune(
        model,
        None,
        PruneConfig.from_flat(dict(scorer="wanda", sparsity=sparsity, nsamples=4, seqlen=16)),
        calibration=calib(4, 16),
        progress=False,
    )
    return model.to(dtype), res


@pytest.mark.parametrize("family", ["llama", "gpt2", "opt", "gemma3"])
def test_compact_round_trip_gives_identical_logits(family, tmp_path):
    model, res = _pruned(family, 0.6)
    rep = build_report(res, {"source": family}, {"perplexity": {}}, res.timings)
    write_outputs(tmp_path / "c", model, None, res, rep, markdown(rep), save_format="compact")
    assert (tmp_path / "c" / COMPACT_FILE).is_file() and not (
        tmp_path / "c" / "model.safetensors"
    ).exists()
    loaded = load_pruned(tmp_path / "c")
    assert type(loaded) is type(model)
    ids = calib(3, 16, seed=9)
    with torch.no_grad():
        torch.testing.assert_close(
            loaded(input_ids=ids).logits, model(input_ids=ids).logits, rtol=0, atol=0
        )
    for name, p in model.state_dict().items():
        assert torch.equal(loaded.state_dict()[name], p), name
    assert main(["export", "--dense", str(tmp_path / "c"), str(tmp_path / "d")]) == 0
    dense = AutoModelForCausalLM.from_pretrained(tmp_path / "d").eval()
    with torch.no_grad():
        torch.testing.assert_close(
            dense(input_ids=ids).logits, model(input_ids=ids).logits, rtol=0, atol=0
        )


def test_pruned_linears_take_at_most_040_of_their_dense_bytes_at_70_percent_fp16(tmp_path):
    from safetensors import safe_open

    model, res = _pruned("llama", 0.7, torch.float16)
    write_outputs(tmp_path / "c", model, None, res, {}, "", save_format="compact")
    compact = dense = 0
    with safe_open(str(tmp_path / "c" / COMPACT_FILE), framework="pt") as f:
        for name in res.layers:
            compact += sum(
                f.get_tensor(f"{name}.weight.{k}").numel() * (1 if k == "mask" else 2)
                for k in ("mask", "values")
            )
            dense += res.layers[name].numel * 2
    assert compact / dense <= 0.40, compact / dense
    assert compact / dense == pytest.approx(1 / 16 + 0.3, abs=0.01)


def test_export_refuses_a_folder_without_a_model(tmp_path, capsys):
    (tmp_path / "run").mkdir()
    assert main(["export", "--dense", str(tmp_path / "run"), str(tmp_path / "out")]) == 2
    assert "holds no model" in capsys.readouterr().err and not (tmp_path / "out").exists()


def test_eval_reads_a_compact_output_with_the_prunes_own_perplexity(
    tiny_dir, tmp_path, capsys, with_data_env
):
    """`trimprune eval` on a --save-format compact output gives the perplexity the prune measured
    on its in-memory model, and the same as on a dense copy (`export --dense`), bit for bit."""
    import json

    ev = ["--eval", "wikitext2", "--eval-limit", "3"]
    argv = ["prune", "--model", str(tiny_dir), "--output", str(tmp_path / "c"), "--quiet"]
    argv += ["--calib", "self", "--nsamples", "2", "--seqlen", "16", "--eval-seqlen", "32", *ev]
    assert main([*argv, "--save-format", "compact"]) == 0
    assert (tmp_path / "c" / COMPACT_FILE).is_file()
    assert not (tmp_path / "c" / "model.safetensors").exists()
    pruned = json.loads((tmp_path / "c" / "report.json").read_text())
    ppl = pruned["metrics"]["eval"]["wikitext2"]["perplexity"]
    assert main(["export", "--dense", str(tmp_path / "c"), str(tmp_path / "d")]) == 0
    got = {}
    for name in ("c", "d"):
        out = tmp_path / f"{name}.json"
        cmd = ["eval", "--model", str(tmp_path / name), *ev, "--seqlen", "32", "--quiet"]
        assert main([*cmd, "--output", str(out)]) == 0, capsys.readouterr().err
        got[name] = json.loads(out.read_text())["metrics"]["eval"]["wikitext2"]
    assert got["c"]["perplexity"] == got["d"]["perplexity"] == ppl, (got, ppl)
    assert got["c"]["windows"] == 3


def test_disk_offload_of_a_compact_output_is_refused_in_one_line(
    tiny_dir, tmp_path, capsys, with_data_env
):
    """--offload disk reads model.safetensors block by block, which a compact output lacks: the
    CLI stops with exit 2 naming the folder, the compact file and both ways out, before any
    calibration; `load_model` (the API) refuses it the same way."""
    from trimprune import load_model
    from trimprune.errors import TrimpruneError

    argv = ["prune", "--model", str(tiny_dir), "--output", str(tmp_path / "c"), "--quiet"]
    argv += ["--calib", "self", "--nsamples", "2", "--seqlen", "16", "--save-format", "compact"]
    assert main(argv) == 0
    capsys.readouterr()
    cmd = ["prune", "--model", str(tmp_path / "c"), "--output", str(tmp_path / "again")]
    cmd += ["--nsamples", "2", "--seqlen", "16", "--offload", "disk"]
    assert main([*cmd, "--quiet"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and str(tmp_path / "c") in err[0] and "--offload cpu" in err[0], err
    assert f"compact output, {COMPACT_FILE}" in err[0] and "export --dense" in err[0], err
    assert not (tmp_path / "again").exists()
    with pytest.raises(TrimpruneError, match=f"compact output, {COMPACT_FILE}.*export --dense"):
        load_model(str(tmp_path / "c"), device="cpu", dtype="float32", offload="disk")


@pytest.mark.parametrize("fmt", ["sparse-bitmask", "sparse-24-bitmask"])
def test_a_compressed_tensors_sparse_checkpoint_is_refused_not_loaded_random(
    fmt, tiny_dir, tmp_path, capsys
):
    """transformers 5 loads a compressed-tensors sparse checkpoint with its compressed weights
    left out and those layers random: eval refuses it in one line, exit 2, before loading."""
    import json
    import shutil

    d = tmp_path / "ct"
    shutil.copytree(tiny_dir, d)
    cfg = json.loads((d / "config.json").read_text())
    sparsity = {"format": fmt, "global_sparsity": 0.5, "targets": ["Linear"]}
    cfg["quantization_config"] = {"quant_method": "compressed-tensors", "sparsity_config": sparsity}
    (d / "config.json").write_text(json.dumps(cfg))
    assert main(["eval", "--model", str(d), "--eval", "wikitext2", "--quiet"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and f"compressed-tensors {fmt} checkpoint" in err[0], err
    assert "random values" in err[0] and str(d) in err[0]
