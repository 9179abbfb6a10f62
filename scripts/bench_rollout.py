"""Rollout speed: G samples per prompt from one shared video prefix vs the usual ways.

    python scripts/bench_rollout.py                       # tiny model, 16 frames (80 visual tokens)
    python scripts/bench_rollout.py --frames 50 --patch 4 # a longer video prefix (50 + 256 tokens)
    python scripts/bench_rollout.py --frames 50 --image-size 336 --patch 14    # VLM-RLAIF: 50 + 576 = 626
    python scripts/bench_rollout.py --frames 112 --image-size 616 --patch 14   # 2,048 visual tokens

The papers' prefixes: VLM-RLAIF pools 50 frames of 24 x 24 CLIP patches to 50 + 576 = 626 visual
tokens; Video-LLaVA keeps 8 frames x 256 patches = 2,048. This model always pools (T + P tokens),
so the 2,048-token prefix is made as 112 + 44 x 44; what the sampler sees is the prefix length.

Compares, on the same random-initialised model and prompts, sampling G answers per prompt with
  shared   vlmalign's decoder: one prefill per prompt, its KV cache copied to the G samples
  hf       transformers `generate(num_return_sequences=G)`: the prompt is repeated G times, so
           G prefills per prompt
  separate G independent calls of vlmalign's decoder with one sample each
and prints generated tokens/s and the ratios side by side. Every answer runs the full
`--new-tokens` (EOS is masked out) so the three do the same decoding work.
"""

from __future__ import annotations

import argparse
import sys
import time
from types import SimpleNamespace
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from vlmalign.config import SFTConfig, load_config  # noqa: E402
from vlmalign.data.collate import pad_sequences  # noqa: E402
from vlmalign.model.generation import GenerationConfig, sample_tokens  # noqa: E402
from vlmalign.model.policy import build_model  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--prompts", type=int, default=8)
    p.add_argument("--g", type=int, default=5)
    p.add_argument("--new-tokens", type=int, default=24)
    p.add_argument("--frames", type=int, default=16)
    p.add_argument("--image-size", type=int, default=64, help="frame side in pixels")
    p.add_argument("--patch", type=int, default=8, help="CLIP patch size (64 / 8: 64 patches per frame)")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--threads", type=int, default=1, help="torch threads (pinned: the default can be far slower under load)")
    args = p.parse_args()
    from vlmalign.cli import quiet_libraries

    quiet_libraries()
    torch.set_num_threads(args.threads)

    corpus = Path(__file__).resolve().parents[1] / "README.md"
    cfg = load_config(SFTConfig, Path(__file__).resolve().parents[1] / "configs" / "tiny" / "sft.yaml", [
        f"model.tokenizer.word_corpus=[{corpus}]", f"model.num_frames={args.frames}",
        f"model.vision.arch.patch_size={args.patch}", f"model.vision.arch.image_size={args.image_size}"])
    torch.manual_seed(0)
    model = build_model(cfg.model).eval()
    model.llm.generation_config.eos_token_id = None  # every answer decodes the full length
    ids = [model.encode_prompt("<video>\nwhat colour is the red square?")] * args.prompts
    # our decoder stops at the tokenizer's EOS: give it one that never comes up
    model.tokenizer = SimpleNamespace(eos_token_id=-1, pad_token_id=model.tokenizer.pad_token_id)
    input_ids = pad_sequences(ids, 0, side="left")
    mask = torch.ones_like(input_ids)
    patches = (args.image_size // args.patch) ** 2
    feats = torch.randn(args.prompts, args.frames, patches, model.vision.hidden_size)
    g, n = args.g, args.new_tokens

    def shared():
        sample_tokens(model, input_ids, mask, {"features": feats}, GenerationConfig(max_new_tokens=n, do_sample=True, num_return_sequences=g))

    def hf():
        model.generate(input_ids, mask, feats, max_new_tokens=n, min_new_tokens=n, do_sample=True, num_return_sequences=g,
                       eos_token_id=None, pad_token_id=model.tokenizer.pad_token_id)

    def separate():
        for _ in range(g):
            sample_tokens(model, input_ids, mask, {"features": feats}, GenerationConfig(max_new_tokens=n, do_sample=True))

    tokens = args.prompts * g * n
    rows = []
    for name, fn in [("shared", shared), ("hf", hf), ("separate", separate)]:
        fn()  # warm-up
        best = float("inf")
        for _ in range(args.repeats):
            start = time.perf_counter()
            fn()
            best = min(best, time.perf_counter() - start)
        rows.append((name, best, tokens / best))
    print(f"{args.prompts} prompts x G={g}, {n} new tokens each, prompt {input_ids.shape[1]} tokens "
          f"({model.num_visual_tokens} visual), torch threads {torch.get_num_threads()}")
    print(f"{'method':<10} {'seconds':>8} {'tokens/s':>10} {'shared speed-up':>16}")
    for name, seconds, tps in rows:
        print(f"{name:<10} {seconds:>8.3f} {tps:>10.0f} {seconds / rows[0][1]:>15.2f}x")


if __name__ == "__main__":
    main()
