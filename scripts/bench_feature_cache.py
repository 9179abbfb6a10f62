"""Time to produce a video's visual input for N short videos: cold vs from the on-disk cache, for
VideoLM's feature cache and an HF video model's feature and pixel caches, side by side in one run.

    python scripts/bench_feature_cache.py [--videos 32] [--frames 16] [--size 224] [--image-size 224] [--threads 1]

Writes N test videos with PyAV. VideoLM: a random-initialised CLIP tower (ViT-B/16-like width by
default, 4 layers so it runs on a laptop CPU); cold is decoding + the tower + pooling, cached is
pooling the stored features. HF (a tiny random Qwen2.5-VL, `--hf` for another Qwen family), with its
visual path frozen: cold is decoding + resizing + cutting the frames into patches at `--image-size` +
its tower and merger, cached is reading the features back; with a trainable merger (the pixel cache):
cold is the same without the tower, cached is reading the patches back (the tower then runs in every
training step). Both HF rows stack their entries as the collator does. The tiny tower's share of
the cold time is far below a real one's. Last, what the feature cache saves in training: one step
(forward + backward, the language model training, 4 rows of the video's prompt and a short answer)
on a cached video's features against the same step on its patches, where the tower runs in the
forward pass; the two interleaved, `--repeats` times, medians.
"""

from __future__ import annotations

import argparse
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from vlmalign.config import ModelConfig, VisionConfig
from vlmalign.model.hf_video import save_tiny_hf_video
from vlmalign.model.policy import build_model
from vlmalign.video import write_video


def cold_and_cached(visual, videos: list[str], step) -> tuple[float, float]:
    """Seconds for `step` over all videos twice: first computed (and written to the cache), then read back."""
    times = []
    for _ in range(2):
        start = time.perf_counter()
        with torch.no_grad():
            for v in videos:
                step(visual.get(v))
        times.append(time.perf_counter() - start)
    assert visual.misses == len(videos) and visual.hits == len(videos)
    return times[0], times[1]


def step_seconds(models: dict, entries: dict, repeats: int) -> dict:
    """Median seconds of one training step per model on its cached entry, the models interleaved."""
    layout = next(iter(entries.values()))["layout"]
    model = next(iter(models.values()))
    prompt = model.encode_prompt("<video>\nwhat colour is the square", layout)
    ids = torch.tensor([prompt + model.tokenizer("a red square", add_special_tokens=False)["input_ids"]] * 4)
    times = {name: [] for name in models}
    for repeat in range(repeats + 2):  # two untimed warm-up rounds
        for name, model in models.items():
            start = time.perf_counter()
            logits = model(input_ids=ids, attention_mask=torch.ones_like(ids), **model.stack_visual([entries[name]] * 4)).logits
            logits.float().mean().backward()
            if repeat >= 2:
                times[name].append(time.perf_counter() - start)
    return {name: sorted(t)[len(t) // 2] for name, t in times.items()}


def megabytes_per_video(folder: Path, videos: int) -> float:
    return sum(f.stat().st_size for f in folder.glob("*.safetensors")) / videos / 2**20


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--videos", type=int, default=32)
    ap.add_argument("--frames", type=int, default=16, help="frames sampled per video")
    ap.add_argument("--size", type=int, default=224, help="video width and height")
    ap.add_argument("--image-size", type=int, default=224, help="CLIP input size; the HF frame size (a multiple of 28)")
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--width", type=int, default=768)
    ap.add_argument("--hf", default="Qwen2_5_VLForConditionalGeneration", help="the HF family of the second row")
    ap.add_argument("--threads", type=int, default=1, help="torch threads (pinned, for comparable runs)")
    ap.add_argument("--repeats", type=int, default=9, help="timed training steps per HF cache kind")
    args = ap.parse_args()
    from vlmalign.cli import quiet_libraries

    quiet_libraries()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    work = Path(tempfile.mkdtemp(prefix="bench_fc_"))
    try:
        rng = np.random.default_rng(0)
        videos = []
        for i in range(args.videos):
            frames = rng.integers(0, 255, (args.frames * 2, args.size, args.size, 3), dtype=np.uint8)
            videos.append(str(work / f"v{i}.mp4"))
            write_video(videos[-1], frames, fps=8)
        (work / "corpus.txt").write_text("a video")
        cfg = ModelConfig(
            vision=VisionConfig(arch={"hidden_size": args.width, "intermediate_size": 4 * args.width, "num_hidden_layers": args.layers,
                                      "num_attention_heads": 12, "image_size": args.image_size, "patch_size": 16}),
            num_frames=args.frames,
        )
        cfg.llm.arch = {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 1, "num_attention_heads": 4}
        cfg.tokenizer.word_corpus = [str(work / "corpus.txt")]
        model = build_model(cfg).eval()
        visual = model.visual_inputs(str(work / "cache"))
        video_lm = (*cold_and_cached(visual, videos, lambda features: model.visual_tokens(features.unsqueeze(0))),
                    megabytes_per_video(visual.cache_dir, args.videos))

        checkpoint = save_tiny_hf_video(work / "hf", ["a", "video"], args.hf)
        hf_rows, hf_models, entries = {}, {}, {}
        for kind, train_projector in (("features", False), ("patches", True)):
            hf = build_model(ModelConfig(init_from=str(checkpoint), num_frames=args.frames, train_projector=train_projector,
                                         frame_size=[args.image_size, args.image_size])).eval()
            visual = hf.visual_inputs(str(work / "cache"))
            hf_rows[f"{hf.architecture.split('For')[0]}: {args.image_size}px {kind}"] = (
                *cold_and_cached(visual, videos, lambda inputs: hf.stack_visual([inputs])),  # the collator's copy
                megabytes_per_video(visual.cache_dir, args.videos))
            # the same trainable set in both steps, the language model: only the tower's forward differs
            for name, param in hf.core.named_parameters():
                param.requires_grad_(name.startswith(("model.language_model.", "lm_head.")))
            hf_models[kind], entries[kind] = hf, visual.get(videos[0])
        steps = step_seconds(hf_models, entries, args.repeats)

        print(f"{args.videos} videos x {args.frames} frames ({args.size}px), torch threads {torch.get_num_threads()}")
        print(f"{'':44}{'cold':>10}{'cached':>10}{'speed-up':>10}{'on disk':>12}")
        rows = {f"VideoLM: CLIP {args.image_size}px features ({args.layers}x{args.width})": video_lm, **hf_rows}
        for name, (cold, cached, megabytes) in rows.items():
            print(f"{name:44}{cold / args.videos * 1000:8.1f}ms{cached / args.videos * 1000:8.1f}ms"
                  f"{cold / cached:9.1f}x{megabytes:8.1f} MiB")
        print(f"training step of {hf.architecture.split('For')[0]} (4 rows, median of {args.repeats}): on cached features "
              f"{steps['features'] * 1000:.1f} ms, on cached patches {steps['patches'] * 1000:.1f} ms "
              f"({steps['patches'] / steps['features']:.2f}x)")
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
