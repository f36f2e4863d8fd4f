"""`--offload disk`: blocks read from the checkpoint's safetensors when staged, pruned blocks written to the
output as they finish. The output equals the in-memory prune's, tensor for tensor; no more than the
block being processed (and, on a GPU, the next one, copied ahead) holds memory; what disk offload
cannot do is refused in one line."""

import json
import os

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from tiny_models import calib, make, make_llama
from trimprune import LoadedModel, ModelSource, PruneConfig, TrimpruneError, load_masks, prune
from trimprune.cli import main
from trimprune.core.model import ModelAdapter
from trimprune.exec.offload import materialised
from trimprune.io.diskmodel import DiskBlocks, load_disk_model
from trimprune.io.evaluate import nll_of_windows
from trimprune.io.export import StagedDir, write_outputs
from trimprune.io.models import load_model

FLAT = dict(scorer="wanda", sparsity=0.5, nsamples=4, seqlen=16)


def stored_tensors(folder):
    """Every tensor of a model folder's safetensors files, by name."""
    out = {}
    for f in sorted(folder.glob("model*.safetensors")):
        out |= load_file(f)
    return out


def prune_in_memory(src, flat, ids, out):
    """The model in memory, pruned on the device the disk-offloaded prune computes on: the CPU, or
    with a GPU that GPU (an offloaded model's blocks visit it, `session._compute_device`; the weights
    then stay in host memory, `--offload cpu`), so that both do the same arithmetic."""
    model = AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32)
    if torch.cuda.is_available():
        flat = flat | {"offload": "cpu"}
    res = prune(
        model, None, PruneConfig.from_flat(flat), calibration=ids, device="cpu", progress=False
    )
    write_outputs(out, model, None, res, {})
    return model, res


def prune_from_disk(src, flat, ids, out, visit=None):
    model, storage = load_disk_model(str(src), torch.float32)  # as load_model(offload="disk")
    with StagedDir(out) as staged:
        storage.write_to(staged.tmp)
        res = prune(
            model,
            None,
            PruneConfig.from_flat(flat | {"offload": "disk"}),
            calibration=ids,
            storage=storage,
            device="cpu",
            progress=False,
        )
        write_outputs(out, model, None, res, {}, staged=staged, storage=storage)
    return model, storage, res


@pytest.mark.parametrize(
    "family,flat",
    [
        ("llama", FLAT),
        ("qwen2", FLAT | {"scorer": "sparsegpt", "trim": True, "allocation": "owl"}),
        ("opt", FLAT | {"mask_structure": "2:4", "sparsity": None}),
    ],
)
def test_disk_offload_output_equals_the_in_memory_prune(family, flat, tmp_path):
    make(family).save_pretrained(tmp_path / "src")
    ids = calib(4, 16)
    mem_model, mem = prune_in_memory(tmp_path / "src", flat, ids, tmp_path / "mem")
    disk_model, storage, disk = prune_from_disk(tmp_path / "src", flat, ids, tmp_path / "disk")
    # evaluating the pruned model streams its blocks from the written (now committed) shards
    assert nll_of_windows(disk_model, ids, 2, storage=storage) == nll_of_windows(mem_model, ids, 2)
    with pytest.raises(TrimpruneError, match="already: load it again"):
        prune(
            disk_model,
            None,
            PruneConfig.from_flat(flat | {"offload": "disk"}),
            calibration=ids,
            storage=storage,
            progress=False,
        )
    assert set(mem.masks) == set(disk.masks)
    for name in mem.masks:
        assert torch.equal(mem.masks[name], disk.masks[name]), name
    a, b = stored_tensors(tmp_path / "mem"), stored_tensors(tmp_path / "disk")
    assert set(a) == set(b)
    for name in a:
        assert a[name].dtype == b[name].dtype and torch.equal(a[name], b[name]), name
    for name in ("config.json", "generation_config.json"):
        assert json.loads((tmp_path / "mem" / name).read_text()) == json.loads(
            (tmp_path / "disk" / name).read_text()
        )
    index = json.loads((tmp_path / "disk" / "model.safetensors.index.json").read_text())
    assert set(index["weight_map"]) == set(b)
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "disk")
    want = mem_model.state_dict()
    for name, t in loaded.state_dict().items():
        torch.testing.assert_close(t, want[name], rtol=0, atol=0)
    for name, m in load_masks(tmp_path / "disk" / "masks.safetensors").items():
        assert torch.equal(m, mem.mask(name))
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temp folders left


