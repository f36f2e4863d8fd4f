"""Outputs of a pruned mixture-of-experts model: the saved folder loads back with
`from_pretrained` (logits equal to the in-memory model, zeros where the masks say), the masks map
onto transformers' fused expert parameters, the compact format stores the experts as bitmask +
values, `trimprune export --dense` rebuilds them, a resumed run, `--offload cpu` and `--offload
disk` end like an uninterrupted in-memory run (masks, weights, the experts that fell back to every
token), two processes like one, and the report and zero-shot evaluation cover the experts.

Every comparison is exact (`torch.equal`) except the two-process one: see its docstring.
"""

from __future__ import annotations

import json
import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM

import trimprune.io.resume as resume_mod
from test_distributed import _free_port
from test_offload_disk import prune_from_disk, prune_in_memory, stored_tensors
from tiny_models import MOE_FAMILIES, calib, make_moe
from trimprune import PruneConfig, load_masks, load_pruned, prune
from trimprune.cli import main
from trimprune.core.model import ModelAdapter
from trimprune.core.moe import ExpertLinear, fused_parameter
from trimprune.io.compact import COMPACT_FILE
from trimprune.io.export import write_outputs
from trimprune.io.report import build_report, markdown

FAMILIES = sorted(MOE_FAMILIES)
FLAT = dict(scorer="wanda", sparsity=0.5, nsamples=4, seqlen=16, moe_min_tokens=0)
# experts routed fewer than 20 of the 64 calibration tokens fall back to every token's statistics
# (llama4 has one such expert in both blocks, qwen2_moe and gpt_oss in block 0)
FALLBACK = FLAT | {"moe_min_tokens": 20}


def _prune(family, flat=FLAT, ids=None):
    model = make_moe(family)
    res = prune(
        model,
        None,
        PruneConfig.from_flat(flat),
        calibration=calib(4, 16) if ids is None else ids,
        progress=False,
    )
    return model, res


def _write(model, res, out, fmt="dense"):
    rep = build_report(res, {"source": "tiny"}, {"perplexity": {}}, res.timings)
    write_outputs(out, model, None, res, rep, markdown(rep), save_format=fmt)
    return rep


def _logits(model, ids):
    with torch.no_grad():
        return model(input_ids=ids).logits


def _same_state(a, b):
    sa, sb = a.state_dict(), b.state_dict()
    assert set(sa) == set(sb)
    for k in sa:
        assert sa[k].dtype == sb[k].dtype and torch.equal(sa[k], sb[k]), k


def _same_masks(a, b):
    assert set(a) == set(b)  # (the order of a resumed run's dict may differ)
    for k in a:
        assert torch.equal(a[k], b[k]), k


# ------------------------------------------------------------------ save, from_pretrained, masks
@pytest.mark.parametrize("family", FAMILIES)
def test_saved_moe_loads_back_with_equal_logits_and_zeros_where_the_masks_say(family, tmp_path):
    model, res = _prune(family)
    _write(model, res, tmp_path / "out")
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "out").eval()
    ids = calib(3, 16, seed=9)
    assert torch.equal(_logits(loaded, ids), _logits(model, ids))
    _same_state(loaded, model)
    masks = load_masks(tmp_path / "out" / "masks.safetensors")
    lin = ModelAdapter.from_model(loaded).all_linears()
    assert set(masks) == set(lin) == set(res.layers)
    experts = [n for n, m in lin.items() if isinstance(m, ExpertLinear)]
    assert experts
    for name, m in masks.items():
        assert torch.equal(m, res.mask(name)), name
        w = lin[name].weight if isinstance(lin[name], ExpertLinear) else None
        if w is not None:  # the expert's view into the loaded fused parameter
            assert torch.equal(w == 0, m), name
    # the same masks on the fused parameters, in transformers' layout
    fused = load_masks(tmp_path / "out" / "masks.safetensors", fused=True)
    state = loaded.state_dict()
    slots = {n: fused_parameter(loaded, n) for n in experts}
    params = {s.parameter for s in slots.values()}
    assert params and params <= set(fused) and not params & set(masks)
    for p in params:
        assert fused[p].shape == state[p].shape and torch.equal(state[p] == 0, fused[p]), p
    for n, s in slots.items():
        assert torch.equal(s.view(fused[s.parameter]), masks[n]), n
    for n in set(masks) - set(experts):  # dense linears keep their own names
        assert torch.equal(fused[n], masks[n])


