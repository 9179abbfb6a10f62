"""Tests for vlmalign.video: sampling, clip spans, writing, and decoding real third-party videos."""

import importlib.util
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from vlmalign.errors import VideoError
from vlmalign.video import (
    IMAGE_EXTENSIONS,
    VIDEO_EXTENSIONS,
    clip_spans,
    count_frames,
    read_frames,
    read_video,
    sample_indices,
    video_info,
    write_video,
)

FIXTURES = Path(__file__).resolve().parents[2] / "shared" / "fixtures"

# (path under fixtures, frame count, (height, width)) as listed in fixtures/README.md
REAL_VIDEOS = [
    ("videos/small_224.mp4", 150, (224, 224)),
    ("llamafactory/mllm_demo_data/2.avi", 270, (240, 320)),
    ("videos/msrvtt_sample.mp4", 780, (240, 320)),
    ("llamafactory/mllm_demo_data/1.mp4", 243, (360, 640)),
    ("llamafactory/mllm_demo_data/3.mp4", 146, (360, 640)),
]
HAS_DECORD = importlib.util.find_spec("decord") is not None
needs_decord = pytest.mark.skipif(not HAS_DECORD, reason="decord is not installed (optional extra: pip install 'vlmalign[decord]')")
# Each reader backend as a test parameter; decord's cases skip, with the reason, where the extra is absent.
BACKENDS = [pytest.param("decord", marks=needs_decord), "pyav"]


def fixture(relative: str) -> Path:
    path = FIXTURES / relative
    if not path.exists():
        pytest.skip(f"real-video fixture {path} is absent (CI clones shared/ beside the repo)")
    return path


def assert_video_error(path, call=read_video, **kwargs) -> str:
    """`call(path)` raises a one-line VideoError naming `path`; return the message."""
    with pytest.raises(VideoError) as info:
        call(path, **kwargs)
    message = str(info.value)
    assert str(path) in message
    assert "\n" not in message
    return message


# --- sampling and clips ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("total", "k", "method", "expected"),
    [
        (10, 4, "linspace", [0, 3, 6, 9]),
        # np.linspace(0, 149, 8) = 0, 21.3, 42.6, 63.9, 85.1, 106.4, 127.7, 149, truncated
        (150, 8, "linspace", [0, 21, 42, 63, 85, 106, 127, 149]),
        (3, 5, "linspace", [0, 0, 1, 1, 2]),  # k > n repeats frames
        (1, 3, "linspace", [0, 0, 0]),
        # segments of 99/4 = 24.75 frames with rounded ends 0, 25, 50, 74, 99 (Video-ChatGPT)
        (100, 4, "segments", [12, 37, 62, 86]),
        (10, 2, "segments", [2, 6]),  # ends 0, round(4.5) = 4, 9
        (3, 5, "segments", [0, 0, 1, 1, 2]),
        (5, None, "linspace", [0, 1, 2, 3, 4]),
        (5, 0, "segments", [0, 1, 2, 3, 4]),
        (0, 4, "linspace", []),
    ],
)
def test_sample_indices(total, k, method, expected):
    assert sample_indices(total, k, method) == expected


def test_sample_indices_always_k_sorted_in_range():
    for total in (1, 2, 7, 50, 101):
        for k in (1, 3, 50, 100, 120):
            for method in ("linspace", "segments"):
                indices = sample_indices(total, k, method)
                assert len(indices) == k
                assert indices == sorted(indices)
                assert 0 <= indices[0] and indices[-1] <= total - 1


def test_sample_indices_unknown_method():
    with pytest.raises(ValueError, match="linspace, segments"):
        sample_indices(10, 4, "random")


def test_clip_spans_fewest_near_equal():
    assert clip_spans(50) == [(0, 17), (17, 34), (34, 50)]
    assert clip_spans(40) == [(0, 20), (20, 40)]
    assert clip_spans(7) == [(0, 7)]
    assert clip_spans(0) == []


def test_clip_spans_given_count():
    assert clip_spans(50, num_clips=3) == [(0, 17), (17, 34), (34, 50)]
    assert clip_spans(50, num_clips=5) == [(i * 10, i * 10 + 10) for i in range(5)]
    assert clip_spans(10, max_clip_len=4, num_clips=4) == [(0, 3), (3, 6), (6, 8), (8, 10)]