def test_only_the_visited_block_holds_memory(tmp_path, monkeypatch):
    make_llama(4).save_pretrained(tmp_path / "src")
    import trimprune.session as api

    seen = []
    original = api.prune_block

    def watch(run, plan, ex):
        seen.append((run.index, [materialised(b) for b in ModelAdapter.from_model(model).blocks]))
        return original(run, plan, ex)

    monkeypatch.setattr(api, "prune_block", watch)
    model, storage = load_disk_model(str(tmp_path / "src"), torch.float32)
    adapter = ModelAdapter.from_model(model)
    assert not any(materialised(b) for b in adapter.blocks)  # nothing read at load
    assert all(p.device.type == "cpu" for n, p in model.named_parameters() if ".layers." not in n)
    with StagedDir(tmp_path / "out") as staged:
        storage.write_to(staged.tmp)
        prune(
            model,
            None,
            PruneConfig.from_flat(FLAT | {"offload": "disk"}),
            calibration=calib(4, 16),
            storage=storage,
            device="cpu",
            progress=False,
        )
        assert sorted(p.name for p in staged.tmp.glob("*.safetensors")) == [
            f"model-{k:05d}-of-00005.safetensors" for k in range(2, 6)
        ]  # one shard per block, so far
    assert [i for i, _ in seen] == [0, 1, 2, 3]
    # With a GPU, an offloaded model is pruned there (session._compute_device) and the next block is
    # in host memory too while block i runs, for its copy ahead (exec/executor.py
    # `_stored_resident`; block i + 2 is being read, not yet installed). On the CPU: block i only.
    ahead = torch.cuda.is_available() and os.environ.get("TRIMPRUNE_PREFETCH", "1") != "0"
    for i, live in seen:
        held = [j for j in range(4) if live[j]]
        allowed = {i, i + 1} if ahead else {i}
        assert i in held and set(held) <= allowed, (i, held, sorted(allowed))
    assert not any(materialised(b) for b in adapter.blocks)  # all dropped after the walk


def _cli_message(make) -> str:
    with pytest.raises(TrimpruneError) as e:
        make()
    return e.value.cli_message()


def test_bad_offload_values_are_refused():
    for value, needle in [
        ("no", "run.offload 'no' is unknown: choose one of cpu, disk or false"),
        (3, "offload 3 must be cpu, disk or false"),
        ("gpu", "choose one of cpu, disk"),
    ]:
        with pytest.raises(TrimpruneError) as e:
            PruneConfig.from_flat({"offload": value})
        assert needle in str(e.value) and "\n" not in str(e.value)
    assert "--offload 'no' is unknown" in _cli_message(
        lambda: PruneConfig.from_flat({"offload": "no"})
    )
    assert (
        PruneConfig.from_flat({"offload": True}).run.offload == "cpu"
    )  # the boolean of earlier recipes
    assert PruneConfig.from_yaml("offload: false\n").run.offload is False
    assert PruneConfig.from_yaml("offload: disk\n").run.offload == "disk"
    with pytest.raises(
        TrimpruneError, match="run.checkpoint_dir is not supported with run.offload disk"
    ):
        PruneConfig.from_flat({"offload": "disk", "checkpoint_dir": "ck"})


def test_gguf_and_bin_models_are_refused(tmp_path):
    gguf = tmp_path / "m.gguf"
    gguf.write_bytes(
        b"GGUF" + (3).to_bytes(4, "little") + bytes(56)
    )  # version 3, no tensors, no key-value pairs
    with pytest.raises(
        TrimpruneError,
        match=r"run.offload disk reads a model stored as safetensors.*run.offload cpu",
    ):
        load_model(str(gguf), offload="disk", device="cpu")
    model = make("llama")
    model.config.save_pretrained(
        tmp_path / "bin"
    )  # transformers 5 saves safetensors only: a .bin by hand
    torch.save(model.state_dict(), tmp_path / "bin" / "pytorch_model.bin")
    with pytest.raises(TrimpruneError, match=r"holds pytorch_model.bin\): use run.offload cpu"):
        load_model(str(tmp_path / "bin"), offload="disk", device="cpu")


def test_a_disk_model_is_pruned_into_an_output_with_offload_disk(tmp_path):
    make("llama").save_pretrained(tmp_path / "src")
    model, storage = load_disk_model(str(tmp_path / "src"), torch.float32)
    with pytest.raises(TrimpruneError, match="write_to"):
        prune(
            model,
            None,
            PruneConfig.from_flat(FLAT | {"offload": "disk"}),
            calibration=calib(4, 16),
            storage=storage,
            progress=False,
        )
    for given in (storage, None):  # with its storage or without: offload cpu is refused
        with pytest.raises(TrimpruneError, match="prune it with offload 'disk'") as e:
            prune(
                model,
                None,
                PruneConfig.from_flat(FLAT | {"offload": "cpu"}),
                calibration=calib(4, 16),
                storage=given,
                progress=False,
            )
        assert "\n" not in str(e.value)
    with pytest.raises(TrimpruneError, match="load_model\\(..., offload='disk'\\)"):
        prune(
            model,
            None,
            PruneConfig.from_flat(FLAT | {"offload": "disk"}),
            calibration=calib(4, 16),
            progress=False,
        )  # a disk model without its storage
    other = make("llama")
    with pytest.raises(TrimpruneError, match="DiskBlocks of another model"):
        prune(
            other,
            None,
            PruneConfig.from_flat(FLAT | {"offload": "disk"}),
            calibration=calib(4, 16),
            storage=storage,
            progress=False,
        )
    with pytest.raises(TrimpruneError, match="load_model\\(..., offload='disk'\\)"):
        prune(
            make("llama"),
            None,
            PruneConfig.from_flat(FLAT | {"offload": "disk"}),
            calibration=calib(4, 16),
            progress=False,
        )


