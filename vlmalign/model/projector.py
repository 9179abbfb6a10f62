"""Projector from vision width to LLM width, and Video-ChatGPT spatio-temporal pooling (optionally
keeping each frame as a small grid)."""

from __future__ import annotations

import math

import torch
from torch import nn


def build_projector(kind: str, vision_width: int, llm_width: int) -> nn.Module:
    """LLaVA-1.5's `mlp2x_gelu` (VLM-RLAIF's paper writes ReLU: `mlp2x_relu`), or Video-ChatGPT's `linear`."""
    if kind == "linear":
        return nn.Linear(vision_width, llm_width)
    activation = {"mlp2x_gelu": nn.GELU, "mlp2x_relu": nn.ReLU}[kind]()
    return nn.Sequential(nn.Linear(vision_width, llm_width), activation, nn.Linear(llm_width, llm_width))


def frame_grid_fits(num_patches: int, frame_grid: int) -> bool:
    """Whether a frame of `num_patches` patches splits into frame_grid x frame_grid equal cells (any
    patch count takes grid 1: the frame's mean)."""
    if frame_grid < 1:
        return False
    side = math.isqrt(num_patches)
    return frame_grid == 1 or (side * side == num_patches and side % frame_grid == 0)


def spatio_temporal_pool(features: torch.Tensor, frame_grid: int = 1) -> torch.Tensor:
    """[B, T, P, D] -> [B, T * frame_grid^2 + P, D]: temporal tokens, then per-patch means over time
    (spatial tokens). With frame_grid 1 the temporal tokens are per-frame means, as Video-ChatGPT:
    50 frames x 576 patches give 626 tokens, not 28,800. With frame_grid g each frame becomes a g x g
    grid of patch means (row by row), which keeps where things are in each frame: the direction of
    motion needs that, and a frame's mean averages it away (docs/results.md, the perception probe)."""
    if features.dim() != 4:
        raise ValueError(f"expected features [B, T, P, D], got shape {tuple(features.shape)}")
    spatial = features.mean(dim=1)
    if frame_grid == 1:
        return torch.cat([features.mean(dim=2), spatial], dim=1)
    b, t, p, d = features.shape
    if not frame_grid_fits(p, frame_grid):
        raise ValueError(f"frame_grid {frame_grid} does not divide a frame of {p} patches into a square grid")
    cell = math.isqrt(p) // frame_grid
    temporal = features.view(b, t, frame_grid, cell, frame_grid, cell, d).mean(dim=(3, 5)).reshape(b, -1, d)
    return torch.cat([temporal, spatial], dim=1)
