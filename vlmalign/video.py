"""Video decoding, frame sampling and clip spans.

Reads video files with decord (fast, random access) or PyAV (always installed), or folders of frame
images; writes mp4s with PyAV. Bad input raises `VideoError` with a one-line message naming the path.
"""

from __future__ import annotations

import codecs
import collections
import contextlib
import os
import re
import uuid
from fractions import Fraction
from pathlib import Path

import numpy as np

from vlmalign.errors import VideoError

VIDEO_EXTENSIONS: frozenset[str] = frozenset({".mp4", ".avi", ".webm", ".mkv", ".mov", ".m4v", ".gif"})
IMAGE_EXTENSIONS: frozenset[str] = frozenset({".jpg", ".jpeg", ".png", ".bmp", ".webp"})

SAMPLING_METHODS = ("linspace", "segments")
BACKENDS = ("auto", "decord", "pyav")

_LFS_HEADER = b"version https://git-lfs.github.com/spec/v1"


def write_video(path, frames: np.ndarray, fps: float = 8.0) -> None:
    """Write uint8 RGB frames [T, H, W, 3] to `path` atomically (h264 if available, else mpeg4)."""
    import av

    frames = np.asarray(frames)
    if frames.ndim != 4 or frames.shape[-1] != 3 or frames.dtype != np.uint8 or len(frames) == 0:
        raise ValueError(
            f"frames must be a non-empty uint8 array [T, H, W, 3], got {frames.dtype} {frames.shape}"
        )
    height, width = frames.shape[1:3]
    if height % 2 or width % 2:
        # yuv420p subsamples chroma 2x2, so encoders reject odd sizes.
        raise ValueError(f"frame height and width must be even for yuv420p, got {height}x{width}")
    rate = _fps_fraction(fps)
    codec = "libx264" if "libx264" in av.codecs_available else "mpeg4"  # PyAV builds without GPL lack x264
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    # Temp name in the same folder (so os.replace is atomic) keeping the suffix, from which PyAV
    # picks the container format; created by PyAV so it gets normal permissions (mkstemp gives 0600).
    tmp = path.with_name(f".{path.stem}.{uuid.uuid4().hex[:8]}.tmp{path.suffix}")
    try:
        with av.open(str(tmp), mode="w") as container:
            # x264's macroblock-tree rate control gave different pixels for the same frames from run
            # to run (even on one thread); without it a written video is a pure function of its frames.
            options = {"x264-params": "mbtree=0"} if codec == "libx264" else {}
            stream = container.add_stream(codec, rate=rate, options=options)
            stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
            stream.codec_context.thread_count = 1  # one thread per video; the benchmark encodes videos in parallel
            for frame in frames:
                container.mux(stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")))
            container.mux(stream.encode())  # flush delayed frames
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def _fps_fraction(fps: float) -> Fraction:
    """PyAV wants a rational rate; 29.97 must not become 29."""
    if fps <= 0:
        raise ValueError(f"fps must be positive, got {fps}")
    return Fraction(fps).limit_denominator(1001)


def sample_indices(num_total: int, num_samples: int | None, method: str = "linspace") -> list[int]:
    """Indices of `num_samples` frames out of `num_total`; None or <= 0 means all frames."""
    _check_method(method)
    if num_total <= 0:
        return []
    if num_samples is None or num_samples <= 0:
        return list(range(num_total))
    if method == "linspace":
        # As VLM-RLAIF's and Video-LLaVA's loaders: np.linspace(0, n-1, k, dtype=int), which truncates.
        return np.linspace(0, num_total - 1, num_samples).astype(int).tolist()
    # As Video-ChatGPT's get_seq_frames: midpoint of each of k segments of (n-1)/k frames, segment ends
    # rounded. It caps k at n; we keep k (repeating frames) so the token count stays fixed.
    size = (num_total - 1) / num_samples
    return [
        (int(np.round(size * i)) + int(np.round(size * (i + 1)))) // 2 for i in range(num_samples)
    ]


def _check_method(method: str) -> None:
    if method not in SAMPLING_METHODS:
        raise ValueError(f"unknown sampling method {method!r}; choose one of {', '.join(SAMPLING_METHODS)}")


def clip_spans(num_frames: int, max_clip_len: int = 20, num_clips: int | None = None) -> list[tuple[int, int]]:
    """Split positions 0..num_frames-1 into contiguous near-equal [start, end) spans of <= max_clip_len."""
    if max_clip_len <= 0:
        raise ValueError(f"max_clip_len must be positive, got {max_clip_len}")
    if num_frames <= 0:
        return []
    needed = -(-num_frames // max_clip_len)  # ceil
    if num_clips is None:
        num_clips = needed
    elif num_clips <= 0 or num_clips > num_frames:
        raise ValueError(f"num_clips must be in 1..{num_frames} for {num_frames} frames, got {num_clips}")
    elif num_clips < needed:
        raise ValueError(
            f"{num_clips} clip(s) of {num_frames} frames exceed max_clip_len={max_clip_len}; "
            f"need at least {needed} clips"
        )
    # np.array_split sizing: the first (num_frames % num_clips) spans get one extra frame.
    base, extra = divmod(num_frames, num_clips)
    spans, start = [], 0
    for i in range(num_clips):
        end = start + base + (i < extra)
        spans.append((start, end))
        start = end
    return spans


def clip_inputs(frames, clips: int, max_clip_len: int = 20) -> list:
    """Split a video's [T, ...] frames (or per-frame features) into `clips` clips, each stretched back
    to T frames, so a clip gives as many visual tokens as the whole video."""
    num_frames = frames.shape[0]
    out = []
    for start, end in clip_spans(num_frames, max_clip_len, clips):
        stretched = [start + i for i in sample_indices(end - start, num_frames, "linspace")]
        out.append(frames[stretched])
    return out


def count_frames(path, backend: str = "auto") -> int:
    """Number of decodable frames in a video file, or of frame images in a folder."""
    path = Path(path)
    if _check_path(path) == "folder":
        return len(_frame_files(path))
    return _with_backend(path, backend, _decord_count, _pyav_count)


def read_video(path, num_frames: int | None = None, sampling: str = "linspace", backend: str = "auto") -> np.ndarray:
    """Decode sampled frames of a video file or frame folder as uint8 RGB [T, H, W, 3]."""
    _check_method(sampling)  # before any decoding
    path = Path(path)
    if _check_path(path) == "folder":
        files = _frame_files(path)
        return _read_images(path, [files[i] for i in sample_indices(len(files), num_frames, sampling)])
    return _with_backend(
        path,
        backend,
        lambda p: _decord_read(p, num_frames, sampling),
        lambda p: _pyav_read(p, num_frames, sampling),
    )


def video_info(path, backend: str = "auto") -> tuple[int, float | None]:
    """(decodable frames, frames per second) of a video file; a frame folder has no rate (None)."""
    path = Path(path)
    if _check_path(path) == "folder":
        return len(_frame_files(path)), None
    return _with_backend(path, backend, _decord_info, _pyav_info)


def read_frames(path, indices: list[int], backend: str = "auto") -> np.ndarray:
    """Decode the frames at `indices` (positions among the decodable frames, in order, repeats
    allowed) of a video file or frame folder as uint8 RGB [T, H, W, 3]."""
    path = Path(path)
    if _check_path(path) == "folder":
        files = _frame_files(path)
        _check_indices(path, indices, len(files))
        return _read_images(path, [files[i] for i in indices])
    return _with_backend(path, backend, lambda p: _decord_read_at(p, indices), lambda p: _pyav_read_at(p, indices))


def _check_indices(path: Path, indices: list[int], count: int) -> None:
    if not indices or min(indices) < 0 or max(indices) >= count:
        raise VideoError(f"cannot decode video {path}: frames {indices[:1]}..{indices[-1:]} asked, {count} decode "
                         "(fewer than its container declares: truncated or corrupt?)")


# --- input checks -------------------------------------------------------------------------------


def _check_path(path: Path) -> str:
    """Raise VideoError for inputs no backend can read; return "folder" or "file"."""
    if not path.exists():
        raise VideoError(f"video not found: {path}")
    if path.is_dir():
        return "folder"
    if path.suffix.lower() not in VIDEO_EXTENSIONS:
        raise VideoError(
            f"unsupported video extension {path.suffix or '(none)'!r} for {path}; "
            f"supported: {', '.join(sorted(VIDEO_EXTENSIONS))} or a folder of frame images"
        )
    if path.stat().st_size == 0:
        raise VideoError(f"video file is empty (0 bytes): {path}")
    try:
        with open(path, "rb") as f:
            head = f.read(512)
    except OSError as e:
        raise VideoError(f"cannot read video {path}: {e.strerror or e}") from None
    if head.startswith(_LFS_HEADER):
        raise VideoError(f"{path} is a Git LFS pointer, not video data; run `git lfs pull` to fetch the real file")
    # Every supported container starts with binary header fields within its first bytes, so a head
    # that is all printable text is a saved error message or web page (e.g. "fatal: bad object ...").
    text = _as_text(head)
    if text is not None:
        first_line = (text.strip().splitlines() or [""])[0][:80]
        raise VideoError(f"{path} is a text file, not video data (starts with {first_line!r})")
    return "file"


def _as_text(data: bytes) -> str | None:
    """`data` decoded as UTF-8 if it is printable text, else None."""
    try:
        # Incremental, so a multi-byte character cut at the end of `data` is not an error.
        text = codecs.getincrementaldecoder("utf-8")().decode(data, final=False)
    except UnicodeDecodeError:
        return None
    return text if all(c.isprintable() or c in "\t\n\r" for c in text) else None


def _natural_key(name: str):
    """Sort key that orders frame_2 before frame_10."""
    return [int(part) if part.isdigit() else part.lower() for part in re.split(r"(\d+)", name)]


def _frame_files(folder: Path) -> list[Path]:
    files = [p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS]
    if not files:
        raise VideoError(
            f"no frame images ({', '.join(sorted(IMAGE_EXTENSIONS))}) in folder {folder}"
        )
    return sorted(files, key=lambda p: _natural_key(p.name))


def _read_images(folder: Path, files: list[Path]) -> np.ndarray:
    from PIL import Image

    frames, size = [], None
    for file in files:
        try:
            with Image.open(file) as image:
                frame = np.asarray(image.convert("RGB"))
        except Exception as e:  # PIL raises several types for bad images
            raise VideoError(f"cannot read frame image {file}: {_short(e)}") from None
        if size is None:
            size = frame.shape
        elif frame.shape != size:
            raise VideoError(
                f"frame {file} is {frame.shape[1]}x{frame.shape[0]} but earlier frames in {folder} "
                f"are {size[1]}x{size[0]}; all frames must share one size"
            )
        frames.append(frame)
    return np.stack(frames)


def _short(error: Exception) -> str:
    """A one-line reason from a backend exception, so VideoError stays one line."""
    # PyAV errors carry FFmpeg's reason apart from the file name, which the message already has.
    text = getattr(error, "strerror", None) or str(error).strip() or type(error).__name__
    # decord prefixes "[12:00:00] /src/file.cc:123: " (often nested) to its C++ messages.
    text = re.sub(r"\[[\d:]+\] \S+:\d+: ", "", text.splitlines()[0])
    return text[:200]


# --- backends -----------------------------------------------------------------------------------


def _with_backend(path: Path, backend: str, with_decord, with_pyav):
    """Run the decord reader, or PyAV when forced, decord is missing, or decord fails."""
    if backend not in BACKENDS:
        raise ValueError(f"unknown video backend {backend!r}; choose one of {', '.join(BACKENDS)}")
    if backend == "pyav":
        return with_pyav(path)
    if backend == "decord":
        return with_decord(path)
    try:
        import decord  # noqa: F401  (optional dependency)
    except ImportError:
        return with_pyav(path)
    try:
        return with_decord(path)
    except VideoError as decord_error:
        try:
            return with_pyav(path)
        except VideoError as pyav_error:
            # Both failed: PyAV's reason names the format problem; decord's is usually a C++ dump.
            raise pyav_error from decord_error


def _open_decord(path: Path):
    try:
        import decord
    except ImportError:
        raise ImportError("backend='decord' needs decord: pip install 'vlmalign[decord]'") from None
    try:
        with _quiet_stderr():
            # One thread per reader: data loaders already run many readers in parallel workers.
            return decord.VideoReader(str(path), ctx=decord.cpu(0), num_threads=1)
    except Exception as e:  # decord raises DECORDError / RuntimeError with multi-line C++ traces
        raise VideoError(f"cannot decode video {path}: {_short(e)}") from None


def _decord_count(path: Path) -> int:
    count = len(_open_decord(path))
    if count == 0:
        raise VideoError(f"video has no decodable frames: {path}")
    return count


def _decord_info(path: Path) -> tuple[int, float | None]:
    reader = _open_decord(path)
    if len(reader) == 0:
        raise VideoError(f"video has no decodable frames: {path}")
    return len(reader), float(reader.get_avg_fps()) or None


def _decord_read(path: Path, num_frames: int | None, sampling: str) -> np.ndarray:
    reader = _open_decord(path)
    indices = sample_indices(len(reader), num_frames, sampling)
    if not indices:
        raise VideoError(f"video has no decodable frames: {path}")
    return _decord_batch(path, reader, indices)


def _decord_read_at(path: Path, indices: list[int]) -> np.ndarray:
    reader = _open_decord(path)
    _check_indices(path, indices, len(reader))
    return _decord_batch(path, reader, indices)


def _decord_batch(path: Path, reader, indices: list[int]) -> np.ndarray:
    try:
        with _quiet_stderr():
            if path.suffix.lower() != ".avi":
                return reader.get_batch(indices).asnumpy()
            # decord's seeking in AVI returns wrong frames (dmlc/decord#195, #252; the LLaMA-Factory
            # 2.avi fixture gives frame 6 for 53), so decode in order and keep the sampled positions.
            wanted = collections.Counter(indices)
            frames = []
            for position in range(max(indices) + 1):
                frame = reader.next()
                if position in wanted:
                    frames.extend([frame.asnumpy()] * wanted[position])
            return np.stack(frames)
    except Exception as e:
        raise VideoError(f"cannot decode video {path}: {_short(e)}") from None


def _pyav_open(path: Path):
    """Open `path` with PyAV; return (container, first video stream)."""
    import av

    try:
        container = av.open(str(path))
    except av.FFmpegError as e:
        raise VideoError(f"cannot decode video {path}: {_short(e)}") from None
    if not container.streams.video:
        container.close()
        raise VideoError(f"cannot decode video {path}: no video stream")
    return container, container.streams.video[0]


def _pyav_frames(path: Path):
    """Yield the decoded frames of the first video stream in order."""
    import av

    container, stream = _pyav_open(path)
    # PyAV's default slice threading, not frame threading: frame threads swallow the decode error of
    # a truncated file's last packet, so a cut-off video would pass as a shorter one.
    position = 0
    with container:
        try:
            for frame in container.decode(stream):
                yield frame
                position += 1
        except av.FFmpegError as e:
            raise VideoError(
                f"cannot decode video {path}: {_short(e)} after {position} frames (truncated or corrupt?)"
            ) from None


def _pyav_count(path: Path) -> int:
    # Count by decoding: stream.frames is 0 for some containers (mkv, webm) and can disagree with
    # what actually decodes.
    count = sum(1 for _ in _pyav_frames(path))
    if count == 0:
        raise VideoError(f"video has no decodable frames: {path}")
    return count


def _pyav_info(path: Path) -> tuple[int, float | None]:
    # the container's frame count when it has one (decoding checks it: `_pyav_read_at`), else count by decoding
    container, stream = _pyav_open(path)
    with container:
        declared, rate = stream.frames, stream.average_rate or stream.guessed_rate
    return declared if declared > 0 else _pyav_count(path), float(rate) if rate else None


def _pyav_read_at(path: Path, indices: list[int]) -> np.ndarray:
    frames, count = _pyav_collect(path, indices)
    _check_indices(path, indices, count)
    return np.stack(frames)


def _pyav_collect(path: Path, indices: list[int]) -> tuple[list[np.ndarray], int]:
    """Decode the whole stream, keeping frames at `indices` (repeats allowed); also return the count."""
    # Sequential decoding, because seeking is unreliable across codecs and containers.
    wanted = collections.Counter(indices)
    frames, count = [], 0
    for position, frame in enumerate(_pyav_frames(path)):
        if position in wanted:
            frames.extend([frame.to_ndarray(format="rgb24")] * wanted[position])
        count = position + 1
    return frames, count


def _pyav_read(path: Path, num_frames: int | None, sampling: str) -> np.ndarray:
    # Sampling needs the frame count up front. Use the container's count when it has one, and keep the
    # result only if the same pass decodes exactly that many frames; else count by decoding and resample.
    container, stream = _pyav_open(path)
    with container:
        declared = stream.frames
    if declared > 0:
        frames, decoded = _pyav_collect(path, sample_indices(declared, num_frames, sampling))
        if decoded == declared:
            return np.stack(frames)
    frames, _ = _pyav_collect(path, sample_indices(_pyav_count(path), num_frames, sampling))
    return np.stack(frames)


@contextlib.contextmanager
def _quiet_stderr():
    """Silence native (C-level) stderr, where decord prints FFmpeg warnings Python cannot catch."""
    try:
        fd = os.dup(2)
    except OSError:  # no real stderr (e.g. some embedded interpreters): nothing to silence
        yield
        return
    try:
        with open(os.devnull, "w") as devnull:
            os.dup2(devnull.fileno(), 2)
            yield
    finally:
        os.dup2(fd, 2)
        os.close(fd)
