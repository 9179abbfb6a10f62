"""What do a tiny model's visual tokens let a model of its size learn? A reader trained on them alone.

    python scripts/probe_perception.py --model runs/gym/seed-0/ceiling/final --videos 2000
    python scripts/probe_perception.py --model M --videos 240 --tasks direction,shape      # the gym's scale
    python scripts/probe_perception.py --model M --videos 2000 --pooling grid2 --tasks direction
    python scripts/probe_perception.py --model M --videos 2000 --pooling grid2 --tasks direction --reader llm

Single-object videos of the synthetic benchmark (`synthetic.sample_video`, rendered in memory; the
train and test videos come from different seeds) go through the model's frozen vision tower. A fresh
reader then learns to name each video's colour, shape or direction from them: a projector of the
model's kind applied to every patch, a pooling (`--pooling video_chatgpt`: one mean per frame, the
gym's models'; or `grid2`: each frame's 2 x 2 grid of patch means, `model.frame_grid: 2`), a learned,
randomly initialised position per token (a zero start would hide the tokens' order; `--no-positions`
leaves them out), then a transformer of the model's LLM width and depth and a classification head.
The transformer is bidirectional, its outputs averaged (`--reader encoder`), or a fresh causal LM of
the model's LLM config, RoPE and all, read at the last token as the policy reads at its answer
(`--reader llm`). It reads only the video, so its held-out accuracy bounds what an SFT model of this
size can perceive from that many videos of one object, without the question to bind.
One JSON line per task: train and test accuracy, the last loss, seconds.
"""

from __future__ import annotations

import argparse
import json
import time

import numpy as np
import torch
from torch import nn

from vlmalign.data import synthetic
from vlmalign.model.projector import build_projector, spatio_temporal_pool
from vlmalign.model.video_lm import load_video_lm
from vlmalign.model.vision import preprocess_frames

LABELS = {"colour": tuple(synthetic.COLOURS), "shape": synthetic.SHAPES, "direction": synthetic.DIRECTIONS}


def videos(model, n: int, seed: int, batch: int = 64) -> tuple[list[dict], torch.Tensor]:
    """n single-object videos' metadata and their vision features [n, T, P, D]."""
    rng = np.random.default_rng(seed)
    frames, size = model.cfg.num_frames, model.vision.image_size
    metas = [synthetic.sample_video(rng, f"probe_{i}", frames, size, max_objects=1) for i in range(n)]
    feats = []
    with torch.no_grad():
        for i in range(0, n, batch):
            pixels = torch.stack([preprocess_frames(synthetic.render(m), size) for m in metas[i : i + batch]])
            feats.append(model.video_features(pixels))
    return metas, torch.cat(feats)


def labels(metas: list[dict], task: str) -> torch.Tensor:
    return torch.tensor([LABELS[task].index(m["objects"][0][task]) for m in metas])


def tasks(text: str) -> list[str]:
    unknown = [t for t in text.split(",") if t not in LABELS]
    if unknown:
        raise argparse.ArgumentTypeError(f"unknown task {unknown[0]!r}; choose from {', '.join(LABELS)}")
    return text.split(",")


GRIDS = {"video_chatgpt": 1, "grid2": 2}  # --pooling -> model.frame_grid


class Reader(nn.Module):
    """`encoder`: a bidirectional transformer over the tokens, their outputs averaged. `llm`: a fresh
    causal LM of the model's config (RoPE, as the policy reads them), read at the last token. Either
    adds the learned positions unless `positions` is off."""

    def __init__(self, model, kind: str, num_tokens: int, num_classes: int, reader: str = "encoder",
                 positions: bool = True):
        super().__init__()
        llm = model.llm.config
        self.frame_grid = GRIDS[kind]
        self.projector = build_projector(model.cfg.projector, model.vision.hidden_size, llm.hidden_size)
        self.position = nn.Parameter(torch.randn(num_tokens, llm.hidden_size) * 0.5) if positions else None
        if reader == "llm":
            from transformers import AutoModel

            self.body, self.causal = AutoModel.from_config(llm), True
        else:
            layer = nn.TransformerEncoderLayer(llm.hidden_size, llm.num_attention_heads, llm.intermediate_size, 0.0,
                                               batch_first=True)
            self.body, self.causal = nn.TransformerEncoder(layer, llm.num_hidden_layers), False
        self.head = nn.Linear(llm.hidden_size, num_classes)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        tokens = spatio_temporal_pool(self.projector(features), self.frame_grid)
        if self.position is not None:
            tokens = tokens + self.position
        if self.causal:
            return self.head(self.body(inputs_embeds=tokens, use_cache=False).last_hidden_state[:, -1])
        return self.head(self.body(tokens).mean(1))


def accuracy(reader: Reader, features: torch.Tensor, labels: torch.Tensor) -> float:
    with torch.no_grad():
        return round(100 * (reader(features).argmax(1) == labels).float().mean().item(), 1)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True, help="a saved vlmalign model folder (its vision tower is used)")
    parser.add_argument("--videos", type=int, default=2000, help="training videos")
    parser.add_argument("--test-videos", type=int, default=400)
    parser.add_argument("--tasks", type=tasks, default="direction,shape,colour", help="comma-separated: colour, shape, direction")
    parser.add_argument("--pooling", choices=tuple(GRIDS), default="video_chatgpt",
                        help="video_chatgpt: one mean per frame (model.frame_grid 1); grid2: a 2 x 2 grid (frame_grid 2)")
    parser.add_argument("--reader", choices=("encoder", "llm"), default="encoder",
                        help="encoder: bidirectional, outputs averaged; llm: a fresh causal LM of the model's config, "
                             "read at the last token")
    parser.add_argument("--no-positions", action="store_true", help="no learned position per token (the llm reader "
                                                                     "keeps its RoPE)")
    parser.add_argument("--steps", type=int, default=1500, help="reader steps of 32 videos")
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args(argv)
    from vlmalign.cli import quiet_libraries

    quiet_libraries()
    torch.set_num_threads(args.threads)

    model = load_video_lm(args.model)
    train_meta, train_x = videos(model, args.videos, seed=1)
    test_meta, test_x = videos(model, args.test_videos, seed=2)
    num_tokens = spatio_temporal_pool(torch.zeros(1, *train_x.shape[1:3], 1), GRIDS[args.pooling]).shape[1]
    for task in args.tasks:
        train_y, test_y = labels(train_meta, task), labels(test_meta, task)
        torch.manual_seed(0)
        reader = Reader(model, args.pooling, num_tokens, len(LABELS[task]), args.reader, not args.no_positions)
        optimizer = torch.optim.AdamW(reader.parameters(), args.lr, weight_decay=0.01)
        start = time.time()
        for _ in range(args.steps):
            idx = torch.randint(0, args.videos, (32,))
            loss = nn.functional.cross_entropy(reader(train_x[idx]), train_y[idx])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
        print(json.dumps({"task": task, "pooling": args.pooling, "reader": args.reader, "positions": not args.no_positions,
                          "videos": args.videos, "steps": args.steps,
                          "train": accuracy(reader, train_x[: args.test_videos], train_y[: args.test_videos]),
                          "test": accuracy(reader, test_x, test_y), "last_loss": round(loss.item(), 3),
                          "chance": round(100 / len(LABELS[task]), 1), "seconds": round(time.time() - start)}),
              flush=True)


if __name__ == "__main__":
    main()
