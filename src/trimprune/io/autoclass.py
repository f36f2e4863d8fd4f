"""Which transformers auto class builds a model of a config: shared by loading (`io.models`),
compact checkpoints (`io.compact`) and disk offload (`io.diskmodel`)."""

from __future__ import annotations

from typing import Any


def auto_model_class(config) -> Any:
    """The transformers auto class that loads a model of `config` (a `PretrainedConfig`):
    ``AutoModelForImageTextToText`` for a multimodal checkpoint, one whose architecture is a
    ``...ForConditionalGeneration`` of an image-text-to-text model type (Gemma-3, Llama-4,
    Qwen2.5/3-VL, Mistral-3; ``AutoModelForCausalLM`` would build a text-only model that does not
    match its weights, or no model at all), else ``AutoModelForCausalLM``."""
    from transformers import AutoModelForCausalLM, AutoModelForImageTextToText
    from transformers.models.auto.modeling_auto import (
        MODEL_FOR_CAUSAL_LM_MAPPING_NAMES,
        MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES,
    )

    model_type = getattr(config, "model_type", None)
    image_text = MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES.get(model_type)
    if image_text is None:
        return AutoModelForCausalLM
    archs = list(getattr(config, "architectures", None) or [])
    if any(a.endswith("ForConditionalGeneration") for a in archs):
        return AutoModelForImageTextToText
    if not archs and model_type not in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES:
        return AutoModelForImageTextToText
    return AutoModelForCausalLM


def plain_load_kwargs(gguf_file: str | None = None) -> dict[str, Any]:
    """`from_pretrained` arguments that give plain PyTorch modules with dense weights, which the
    prune hooks and rewrites: no hub kernels (transformers >= 5.25 swaps layers' forwards for
    downloaded kernels by default, and fails where `kernels` is missing or the hub unreachable),
    and a GGUF file de-quantized on load (where a GGUF matmul kernel exists for the device,
    transformers keeps its weights in packed blocks, which cannot be pruned)."""
    import transformers

    out: dict[str, Any] = {}
    if hasattr(transformers.PreTrainedModel, "set_use_kernels"):
        out["use_kernels"] = False
    if gguf_file is not None:
        out["gguf_file"] = gguf_file
        config_class = getattr(transformers, "GgufConfig", None)
        if config_class is not None:
            out["quantization_config"] = config_class(gguf_file=gguf_file, dequantize=True)
    return out
