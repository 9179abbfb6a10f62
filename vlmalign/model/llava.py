"""Start from an HF `llava-hf` LLaVA-1.5 checkpoint: its CLIP tower, projector and LLaMA become a VideoLM.

LLaVA-1.5 is image-only; VLM-RLAIF and LLaVA-Hound start from it and add video by pooling frame
features (here: the model config's `pooling`, after the projector by default).
"""

from __future__ import annotations

from pathlib import Path

import torch

from vlmalign.config import LLMConfig, ModelConfig, VisionConfig
from vlmalign.errors import ConfigError


def load_llava_hf(path: str | Path):
    from transformers import AutoTokenizer, LlamaForCausalLM, LlavaForConditionalGeneration

    from vlmalign.model.projector import build_projector
    from vlmalign.model.video_lm import VideoLM
    from vlmalign.model.vision import VisionTower

    llava = LlavaForConditionalGeneration.from_pretrained(path)
    config = llava.config
    if config.vision_feature_select_strategy != "default" or config.projector_hidden_act not in ("gelu", "relu"):
        raise ConfigError(
            f"{path}: unsupported LLaVA variant (feature strategy {config.vision_feature_select_strategy!r}, "
            f"projector activation {config.projector_hidden_act!r})"
        )
    layer = config.vision_feature_layer
    cfg = ModelConfig(
        vision=VisionConfig(pretrained=None, select_layer=layer if isinstance(layer, int) else layer[-1]),
        llm=LLMConfig(pretrained=None),
        projector="mlp2x_gelu" if config.projector_hidden_act == "gelu" else "mlp2x_relu",
    )
    vision = VisionTower(cfg.vision, model=llava.model.vision_tower)
    with torch.device("meta"):  # only the module tree: the weights are moved over from LLaVA
        llm = LlamaForCausalLM(config.text_config)
    llm.model = llava.model.language_model
    llm.lm_head = llava.lm_head
    llm.generation_config = llava.generation_config
    projector = build_projector(cfg.projector, vision.hidden_size, llm.config.hidden_size)
    source = llava.model.multi_modal_projector
    projector[0].load_state_dict(source.linear_1.state_dict())
    projector[2].load_state_dict(source.linear_2.state_dict())
    tokenizer = AutoTokenizer.from_pretrained(path)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.unk_token
    return VideoLM(cfg, vision, projector.to(llm.dtype), llm, tokenizer, base={}).requires_grad_(False).eval()