def test_load_model_returns_a_loaded_model(tiny_dir):
    src = str(tiny_dir)  # a float32 checkpoint: its dtype is the CPU's default
    loaded = load_model(src, device="cpu")
    assert isinstance(loaded, LoadedModel) and isinstance(loaded.model, torch.nn.Module)
    assert loaded.source == ModelSource(src, None, src, "default on cpu")
    assert loaded.storage is None and loaded.tokenizer is not None
    model, tok = loaded  # unpacks as (model, tokenizer), as before
    assert model is loaded.model and tok is loaded.tokenizer
    assert load_model(src, dtype="float32", device="cpu").source.dtype_from == "given"
    assert not [a for a in vars(model) if a.startswith("trimprune")]
    with pytest.raises(AttributeError):
        loaded.storage = None  # frozen
    disk = load_model(src, device="cpu", offload="disk")
    assert isinstance(disk.storage, DiskBlocks) and disk.storage.model is disk.model
    assert disk.source.resolved == src and disk.source.gguf_file is None
    assert not [a for a in vars(disk.model) if a.startswith("trimprune")]
    with pytest.raises(TrimpruneError, match="storage=loaded.storage"):
        nll_of_windows(disk.model, calib(2, 16), 2)  # its blocks are in the checkpoint
    ids = calib(2, 16)
    assert nll_of_windows(disk.model, ids, 2, storage=disk.storage) == nll_of_windows(
        loaded.model, ids, 2
    )


def test_cli_prune_and_eval_with_disk_offload(
    tiny_dir, tmp_path, with_data_env, capsys, monkeypatch
):
    import trimprune.io.plots as plots

    monkeypatch.setattr(plots, "available", lambda: False)  # no plots: quicker
    text = tmp_path / "wiki.txt"  # an excerpt: tokenizing the whole test set is slow
    text.write_text((with_data_env / "wikitext2-raw" / "wiki.test.raw").read_text()[:20000])
    common = [
        "prune",
        "--model",
        str(tiny_dir),
        "--nsamples",
        "4",
        "--seqlen",
        "32",
        "--eval",
        "wikitext2",
        "--eval-data",
        f"wikitext2={text}",
        "--eval-limit",
        "2",
        "--quiet",
    ]
    assert main(common + ["--output", str(tmp_path / "mem")]) == 0
    assert main(common + ["--output", str(tmp_path / "disk"), "--offload", "disk"]) == 0
    mem, disk = (json.loads((tmp_path / d / "report.json").read_text()) for d in ("mem", "disk"))
    assert disk["config"]["run"]["offload"] == "disk"
    for key in ("perplexity", "dense_perplexity"):  # the evaluations stream the blocks from disk
        assert mem["metrics"][key] == disk["metrics"][key]
    a, b = stored_tensors(tmp_path / "mem"), stored_tensors(tmp_path / "disk")
    assert set(a) == set(b) and all(torch.equal(a[k], b[k]) for k in a)
    assert (tmp_path / "disk" / "tokenizer_config.json").is_file() and (
        tmp_path / "disk" / "report.md"
    ).is_file()
    assert sorted(p.name for p in (tmp_path / "disk").glob("model*")) == [
        "model-00001-of-00003.safetensors",
        "model-00002-of-00003.safetensors",
        "model-00003-of-00003.safetensors",
        "model.safetensors.index.json",
    ]
    capsys.readouterr()
    assert (
        main(
            [
                "eval",
                "--model",
                str(tmp_path / "disk"),
                "--offload",
                "disk",
                "--eval",
                "wikitext2",
                "--eval-data",
                f"wikitext2={text}",
                "--eval-limit",
                "2",
                "--seqlen",
                "32",
                "--quiet",
            ]
        )
        == 0
    )
    assert f"perplexity {mem['metrics']['perplexity']['wikitext2']:.4f}" in capsys.readouterr().out
    assert (
        main(common + ["--output", str(tmp_path / "x"), "--offload", "disk", "--tasks", "boolq"])
        == 2
    )
    assert "--offload disk does not support --tasks" in capsys.readouterr().err


def test_a_failed_disk_prune_leaves_no_output(tiny_dir, tmp_path, monkeypatch):
    import trimprune.session as api

    def boom(run, plan, ex):
        if run.index == 1:
            raise RuntimeError("interrupted")
        return original(run, plan, ex)

    original = api.prune_block
    monkeypatch.setattr(api, "prune_block", boom)
    with pytest.raises(RuntimeError, match="interrupted"):
        main(
            [
                "prune",
                "--model",
                str(tiny_dir),
                "--nsamples",
                "4",
                "--seqlen",
                "32",
                "--quiet",
                "--offload",
                "disk",
                "--output",
                str(tmp_path / "out"),
            ]
        )
    assert list(tmp_path.iterdir()) == []  # the shard of block 0 went with the staged folder
