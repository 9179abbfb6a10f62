"""CLIP vision tower: frames in, penultimate-layer patch features out.

Default backend: transformers `CLIPVisionModel` (no torchvision needed). Optional backend:
open_clip, imported only when selected because it pulls torchvision.
"""

from __future__ import annotations

import hashlib
import importlib

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from vlmalign.config import VisionConfig
from vlmalign.errors import ConfigError

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


def preprocess_frames(frames: np.ndarray | torch.Tensor, image_size: int) -> torch.Tensor:
    """uint8 [T, H, W, 3] -> normalised float [T, 3, S, S]: CLIP's resize-shorter-side + centre crop."""
    x = torch.as_tensor(frames).permute(0, 3, 1, 2).float() / 255.0
    h, w = x.shape[-2:]
    scale = image_size / min(h, w)
    new_h, new_w = max(image_size, round(h * scale)), max(image_size, round(w * scale))
    if (new_h, new_w) != (h, w):
        x = F.interpolate(x, size=(new_h, new_w), mode="bicubic", antialias=True, align_corners=False).clamp(0, 1)
    top, left = (new_h - image_size) // 2, (new_w - image_size) // 2
    x = x[:, :, top : top + image_size, left : left + image_size]
    mean = torch.tensor(CLIP_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(CLIP_STD).view(1, 3, 1, 1)
    return (x - mean) / std


class VisionTower(nn.Module):
    """Patch features [N, P, D] from the configured layer (LLaVA: -2, CLS token dropped)."""

    def __init__(self, cfg: VisionConfig, model: nn.Module | None = None):
        super().__init__()
        self.cfg = cfg
        if cfg.backend == "hf":
            self.model = model if model is not None else self._load_hf(cfg)
            self.image_size = self.model.config.image_size
            self.hidden_size = self.model.config.hidden_size
            self.num_patches = (self.image_size // self.model.config.patch_size) ** 2
        else:
            self.model, self.image_size, self.hidden_size, self.num_patches = self._load_open_clip(cfg)
        if cfg.frozen:
            self.model.requires_grad_(False)

    @staticmethod
    def _load_hf(cfg: VisionConfig) -> nn.Module:
        from transformers import CLIPVisionConfig, CLIPVisionModel

        if cfg.pretrained:
            return CLIPVisionModel.from_pretrained(cfg.pretrained)
        try:
            return CLIPVisionModel(CLIPVisionConfig(**cfg.arch))
        except TypeError as exc:
            raise ConfigError(f"model.vision.arch: {exc}") from None

    @staticmethod
    def _load_open_clip(cfg: VisionConfig):
        if not cfg.pretrained or "/" not in cfg.pretrained:
            raise ConfigError("model.vision.pretrained must be 'MODEL/PRETRAINED' for the open_clip backend")
        try:
            open_clip = importlib.import_module("open_clip")
        except Exception as exc:  # torchvision that cannot load against this torch fails here
            raise ConfigError(
                f"model.vision.backend 'open_clip' needs `pip install vlmalign[openclip]` with a working torchvision: {exc}"
            ) from None
        name, pretrained = cfg.pretrained.split("/", 1)
        model = open_clip.create_model(name, pretrained=pretrained).visual
        image_size = model.image_size[0] if isinstance(model.image_size, tuple) else model.image_size
        patch = model.patch_size[0] if isinstance(model.patch_size, tuple) else model.patch_size
        return model, image_size, model.transformer.width, (image_size // patch) ** 2

    def fingerprint(self) -> str:
        """Identifies what the tower computes: the pretrained name, or a hash of random-init weights."""
        h = hashlib.sha256(f"{self.cfg.backend}|{self.cfg.pretrained}|{self.cfg.select_layer}".encode())
        if not self.cfg.pretrained or not self.cfg.frozen:
            for name, tensor in sorted(self.model.state_dict().items()):
                h.update(name.encode())
                h.update(tensor.detach().float().cpu().numpy().tobytes())
        return h.hexdigest()[:16]

    @property
    def dtype(self) -> torch.dtype:
        return next(self.model.parameters()).dtype

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        pixel_values = pixel_values.to(self.dtype)
        if self.cfg.backend == "hf":
            out = self.model(pixel_values=pixel_values, output_hidden_states=True)
            return out.hidden_states[self.cfg.select_layer][:, 1:]
        return self._open_clip_features(pixel_values)

    def _open_clip_features(self, pixel_values: torch.Tensor) -> torch.Tensor:
        captured = {}
        block = self.model.transformer.resblocks[self.cfg.select_layer]
        handle = block.register_forward_hook(lambda _m, _i, out: captured.setdefault("x", out))
        try:
            self.model(pixel_values)
        finally:
            handle.remove()
        x = captured["x"]
        if x.shape[0] != pixel_values.shape[0]:  # older open_clip blocks are sequence-first
            x = x.transpose(0, 1)
        return x[:, -self.num_patches :]
