"""Time to produce visual tokens for N short videos: cold (decode + CLIP) vs from the feature cache.

    python scripts/bench_feature_cache.py [--videos 32] [--frames 16] [--size 224] [--image-size 224]

Writes N test videos with PyAV, builds a random-initialised CLIP tower (ViT-B/16-like width by
default, 4 layers so it runs on a laptop CPU), and prints both timings and their ratio in one run.
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
from vlmalign.data.features import VisualInputs
from vlmalign.model.policy import build_model
from vlmalign.video import write_video


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--videos", type=int, default=32)
    ap.add_argument("--frames", type=int, default=16, help="frames sampled per video")
    ap.add_argument("--size", type=int, default=224, help="video width and height")
    ap.add_argument("--image-size", type=int, default=224, help="CLIP input size")
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--width", type=int, default=768)
    args = ap.parse_args()
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

        def tokens_for_all() -> float:
            start = time.perf_counter()
            with torch.no_grad():
                for v in videos:
                    model.visual_tokens(visual.get(v).unsqueeze(0))
            return time.perf_counter() - start

        cold = tokens_for_all()  # decode + CLIP, then written to the cache
        cached = tokens_for_all()  # read back from the cache
        assert visual.misses == args.videos and visual.hits == args.videos
        print(f"{args.videos} videos x {args.frames} frames ({args.size}px -> CLIP {args.image_size}px, {args.layers}x{args.width}), "
              f"torch threads {torch.get_num_threads()}")
        print(f"{'':10}{'seconds':>10}{'per video':>12}")
        print(f"{'cold':10}{cold:10.2f}{cold / args.videos * 1000:10.1f}ms")
        print(f"{'cached':10}{cached:10.2f}{cached / args.videos * 1000:10.1f}ms")
        print(f"speed-up (cold / cached): {cold / cached:.1f}x")
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
