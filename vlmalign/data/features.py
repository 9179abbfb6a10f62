"""Visual inputs for training and inference, with an on-disk cache of CLIP features.

Decoding a video and running the vision tower dominate the cost of a small training step and repeat
identically every epoch and stage, so the features of a frozen tower are computed once and stored
(safetensors) under a key of the video file (path, size, mtime), the frame count and sampling, and
the tower's fingerprint (its pretrained name, or a hash of its weights when randomly initialised).
`VideoCache` holds the storing, shared with the HF video models' pixel cache (`model/hf_video.py`).
"""

from __future__ import annotations

import hashlib
import logging
import os
import tempfile
from pathlib import Path

import numpy as np
import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from vlmalign.model.vision import preprocess_frames
from vlmalign.video import read_frames, read_video, video_info

log = logging.getLogger(__name__)


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


class VideoCache:
    """A folder of safetensors files, one per video: named by a hash of the video's identity (each
    file's path, size and mtime, so a touched or replaced video misses) and of `settings`, whatever
    else decides the stored tensors. An entry is written to a temporary file and renamed into place,
    so a reader, or another process writing the same entry, never sees half of one."""

    def __init__(self, folder: Path):
        self.folder = Path(folder)
        self.folder.mkdir(parents=True, exist_ok=True)

    def path(self, video: str | list[str], settings: str = "") -> Path:
        key = f"{_video_identity(video)}|{settings}" if settings else _video_identity(video)
        return self.folder / f"{hashlib.sha256(key.encode()).hexdigest()[:32]}.safetensors"

    def read(self, path: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]] | None:
        """The entry's tensors and metadata; None when it is absent or unreadable. An unreadable one
        is only logged, then computed and written again: it holds nothing that cannot be recomputed,
        and a machine that crashed before flushing a renamed file can leave it truncated."""
        if not path.is_file():
            return None
        try:
            with safe_open(path, framework="pt") as f:
                return {key: f.get_tensor(key) for key in f.keys()}, f.metadata() or {}
        except (SafetensorError, OSError) as exc:
            log.warning("%s: unreadable cache entry (%s); computing it again", path, exc)
            return None

    def write(self, path: Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str] | None = None) -> None:
        fd, tmp = tempfile.mkstemp(dir=self.folder, prefix=path.stem, suffix=".tmp")  # unique per writer
        os.close(fd)
        try:
            save_file({key: t.contiguous() for key, t in tensors.items()}, tmp, metadata)
            os.replace(tmp, path)
        except BaseException:
            os.unlink(tmp)
            raise


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
        self.cache = VideoCache(Path(cache_dir) / model.vision.fingerprint()) if cache_dir and self.use_features else None
        self.cache_dir = self.cache.folder if self.cache else None
        self.hits = 0
        self.misses = 0

    def _cache_path(self, video) -> Path:
        return self.cache.path(video, f"{self.num_frames}|{self.sampling}")

    def pixels(self, video) -> torch.Tensor:
        return preprocess_frames(load_frames(video, self.num_frames, self.sampling), self.model.vision.image_size)

    @torch.no_grad()
    def features(self, videos: list) -> list[torch.Tensor]:
        """Vision features for each video, from the cache where present; misses computed in one batch."""
        out: list[torch.Tensor | None] = [None] * len(videos)
        todo = []
        for i, video in enumerate(videos):
            entry = self.cache.read(self._cache_path(video)) if self.cache else None
            if entry is not None:
                out[i] = entry[0]["features"]
                self.hits += 1
            else:
                todo.append(i)
        if todo:
            self.misses += len(todo)
            pixels = torch.stack([self.pixels(videos[i]) for i in todo]).to(self.model.device)
            feats = self.model.video_features(pixels).cpu()
            for i, f in zip(todo, feats):
                out[i] = f.contiguous()
                if self.cache:
                    self.cache.write(self._cache_path(videos[i]), {"features": out[i]})
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
        if not self.cache:
            return
        from tqdm.auto import tqdm

        unique = list(dict.fromkeys(v if isinstance(v, str) else tuple(v) for v in videos))
        missing = [v for v in unique if not self._cache_path(v if isinstance(v, str) else list(v)).is_file()]
        with tqdm(total=len(missing), desc="video features", disable=not progress or not missing, unit="video") as bar:
            for start in range(0, len(missing), batch_size):
                chunk = [v if isinstance(v, str) else list(v) for v in missing[start : start + batch_size]]
                self.features(chunk)
                bar.update(len(chunk))
