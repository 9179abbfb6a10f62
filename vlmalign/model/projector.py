"""Projector from vision width to LLM width, and Video-ChatGPT spatio-temporal pooling."""

from __future__ import annotations

import torch
from torch import nn


def build_projector(kind: str, vision_width: int, llm_width: int) -> nn.Module:
    """LLaVA-1.5's `mlp2x_gelu` (VLM-RLAIF's paper writes ReLU: `mlp2x_relu`), or Video-ChatGPT's `linear`."""
    if kind == "linear":
        return nn.Linear(vision_width, llm_width)
    activation = {"mlp2x_gelu": nn.GELU, "mlp2x_relu": nn.ReLU}[kind]()
    return nn.Sequential(nn.Linear(vision_width, llm_width), activation, nn.Linear(llm_width, llm_width))


def spatio_temporal_pool(features: torch.Tensor) -> torch.Tensor:
    """[B, T, P, D] -> [B, T + P, D]: per-frame means (temporal tokens) then per-patch means over time
    (spatial tokens), as Video-ChatGPT. 50 frames x 576 patches give 626 tokens, not 28,800."""
    if features.dim() != 4:
        raise ValueError(f"expected features [B, T, P, D], got shape {tuple(features.shape)}")
    temporal = features.mean(dim=2)
    spatial = features.mean(dim=1)
    return torch.cat([temporal, spatial], dim=1)
