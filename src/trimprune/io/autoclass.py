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