def test_fused_parameter_names_only_expert_projections():
    model = make_moe("qwen2_moe")
    s = fused_parameter(model, "model.layers.0.mlp.experts.3.up_proj")
    assert s is not None and s.parameter == "model.layers.0.mlp.experts.gate_up_proj"
    assert s.expert == 3 and s.rows == slice(16, 32) and not s.transposed
    w = model.model.layers[0].mlp.experts.gate_up_proj.data
    assert torch.equal(s.view(w), w[3, 16:32])
    for name in (
        "model.layers.0.mlp.shared_expert.up_proj",
        "model.layers.0.mlp.experts.4.up_proj",  # 4 experts: 0..3
        "model.layers.0.self_attn.q_proj",
        "model.layers.9.mlp.experts.0.up_proj",
    ):
        assert fused_parameter(model, name) is None, name
    oss = fused_parameter(make_moe("gpt_oss"), "model.layers.1.mlp.experts.2.up_proj")
    assert oss is not None and oss.rows == slice(1, 32, 2) and oss.transposed  # interleaved


# --------------------------------------------------------------------- compact and export --dense
@pytest.mark.parametrize("family", FAMILIES)
def test_compact_stores_the_experts_as_bitmask_and_values_and_restores_them(family, tmp_path):
    model, res = _prune(family)
    _write(model, res, tmp_path / "c", fmt="compact")
    with safe_open(str(tmp_path / "c" / COMPACT_FILE), framework="pt") as f:
        sparse = set(json.loads(f.metadata()["sparse_shapes"]))
    experts = [n for n, m in ModelAdapter.from_model(model).all_linears().items()
               if isinstance(m, ExpertLinear)]  # fmt: skip
    fused = {fused_parameter(model, n).parameter for n in experts}
    assert fused and fused <= sparse  # the fused experts are stored as bitmask + values
    loaded = load_pruned(tmp_path / "c")
    _same_state(loaded, model)
    ids = calib(3, 16, seed=9)
    assert torch.equal(_logits(loaded, ids), _logits(model, ids))


def test_export_dense_rebuilds_a_compact_moe(tmp_path, capsys):
    model, res = _prune("mixtral")
    _write(model, res, tmp_path / "c", fmt="compact")
    assert main(["export", "--dense", str(tmp_path / "c"), str(tmp_path / "x")]) == 0
    capsys.readouterr()
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "x").eval()
    _same_state(loaded, model)
    names = set(stored_tensors(tmp_path / "x"))  # saved in the checkpoint layout of the family
    assert "model.layers.0.block_sparse_moe.experts.3.w2.weight" in names


# ---------------------------------------------------------------------------------------- resume
class Interrupted(Exception):
    pass


@pytest.mark.parametrize("family", ["llama4", "qwen2_moe", "gpt_oss"])
def test_resumed_moe_run_equals_an_uninterrupted_one_fallback_list_included(
    family, tmp_path, monkeypatch
):
    ref_model, ref = _prune(family, FALLBACK)
    assert ref.moe_fallback and any(".layers.0." in k for k in ref.moe_fallback)
    ck = str(tmp_path / "ck")

    def stop(block):
        if block == 0:
            raise Interrupted

    monkeypatch.setattr(resume_mod, "_after_commit", stop)
    with pytest.raises(Interrupted):
        _prune(family, FALLBACK | {"checkpoint_dir": ck})
    monkeypatch.setattr(resume_mod, "_after_commit", lambda block: None)
    model, res = _prune(family, FALLBACK | {"checkpoint_dir": ck, "resume": True})
    assert res.resumed_from_block == 0
    _same_masks(res.masks, ref.masks)
    _same_state(model, ref_model)
    assert res.moe_fallback == ref.moe_fallback  # block 0's list comes from the resume state
    assert res.layers == ref.layers


# --------------------------------------------------------------------------------------- offload
@pytest.mark.parametrize("family", ["qwen3_moe", "llama4"])
def test_offload_cpu_equals_no_offload(family):
    ref_model, ref = _prune(family, FALLBACK)
    model, res = _prune(family, FALLBACK | {"offload": "cpu"})
    _same_masks(res.masks, ref.masks)
    _same_state(model, ref_model)
    assert res.moe_fallback == ref.moe_fallback


