"""Tiny random causal LMs of every supported family, built from configs (no downloads)."""

from __future__ import annotations

import torch
import transformers as T

V = 96  # vocabulary size


def _common(**kw):
    base = dict(
        vocab_size=V,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        max_position_embeddings=128,
    )
    base.update(kw)
    return base


FAMILIES = {
    "llama": lambda: T.LlamaForCausalLM(T.LlamaConfig(**_common(num_key_value_heads=2))),
    "qwen2": lambda: T.Qwen2ForCausalLM(T.Qwen2Config(**_common(num_key_value_heads=2))),
    "mistral": lambda: T.MistralForCausalLM(T.MistralConfig(**_common(num_key_value_heads=2))),
    "phi3": lambda: T.Phi3ForCausalLM(
        T.Phi3Config(**_common(num_key_value_heads=4, pad_token_id=0))
    ),
    "gemma": lambda: T.GemmaForCausalLM(
        T.GemmaConfig(**_common(num_key_value_heads=2, head_dim=8))
    ),
    "gemma2": lambda: T.Gemma2ForCausalLM(
        T.Gemma2Config(
            **_common(num_key_value_heads=2, head_dim=8, sliding_window=8, num_hidden_layers=2)
        )
    ),
    "gemma3": lambda: T.Gemma3ForCausalLM(
        T.Gemma3TextConfig(
            **_common(
                num_key_value_heads=2,
                head_dim=8,
                sliding_window=8,
                num_hidden_layers=3,
                layer_types=["sliding_attention", "full_attention", "sliding_attention"],
            )
        )
    ),
    "opt": lambda: T.OPTForCausalLM(
        T.OPTConfig(
            vocab_size=V,
            hidden_size=32,
            ffn_dim=64,
            num_hidden_layers=2,
            num_attention_heads=4,
            max_position_embeddings=128,
            word_embed_proj_dim=32,
        )
    ),
    "gpt2": lambda: T.GPT2LMHeadModel(
        T.GPT2Config(vocab_size=V, n_embd=32, n_layer=2, n_head=4, n_positions=128)
    ),
    "gpt_neox": lambda: T.GPTNeoXForCausalLM(
        T.GPTNeoXConfig(
            vocab_size=V,
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=4,
            max_position_embeddings=128,
        )
    ),
}
# prunable linears per block
LINEARS_PER_BLOCK = {
    "llama": 7,
    "qwen2": 7,
    "mistral": 7,
    "phi3": 4,
    "gemma": 7,
    "gemma2": 7,
    "gemma3": 7,
    "opt": 6,
    "gpt2": 4,
    "gpt_neox": 4,
}


def _perturbed(m):
    # random init leaves some families' norms at exactly 0/1; perturb all params a little so
    # every path matters
    with torch.no_grad():
        for p in m.parameters():
            p.add_(torch.randn_like(p) * 0.02)
    return m


def make(family: str, seed: int = 0, dtype=torch.float32):
    torch.manual_seed(seed)
    return _perturbed(FAMILIES[family]().to(dtype).eval())


def make_llama(num_layers: int = 4, seed: int = 0, dtype=torch.float32):
    """A tiny Llama with `num_layers` blocks, seeded and perturbed like `make`."""
    torch.manual_seed(seed)
    cfg = T.LlamaConfig(**_common(num_key_value_heads=2, num_hidden_layers=num_layers))
    return _perturbed(T.LlamaForCausalLM(cfg).to(dtype).eval())


def calib(n=8, L=24, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, V, (n, L), generator=g)


# ------------------------------------------------------------------ mixture-of-experts families
def _moe(**kw):
    return _common(num_key_value_heads=2, head_dim=8, **kw)


MOE_FAMILIES = {
    "qwen3_moe": lambda: T.Qwen3MoeForCausalLM(
        T.Qwen3MoeConfig(**_moe(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=16))
    ),
    "qwen2_moe": lambda: T.Qwen2MoeForCausalLM(
        T.Qwen2MoeConfig(
            **_moe(
                num_experts=4,
                num_experts_per_tok=2,
                moe_intermediate_size=16,
                shared_expert_intermediate_size=24,
            )
        )
    ),
    "mixtral": lambda: T.MixtralForCausalLM(
        T.MixtralConfig(**_moe(num_local_experts=4, num_experts_per_tok=2, intermediate_size=16))
    ),
    "olmoe": lambda: T.OlmoeForCausalLM(
        T.OlmoeConfig(
            **_moe(num_experts=4, num_experts_per_tok=2, intermediate_size=16, eos_token_id=1)
        )
    ),
    # dense first block, shared experts, multi-head latent attention
    "deepseek_v3": lambda: T.DeepseekV3ForCausalLM(
        T.DeepseekV3Config(
            **_common(
                num_key_value_heads=4,
                head_dim=8,
                n_routed_experts=4,
                num_experts_per_tok=2,
                moe_intermediate_size=16,
                first_k_dense_replace=1,
                n_shared_experts=1,
                n_group=2,
                topk_group=1,
                kv_lora_rank=16,
                q_lora_rank=24,
                qk_rope_head_dim=8,
                qk_nope_head_dim=8,
                v_head_dim=8,
                rope_scaling=None,
            )
        )
    ),
    # transposed, interleaved gate/up with biases
    "gpt_oss": lambda: T.GptOssForCausalLM(
        T.GptOssConfig(**_moe(num_local_experts=4, num_experts_per_tok=2, intermediate_size=16))
    ),
    # experts without the ExpertsInterface seam; router scores scale the experts' inputs
    "llama4": lambda: T.Llama4ForCausalLM(
        T.Llama4TextConfig(
            **_moe(
                num_local_experts=4,
                num_experts_per_tok=1,
                intermediate_size=16,
                intermediate_size_mlp=48,
            )
        )
    ),
    "granitemoe": lambda: T.GraniteMoeForCausalLM(
        T.GraniteMoeConfig(**_moe(num_local_experts=4, num_experts_per_tok=2, intermediate_size=16))
    ),
}


