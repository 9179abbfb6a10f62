"""Visual inputs for training and inference, with an on-disk cache of CLIP features.

Decoding a video and running the vision tower dominate the cost of a small training step and repeat
identically every epoch and stage, so the features of a frozen tower are computed once and stored
(safetensors) under a key of the video file (path, size, mtime), the frame count and sampling, and
the tower's fingerprint (its pretrained name, or a hash of its weights when randomly initialised).
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from vlmalign.model.vision import preprocess_frames
from vlmalign.video import read_frames, read_video, video_info


def _video_identity(video: str | list[str]) -> str:
    paths = [video] if isinstance(video, str) else list(video)
    parts = []
    for p in paths:
        p = os.path.abspath(p)
        try:
            st = os.stat(p)
            parts.append(f"{p}:{st.st_size}:{st.st_mtime_ns}")
        except OSError:
            parts.append(p)  # missing: read_video reports it with a clear error
    return "|".join(parts)


def load_frames(video: str | list[str], num_frames: int, sampling: str) -> np.ndarray:
    """uint8 [T, H, W, 3] frames of a video file, a frame folder, or a list of frame images."""
    if isinstance(video, str):
        return read_video(video, num_frames=num_frames, sampling=sampling)
    from vlmalign.video import sample_indices

    return load_frames_at(video, sample_indices(len(video), num_frames, sampling))


def load_frames_at(video: str | list[str], indices: list[int]) -> np.ndarray:
    """uint8 [T, H, W, 3]: the frames at `indices` (in order) of a video file, a frame folder, or a
    list of frame images."""
    if isinstance(video, str):
        return read_frames(video, indices)
    from PIL import Image

    from vlmalign.errors import VideoError

    if not video:
        raise VideoError("empty list of frame images")
    frames = []
    for path in [video[i] for i in indices]:
        try:
            with Image.open(path) as img:
                frames.append(np.asarray(img.convert("RGB")))
        except OSError as exc:
            raise VideoError(f"cannot read frame image {path}: {exc}") from None
    return np.stack(frames)


def frame_count_and_rate(video: str | list[str]) -> tuple[int, float | None]:
    """(frames, frames per second) of a video file; a frame folder or list of images has no rate."""
    return video_info(video) if isinstance(video, str) else (len(video), None)


class VisualInputs:
    """Per video: cached features [T, P, D] (frozen tower) or preprocessed frames [T, 3, S, S]."""

    def __init__(self, model, cache_dir: str | None):
        self.model = model
        self.num_frames = model.cfg.num_frames
        self.sampling = model.cfg.frame_sampling
        self.use_features = model.cfg.vision.frozen
        self.cache_dir = None
        if cache_dir and self.use_features:
            self.cache_dir = Path(cache_dir) / model.vision.fingerprint()
            self.cache_dir.mkdir(parents=True, exist_ok=True)
        self.hits = 0
        self.misses = 0

    def _cache_path(self, video) -> Path:
        key = f"{_video_identity(video)}|{self.num_frames}|{self.sampling}"
        return self.cache_dir / f"{hashlib.sha256(key.encode()).hexdigest()[:32]}.safetensors"

    def pixels(self, video) -> torch.Tensor:
        return preprocess_frames(load_frames(video, self.num_frames, self.sampling), self.model.vision.image_size)

    @torch.no_grad()
    def features(self, videos: list) -> list[torch.Tensor]:
        """Vision features for each video, from the cache where present; misses computed in one batch."""
        out: list[torch.Tensor | None] = [None] * len(videos)
        todo = []
        for i, video in enumerate(videos):
            path = self._cache_path(video) if self.cache_dir else None
            if path is not None and path.is_file():
                out[i] = load_file(path)["features"]
                self.hits += 1
            else:
                todo.append(i)
        if todo:
            self.misses += len(todo)
            pixels = torch.stack([self.pixels(videos[i]) for i in todo]).to(self.model.device)
            feats = self.model.video_features(pixels).cpu()
            for i, f in zip(todo, feats):
                out[i] = f.contiguous()
                if self.cache_dir:
                    path = self._cache_path(videos[i])
                    tmp = path.with_suffix(f".tmp{os.getpid()}")
                    save_file({"features": out[i]}, tmp)
                    os.replace(tmp, path)
        return out

    def batch(self, videos: list) -> list[torch.Tensor]:
        """What `get` gives, for several videos (feature cache misses computed together)."""
        return self.features(videos) if self.use_features else [self.pixels(v) for v in videos]

    def clips(self, video, clips: int, max_clip_len: int = 20) -> list[torch.Tensor]:
        """`get`'s input of `clips` clips of the video (VLM-RLAIF's narratives), each T frames long."""
        from vlmalign.video import clip_inputs

        return clip_inputs(self.get(video), clips, max_clip_len)

    def get(self, video) -> torch.Tensor:
        """Features [T, P, D] if the tower is frozen, else preprocessed frames [T, 3, S, S]."""
        return self.features([video])[0] if self.use_features else self.pixels(video)

    def precompute(self, videos: list, batch_size: int = 8, progress: bool = True) -> None:
        """Fill the cache for `videos` (distinct ones, in batches) before training starts."""
        if not self.cache_dir:
            return
        from tqdm.auto import tqdm

        unique = list(dict.fromkeys(v if isinstance(v, str) else tuple(v) for v in videos))
        missing = [v for v in unique if not self._cache_path(v if isinstance(v, str) else list(v)).is_file()]
        with tqdm(total=len(missing), desc="video features", disable=not progress or not missing, unit="video") as bar:
            for start in range(0, len(missing), batch_size):
                chunk = [v if isinstance(v, str) else list(v) for v in missing[start : start + batch_size]]
                self.features(chunk)
                bar.update(len(chunk))