@pytest.mark.parametrize("family", FAMILIES)
def test_offload_disk_output_equals_the_in_memory_prune(family, tmp_path):
    """Checkpoints store experts fused (gpt_oss, llama4), one tensor per expert and projection
    (qwen, olmoe, deepseek: transformers fuses them on load), renamed (granitemoe) or both
    (mixtral): the disk-offloaded prune reads them as transformers loads them and writes them back
    as `save_pretrained` does."""
    make_moe(family).save_pretrained(tmp_path / "src")
    ids = calib(4, 16)
    mem_model, mem = prune_in_memory(tmp_path / "src", FALLBACK, ids, tmp_path / "mem")
    _, _, disk = prune_from_disk(tmp_path / "src", FALLBACK, ids, tmp_path / "disk")
    _same_masks(disk.masks, mem.masks)
    assert disk.moe_fallback == mem.moe_fallback
    a, b = stored_tensors(tmp_path / "mem"), stored_tensors(tmp_path / "disk")
    assert set(a) == set(b) == set(stored_tensors(tmp_path / "src"))
    for name in a:
        assert a[name].dtype == b[name].dtype and torch.equal(a[name], b[name]), name
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "disk").eval()
    _same_state(loaded, mem_model)


# ------------------------------------------------------------------------------- two processes
def _dist_worker(rank: int, world: int, port: int, out: str):
    torch.set_num_threads(1)
    dist.init_process_group(
        "gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world
    )
    try:
        for family in DIST_FAMILIES:
            model, res = _prune(family, DIST, calib(8, 16))
            if rank == 0:
                save_file(
                    {k: v.contiguous() for k, v in model.state_dict().items()}
                    | {f"mask/{k}": m.contiguous() for k, m in res.masks.items()},
                    os.path.join(out, f"{family}.safetensors"),
                )
                with open(os.path.join(out, f"{family}.json"), "w") as f:
                    json.dump(res.moe_fallback, f)
    finally:
        dist.destroy_process_group()


DIST_FAMILIES = ["qwen2_moe", "llama4"]
# one calibration batch per rank (4 sequences); experts under 30 routed tokens fall back
DIST = FLAT | {"nsamples": 8, "batch_size": 4, "moe_min_tokens": 30, "trim": True}


@pytest.mark.heavy
def test_two_processes_give_the_masks_and_weights_of_one(tmp_path):
    """Bit-identical: Wanda's statistics (column norms, token counts) and TRIM's are sums that two
    ranks add in the order one process does (`test_distributed`'s docstring); an expert's routed
    tokens are counted over both ranks before the fallback is decided."""
    mp.spawn(_dist_worker, args=(2, _free_port(), str(tmp_path)), nprocs=2, join=True)
    for family in DIST_FAMILIES:
        model, res = _prune(family, DIST, calib(8, 16))
        got = load_file(str(tmp_path / f"{family}.safetensors"))
        for k, v in model.state_dict().items():
            assert torch.equal(got[k], v), (family, k)
        for k, m in res.masks.items():
            assert torch.equal(got[f"mask/{k}"], m), (family, k)
        assert json.loads((tmp_path / f"{family}.json").read_text()) == res.moe_fallback


# ----------------------------------------------------------------------- report and zero-shot
def test_report_lists_every_expert_and_the_fallback(tmp_path):
    model, res = _prune("llama4", FALLBACK)
    rep = _write(model, res, tmp_path / "out")
    experts = [n for n, m in ModelAdapter.from_model(model).all_linears().items()
               if isinstance(m, ExpertLinear)]  # fmt: skip
    r = json.loads((tmp_path / "out" / "report.json").read_text())
    assert set(experts) <= set(r["layers"])
    for n in experts:
        assert r["layers"][n]["sparsity"] == pytest.approx(float(res.mask(n).float().mean()))
    assert r["moe_fallback"] == res.moe_fallback == rep["moe_fallback"]
    md = (tmp_path / "out" / "report.md").read_text()
    for n in experts:
        assert f"| {n} | " in md
    assert "## Experts with every token's statistics" in md
    for n, tokens in res.moe_fallback.items():
        assert f"| {n} | {tokens} |" in md


@pytest.fixture
def moe_dir(tmp_path, data_dir):
    """A tiny Qwen3-MoE with the GPT-2 tokenizer, saved like a hub model."""
    import transformers as T
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(data_dir / "tokenizers" / "gpt2"))
    tok.model_max_length = 128
    torch.manual_seed(0)
    cfg = T.Qwen3MoeConfig(
        vocab_size=len(tok),
        hidden_size=32,
        intermediate_size=64,
        moe_intermediate_size=16,
        num_experts=4,
        num_experts_per_tok=2,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=8,
        max_position_embeddings=128,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
    )
    T.Qwen3MoeForCausalLM(cfg).save_pretrained(tmp_path / "moe")
    tok.save_pretrained(tmp_path / "moe")
    return tmp_path / "moe"