def make_moe(family: str, seed: int = 0, dtype=torch.float32):
    """A tiny MoE model; float64 ones use the eager experts forward (grouped_mm has no float64)."""
    torch.manual_seed(seed)
    model = _perturbed(MOE_FAMILIES[family]().to(dtype).eval())
    if dtype == torch.float64:
        model.config._experts_implementation = "eager"
    return model


# ------------------------------------------------------------ multimodal (image-text-to-text)
# The language model has V + 8 embeddings: the image / video / begin / end tokens sit above V, so
# text token ids drawn from range(V) (`calib`) never contain one, as a tokenizer's text never does.
MM_V = V + 8


def _mm_text(**kw):
    return _common(
        vocab_size=MM_V,
        num_key_value_heads=2,
        head_dim=8,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=0,
        **kw,
    )


def _qwen_vl_text(**kw):
    # 3-D multimodal rotary (temporal, height, width sections of head_dim / 2 = 4)
    rope = {"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [2, 1, 1]}
    return _mm_text(rope_parameters=rope, **kw)


_QWEN_VISION = dict(
    depth=2, hidden_size=16, intermediate_size=32, num_heads=2, patch_size=4, out_hidden_size=32
)
_MM_TOKENS = dict(image_token_id=V, video_token_id=V + 1, vision_start_token_id=V + 2)

MULTIMODAL = {
    # SigLIP tower, sliding / full attention layers, bidirectional attention over image tokens
    "gemma3": lambda: T.Gemma3ForConditionalGeneration(
        T.Gemma3Config(
            text_config=_mm_text(
                sliding_window=8, layer_types=["sliding_attention", "full_attention"]
            ),
            vision_config=dict(
                hidden_size=16,
                intermediate_size=32,
                num_hidden_layers=2,
                num_attention_heads=2,
                image_size=16,
                patch_size=4,
            ),
            mm_tokens_per_image=4,
            boi_token_index=V + 1,
            eoi_token_index=V + 2,
            image_token_index=V,
        )
    ),
    # a mixture-of-experts language model (every layer MoE) and chunked attention
    "llama4": lambda: T.Llama4ForConditionalGeneration(
        T.Llama4Config(
            text_config=_mm_text(
                num_local_experts=4,
                num_experts_per_tok=1,
                intermediate_size=16,
                intermediate_size_mlp=48,
                attention_chunk_size=16,
            ),
            vision_config=dict(
                hidden_size=16,
                intermediate_size=32,
                num_hidden_layers=2,
                num_attention_heads=2,
                image_size=16,
                patch_size=4,
                vision_output_dim=16,
                projector_input_dim=16,
                projector_output_dim=16,
            ),
            boi_token_index=V + 1,
            eoi_token_index=V + 2,
            image_token_index=V,
        )
    ),
    "qwen2_5_vl": lambda: T.Qwen2_5_VLForConditionalGeneration(
        T.Qwen2_5_VLConfig(
            text_config=_qwen_vl_text(),
            # a vision tower whose blocks outweigh the language model's: the adapter must still
            # pick the language model's blocks
            vision_config=dict(
                _QWEN_VISION,
                hidden_size=32,
                intermediate_size=96,
                window_size=8,
                fullatt_block_indexes=[1],
            ),
            **_MM_TOKENS,
        )
    ),
    "qwen3_vl": lambda: T.Qwen3VLForConditionalGeneration(
        T.Qwen3VLConfig(
            text_config=_qwen_vl_text(),
            vision_config=dict(
                _QWEN_VISION, num_position_embeddings=16, deepstack_visual_indexes=[0]
            ),
            **_MM_TOKENS,
        )
    ),
    "qwen3_vl_moe": lambda: T.Qwen3VLMoeForConditionalGeneration(
        T.Qwen3VLMoeConfig(
            text_config=_qwen_vl_text(
                num_experts=4,
                num_experts_per_tok=2,
                moe_intermediate_size=16,
                decoder_sparse_step=1,
            ),
            vision_config=dict(
                _QWEN_VISION, num_position_embeddings=16, deepstack_visual_indexes=[0]
            ),
            **_MM_TOKENS,
        )
    ),
    # Pixtral tower, a patch-merging projector
    "mistral3": lambda: T.Mistral3ForConditionalGeneration(
        T.Mistral3Config(
            text_config=dict(_mm_text(), model_type="mistral"),
            vision_config=dict(
                hidden_size=16,
                intermediate_size=32,
                num_hidden_layers=2,
                num_attention_heads=2,
                image_size=16,
                patch_size=4,
                head_dim=8,
            ),
            image_token_index=V,
            spatial_merge_size=2,
        )
    ),
}


def make_multimodal(name: str, seed: int = 0, dtype=torch.float32):
    """A tiny image-text-to-text model (`MULTIMODAL`), seeded and perturbed like `make`."""
    torch.manual_seed(seed)
    model = MULTIMODAL[name]()
    if dtype != torch.float32:  # `.to(float32)` would drop Llama-4's complex rotary tables
        model = model.to(dtype)
    model = _perturbed(model.eval())
    if dtype == torch.float64:
        model.config._experts_implementation = "eager"
    return model