def test_clip_spans_cover_every_frame_once():
    for frames in (1, 19, 20, 21, 99, 780):
        spans = clip_spans(frames, max_clip_len=20)
        assert spans[0][0] == 0 and spans[-1][1] == frames
        assert all(a[1] == b[0] for a, b in zip(spans, spans[1:]))
        sizes = [end - start for start, end in spans]
        assert max(sizes) <= 20 and max(sizes) - min(sizes) <= 1
        assert len(spans) == -(-frames // 20)


def test_clip_spans_too_few_clips():
    with pytest.raises(ValueError, match="need at least 3 clips"):
        clip_spans(50, max_clip_len=20, num_clips=1)
    with pytest.raises(ValueError):
        clip_spans(5, num_clips=6)


# --- writing and reading our own videos ------------------------------------------------------------


def gradient_frames(count: int, height: int = 64, width: int = 64) -> np.ndarray:
    """Frames whose brightness rises with their index, so decoded order can be checked."""
    levels = np.linspace(20, 235, count).astype(np.uint8)
    return np.broadcast_to(levels[:, None, None, None], (count, height, width, 3)).copy()


# mkv records no frame count (PyAV's stream.frames is 0), so PyAV must count by decoding.
@pytest.mark.parametrize("suffix", [".mp4", ".mkv"])
@pytest.mark.parametrize("backend", ["auto", *BACKENDS])
def test_write_video_round_trip(tmp_path, backend, suffix):
    frames = gradient_frames(16)
    path = tmp_path / "new" / "dir" / f"clip{suffix}"
    write_video(path, frames, fps=8)
    assert [p.name for p in path.parent.iterdir()] == [path.name]  # no temp file left
    assert count_frames(path, backend=backend) == 16
    decoded = read_video(path, backend=backend)
    assert decoded.shape == (16, 64, 64, 3) and decoded.dtype == np.uint8
    # lossy codec: flat gray frames come back within a few levels
    np.testing.assert_allclose(decoded.mean(axis=(1, 2, 3)), frames.mean(axis=(1, 2, 3)), atol=3)


def test_write_video_rejects_odd_size_and_bad_dtype(tmp_path):
    with pytest.raises(ValueError, match="even"):
        write_video(tmp_path / "odd.mp4", np.zeros((2, 63, 64, 3), np.uint8))
    with pytest.raises(ValueError, match="uint8"):
        write_video(tmp_path / "float.mp4", np.zeros((2, 64, 64, 3), np.float32))
    assert list(tmp_path.iterdir()) == []


def test_write_video_replaces_existing(tmp_path):
    path = tmp_path / "clip.mp4"
    write_video(path, gradient_frames(4))
    write_video(path, gradient_frames(6))
    assert count_frames(path) == 6


@pytest.mark.parametrize("backend", BACKENDS)
def test_read_video_repeats_frames_when_asking_for_more(tmp_path, backend):
    path = tmp_path / "short.mp4"
    write_video(path, gradient_frames(4))
    means = read_video(path, num_frames=7, backend=backend).mean(axis=(1, 2, 3))
    assert len(means) == 7
    # indices [0, 0, 1, 1, 2, 2, 3]
    assert means[0] == means[1] and means[2] == means[3] and means[0] < means[2] < means[6]


# mkv records no frame count: the count comes from decoding there, from the container for mp4
@pytest.mark.parametrize("suffix", [".mp4", ".mkv"])
@pytest.mark.parametrize("backend", BACKENDS)
def test_video_info_and_frames_at_given_positions(tmp_path, backend, suffix):
    path = tmp_path / f"clip{suffix}"
    write_video(path, gradient_frames(12), fps=6)
    assert video_info(path, backend=backend) == (12, 6.0)
    every = read_video(path, backend=backend)
    np.testing.assert_array_equal(read_frames(path, [0, 0, 5, 11], backend=backend), every[[0, 0, 5, 11]])
    assert "frames [3]..[12] asked, 12 decode" in assert_video_error(path, read_frames, indices=[3, 12], backend=backend)
    for i, frame in enumerate(every[:3]):
        Image.fromarray(frame).save(tmp_path / f"frame_{i}.png")
    assert video_info(tmp_path) == (3, None)  # a frame folder has no rate
    np.testing.assert_array_equal(read_frames(tmp_path, [0, 2, 2]), every[[0, 2, 2]])


def test_frame_folder_natural_order(tmp_path):
    # frame_2 must come before frame_10; brightness encodes the true position
    for i in range(1, 13):
        Image.fromarray(np.full((8, 10, 3), i * 20, np.uint8)).save(tmp_path / f"frame_{i}.png")
    (tmp_path / "notes.txt").write_text("not a frame")
    assert count_frames(tmp_path) == 12
    frames = read_video(tmp_path)
    assert frames.shape == (12, 8, 10, 3) and frames.dtype == np.uint8
    assert frames[:, 0, 0, 0].tolist() == [i * 20 for i in range(1, 13)]
    # linspace(0, 11, 4) -> 0, 3, 7, 11 -> frame_1, frame_4, frame_8, frame_12
    assert read_video(tmp_path, num_frames=4)[:, 0, 0, 0].tolist() == [20, 80, 160, 240]


def test_frame_folder_converts_to_rgb(tmp_path):
    Image.new("L", (4, 4), 100).save(tmp_path / "0.jpg")
    Image.new("RGBA", (4, 4), (10, 20, 30, 0)).save(tmp_path / "1.png")
    frames = read_video(tmp_path)
    assert frames.shape == (2, 4, 4, 3)
    assert frames[1, 0, 0].tolist() == [10, 20, 30]


def test_frame_folder_mixed_sizes(tmp_path):
    Image.new("RGB", (4, 4)).save(tmp_path / "1.png")
    Image.new("RGB", (6, 4)).save(tmp_path / "2.png")
    message = assert_video_error(tmp_path)
    assert "2.png" in message


# --- real third-party videos -----------------------------------------------------------------------


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize(("relative", "frames", "size"), REAL_VIDEOS, ids=[v[0] for v in REAL_VIDEOS])
def test_real_video_frame_counts(relative, frames, size, backend):
    assert count_frames(fixture(relative), backend=backend) == frames


@pytest.mark.parametrize(("relative", "frames", "size"), REAL_VIDEOS, ids=[v[0] for v in REAL_VIDEOS])
def test_real_video_shapes(relative, frames, size):
    video = read_video(fixture(relative), num_frames=8)
    assert video.shape == (8, *size, 3) and video.dtype == np.uint8


@needs_decord
@pytest.mark.parametrize("sampling", ["linspace", "segments"])
@pytest.mark.parametrize(("relative", "frames", "size"), REAL_VIDEOS, ids=[v[0] for v in REAL_VIDEOS])
def test_backends_pick_the_same_frames(relative, frames, size, sampling):
    path = fixture(relative)
    by_decord = read_video(path, num_frames=6, sampling=sampling, backend="decord")
    by_pyav = read_video(path, num_frames=6, sampling=sampling, backend="pyav")
    # Both wrap FFmpeg's decoders, so the same frame comes back (nearly) bit-identical, while
    # neighbouring frames of these clips differ by >= 0.16 levels per pixel on average: this catches
    # an off-by-one frame, which comparing frame means would not (neighbour means can differ by 0.001).
    per_frame = np.abs(by_decord.astype(np.int16) - by_pyav).mean(axis=(1, 2, 3))
    assert per_frame.max() < 0.05, per_frame


def test_real_video_all_frames_in_order():
    path = fixture("videos/small_224.mp4")
    every = read_video(path, backend="pyav")
    assert len(every) == 150
    sampled = read_video(path, num_frames=5, sampling="segments", backend="pyav")
    np.testing.assert_array_equal(sampled, every[sample_indices(150, 5, "segments")])


# --- bad input -------------------------------------------------------------------------------------


@pytest.mark.parametrize("backend", ["auto", "decord", "pyav"])  # checked before any decoder is imported
def test_missing_video(tmp_path, backend):
    path = tmp_path / "nope.mp4"
    assert assert_video_error(path, backend=backend) == f"video not found: {path}"
    assert_video_error(path, call=count_frames)


def test_empty_file(tmp_path):
    path = tmp_path / "empty.mp4"
    path.touch()
    assert "empty" in assert_video_error(path)


def test_git_lfs_pointer(tmp_path):
    path = tmp_path / "clip.mp4"
    path.write_text(
        "version https://git-lfs.github.com/spec/v1\n"
        "oid sha256:4d7a214614ab2935c943f9e0ff69d22eadbb8f32b1258daaa5e2ca24d17e2393\n"
        "size 1048576\n"
    )
    for backend in ["auto", "decord", "pyav"]:  # recognised before any decoder is imported
        message = assert_video_error(path, backend=backend)
        assert "Git LFS pointer" in message and "git lfs pull" in message


def test_text_saved_as_video_fixture():
    # The fixture named git_lfs_pointer.mp4 actually holds git's "fatal: bad object HEAD:..." output.
    path = fixture("videos/git_lfs_pointer.mp4")
    message = assert_video_error(path)
    assert "not video data" in message and "fatal: bad object" in message
    assert_video_error(path, call=count_frames)


@pytest.mark.parametrize("backend", ["auto", *BACKENDS])
def test_random_bytes(tmp_path, backend):
    path = tmp_path / "random.mp4"
    path.write_bytes(np.random.default_rng(0).integers(0, 256, 4096, dtype=np.uint8).tobytes())
    assert f"cannot decode video {path}: " in assert_video_error(path, backend=backend)


@pytest.mark.parametrize("backend", ["auto", *BACKENDS])
def test_truncated_real_mp4(tmp_path, backend):
    path = tmp_path / "truncated.mp4"
    path.write_bytes(fixture("videos/small_224.mp4").read_bytes()[:2048])
    assert f"cannot decode video {path}: " in assert_video_error(path, backend=backend)
    assert_video_error(path, call=count_frames, backend=backend)


def test_pyav_reports_truncation_mid_stream(tmp_path):
    # AVI without its trailing index still opens; decoding then fails where the data stops.
    path = tmp_path / "half.avi"
    data = fixture("llamafactory/mllm_demo_data/2.avi").read_bytes()
    path.write_bytes(data[: len(data) // 2])
    message = assert_video_error(path, backend="pyav")
    assert "truncated or corrupt" in message


def test_video_with_no_decodable_frames(tmp_path):
    import av

    # An mkv whose mpeg4 stream holds only empty frame headers: it opens, but decodes to nothing.
    path = tmp_path / "hollow.mkv"
    with av.open(str(path), "w") as container:
        stream = container.add_stream("mpeg4", rate=8)
        stream.width, stream.height, stream.pix_fmt = 64, 64, "yuv420p"
        container.start_encoding()
        for i in range(3):
            packet = av.Packet(b"\x00\x00\x01\xb6")
            packet.stream, packet.pts, packet.dts, packet.time_base = stream, i, i, stream.time_base
            container.mux(packet)
    for backend in ["auto", "pyav"]:
        assert "no decodable frames" in assert_video_error(path, backend=backend)
        assert "no decodable frames" in assert_video_error(path, call=count_frames, backend=backend)


def test_folder_without_images(tmp_path):
    (tmp_path / "readme.txt").write_text("frames go here")
    message = assert_video_error(tmp_path)
    assert message.startswith("no frame images (") and ".png" in message


def test_unsupported_extension(tmp_path):
    path = tmp_path / "clip.txt"
    path.write_bytes(b"\x00" * 64)
    message = assert_video_error(path)
    assert all(ext in message for ext in VIDEO_EXTENSIONS)


def test_unknown_backend_and_sampling(tmp_path):
    path = tmp_path / "clip.mp4"
    write_video(path, gradient_frames(2))
    with pytest.raises(ValueError, match="auto, decord, pyav"):
        read_video(path, backend="opencv")
    with pytest.raises(ValueError, match="linspace, segments"):
        read_video(path, sampling="uniform")


def test_extension_sets():
    assert {".mp4", ".avi", ".webm", ".mkv", ".mov", ".m4v", ".gif"} == VIDEO_EXTENSIONS
    assert {".jpg", ".jpeg", ".png", ".bmp", ".webp"} == IMAGE_EXTENSIONS