@pytest.mark.heavy
def test_cli_prune_of_a_moe_with_zero_shot_and_report(moe_dir, data_dir, tmp_path, monkeypatch):
    pytest.importorskip("lm_eval")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("TRIMPRUNE_DATA", str(data_dir))
    out = tmp_path / "o"
    args = ["prune", "--model", str(moe_dir), "--output", str(out), "--calib", "self"]
    args += ["--nsamples", "4", "--seqlen", "16", "--tasks", "rte,boolq", "--tasks-limit", "4"]
    args += ["--tasks-data", str(data_dir), "--device", "cpu", "--quiet"]
    assert main(args) == 0
    r = json.loads((out / "report.json").read_text())
    zs = r["metrics"]["zero_shot"]
    assert set(zs) == set(r["metrics"]["dense_zero_shot"]) == {"rte", "boolq"}
    for s in zs.values():
        assert s["samples"] == 4 and 0 <= s["acc"] <= 1
    experts = [k for k in r["layers"] if ".mlp.experts." in k]
    assert len(experts) == 2 * 4 * 3  # blocks x experts x projections
    md = (out / "report.md").read_text()
    assert all(f"| {n} | " in md for n in experts)
    loaded = AutoModelForCausalLM.from_pretrained(out)
    masks = load_masks(out / "masks.safetensors", fused=True)
    for name, t in loaded.state_dict().items():
        if name in masks:
            assert torch.equal(t == 0, masks[name]), name


# ------------------------------------------------------------------------------ SIGKILL, resume
KILL_SCRIPT = """
import json, sys
from pathlib import Path
import torch
sys.path.insert(0, {tests!r})
torch.set_num_threads(2)
from safetensors.torch import save_file
from tiny_models import calib, make_moe
from trimprune import PruneConfig, prune

family, flat, out = sys.argv[1], json.loads(sys.argv[2]), Path(sys.argv[3])
model = make_moe(family)
res = prune(model, None, PruneConfig.from_flat(flat), calibration=calib(4, 16), progress=False)
out.mkdir(parents=True)
save_file({{k: v.clone().contiguous() for k, v in model.state_dict().items()}},
          str(out / "weights.safetensors"))
save_file(dict(res.masks), str(out / "masks.safetensors"))
(out / "records.json").write_text(json.dumps({{
    "layers": {{k: r.to_dict() for k, r in res.layers.items()}},
    "fallback": res.moe_fallback, "resumed_from_block": res.resumed_from_block}}))
"""


@pytest.mark.heavy
@pytest.mark.parametrize("family", ["deepseek_v3", "gpt_oss"])
def test_sigkill_after_a_block_then_resume_is_bit_identical(family, tmp_path):
    """Real processes: killed with SIGKILL right after block 0's checkpoint is committed, resumed by
    a second process, compared with a third that ran without checkpoints (TRIM and the fallback
    on)."""
    import signal
    import subprocess
    import sys
    from pathlib import Path

    tests = Path(__file__).resolve().parent
    script = tmp_path / "run.py"
    script.write_text(KILL_SCRIPT.format(tests=str(tests)))
    flat = FALLBACK | {"trim": True}
    ck = str(tmp_path / "ck")

    def run(out, extra, kill=None):
        env = dict(os.environ, PYTHONPATH=str(tests.parent / "src"))
        env.pop(resume_mod.KILL_ENV, None)
        if kill is not None:
            env[resume_mod.KILL_ENV] = str(kill)
        cmd = [sys.executable, str(script), family, json.dumps(flat | extra), str(out)]
        return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)

    p = run(tmp_path / "killed", {"checkpoint_dir": ck}, kill=0)
    assert p.returncode == -signal.SIGKILL, p.stderr[-3000:]
    p = run(tmp_path / "resumed", {"checkpoint_dir": ck, "resume": True})
    assert p.returncode == 0, p.stderr[-3000:]
    p = run(tmp_path / "plain", {})
    assert p.returncode == 0, p.stderr[-3000:]
    a, b = tmp_path / "resumed", tmp_path / "plain"
    for f in ("weights.safetensors", "masks.safetensors"):
        ta, tb = load_file(str(a / f)), load_file(str(b / f))
        assert ta.keys() == tb.keys() and all(torch.equal(ta[k], tb[k]) for k in ta), f
    ra, rb = (json.loads((d / "records.json").read_text()) for d in (a, b))
    assert ra["resumed_from_block"] == 0 and rb["resumed_from_block"] is None
    assert ra["layers"] == rb["layers"] and ra["fallback"] == rb["fallback"]
    assert any(".experts." in k for k in ra["layers"])
