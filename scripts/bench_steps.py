"""Step throughput and peak memory of SFT, DPO and GRPO_rank on a model config, side by side.

    python scripts/bench_steps.py                                   # tiny config (configs/tiny/sft.yaml), CPU
    python scripts/bench_steps.py --qlora                           # the same with an nf4 base + LoRA
    python scripts/bench_steps.py --llama-7b --frames 50 --qlora    # on a GPU: random 7B LLaMA, 50 frames
    python scripts/bench_steps.py --families video_lm,qwen2_5_vl    # VideoLM and HF families of the same LLM size
    python scripts/bench_steps.py --logits answers,whole --vocab 2625   # the LM head on the answers (the
                                                                    # trainers'), or everywhere, at the grid gym's vocabulary

Every stage runs the loss functions and decoder the trainers use (vlmalign/losses.py,
vlmalign/model/generation.py) through the policy interface on random-initialised weights and random
videos, so nothing is downloaded: for VideoLM random CLIP features (the frozen tower's output, as
the feature cache would hand it over); for an HF family (`--families qwen2_5_vl`, a tiny random
Qwen2.5-VL with the tiny config's LLM width and depth, its visual path frozen) the features its tower
and projectors give random frames, computed once (as its feature cache hands them over):
  sft        forward + backward + AdamW step on B prompt+answer rows
  dpo        the same on B chosen + B rejected rows, sigmoid DPO loss against fixed reference log-probs
  grpo_rank  G sampled answers per prompt (shared-prefix decoding, KV cache) for B prompts, then the
             clipped GRPO_rank loss on the B x G answers and one AdamW step
The training passes take the logits of the answers' positions alone, as the trainers do
(`policy.labelled_logits`); `--logits whole` computes them at every position, as a plain forward
pass (and TRL's trainers by default) does. Each stage runs in its own subprocess, `--warmup` steps untimed then `--steps` timed; the table shows
tokens/s (every token the step's forward passes process, visual tokens included; for GRPO_rank the
sampled tokens and the trained tokens are shown apart), seconds per step, the share of the GRPO_rank
step spent sampling, and peak memory (CUDA: max allocated; CPU: the subprocess's peak RSS).

`--llama-7b` swaps the tiny LLM for LLaMA-7B's shape (4096 wide, 32 layers, 11008 MLP) and the vision
features for CLIP ViT-L/14-336's (1024 wide, 576 patches), in bf16 with gradient checkpointing: the
VLM-RLAIF 7B recipe's shape. Use it on a GPU.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from vlmalign.config import SFTConfig, load_config  # noqa: E402
from vlmalign.data.template import IGNORE_INDEX, VICUNA_V1_SYSTEM  # noqa: E402

STAGES = ("sft", "dpo", "grpo_rank")
WORDS = "red blue green yellow square circle triangle cross moves left right up down what colour shape is the".split()
LLAMA_7B = {"hidden_size": 4096, "intermediate_size": 11008, "num_hidden_layers": 32, "num_attention_heads": 32,
            "num_key_value_heads": 32, "max_position_embeddings": 4096}
CLIP_L_336 = {"hidden_size": 1024, "intermediate_size": 4096, "num_hidden_layers": 2, "num_attention_heads": 16,
              "image_size": 336, "patch_size": 14}  # 2 layers: the tower never runs here, only its output shape matters


def model_overrides(args, corpus: Path) -> list[str]:
    sets = [f"model.tokenizer.word_corpus=[{corpus}]", f"model.num_frames={args.frames}"]
    if args.llama_7b:
        sets += [f"model.llm.arch={json.dumps(LLAMA_7B)}", f"model.vision.arch={json.dumps(CLIP_L_336)}",
                 "model.llm.dtype=bfloat16", "model.gradient_checkpointing=true"]
    return sets + list(args.set)


def frame_side(checkpoint: Path, wanted: int) -> int:
    """The frame side a family's tiny tower takes nearest `wanted`: Qwen towers a multiple of patch x
    merge (28, or 32 for Qwen3-VL); the LLaVA towers their own image size."""
    vision = json.loads((checkpoint / "config.json").read_text())["vision_config"]
    if "spatial_merge_size" not in vision:
        return vision["image_size"]
    unit = vision["patch_size"] * vision["spatial_merge_size"]
    return max(unit, round(wanted / unit) * unit)


def build(args, work: Path):
    from vlmalign.model.policy import build_model

    # the rows use WORDS; --vocab adds unused words so the LM head has a real vocabulary's width
    vocabulary = WORDS + [f"filler{i}" for i in range(max(0, args.vocab - len(WORDS)))]
    corpus = work / "corpus.txt"
    corpus.write_text(f"{VICUNA_V1_SYSTEM} USER: ASSISTANT: {' '.join(vocabulary)}")
    cfg = load_config(SFTConfig, REPO / "configs/tiny/sft.yaml", model_overrides(args, corpus))
    torch.manual_seed(0)
    if args.family != "video_lm":
        from vlmalign.gym import HF_FAMILIES
        from vlmalign.model.hf_video import save_tiny_hf_video

        if args.llama_7b or args.qlora:
            sys.exit("--llama-7b and --qlora are VideoLM options")
        arch = cfg.model.llm.arch
        checkpoint = save_tiny_hf_video(work / args.family, vocabulary, HF_FAMILIES[args.family], hidden=arch["hidden_size"],
                                        layers=arch["num_hidden_layers"], intermediate=arch["intermediate_size"],
                                        kv_heads=arch["num_key_value_heads"])
        side = frame_side(checkpoint, args.frame_size)
        return build_model(load_config(SFTConfig, REPO / "configs/tiny/sft.yaml", model_overrides(args, corpus) + [
            f"model.init_from={checkpoint}", f"model.frame_size=[{side},{side}]", "model.train_projector=false"]).model)
    if not args.qlora:
        return build_model(cfg.model)
    # QLoRA starts from saved weights: save the random model once, then load its base in 4 bits
    base = work / "base"
    if not (base / "model.json").is_file():
        build_model(cfg.model).save_pretrained(base)
    qlora = model_overrides(args, corpus) + [
        f"model.init_from={base}", "model.lora.enabled=true", "model.quantization.load_in_4bit=true",
        f"model.quantization.compute_dtype={'bfloat16' if torch.cuda.is_available() else 'float32'}"]
    return build_model(load_config(SFTConfig, REPO / "configs/tiny/sft.yaml", qlora).model)


def random_video(model, generator: torch.Generator):
    """One video's inputs as the policy takes them: CLIP features for VideoLM; for an HF family the
    features of random frames (num_frames consecutive frames of an 8 fps video), or their patches if
    its visual path trains."""
    if hasattr(model, "frames"):
        from vlmalign.model.hf_video import VideoLayout

        size, n = model.cfg.frame_size, model.cfg.num_frames
        frames = torch.randint(0, 256, (n, size[0], size[1], 3), generator=generator, dtype=torch.uint8)
        pixels = model.frames(frames.numpy())
        inputs = model.video_features(pixels) if model.visual_path_frozen else pixels
        return {**inputs, "layout": VideoLayout(tuple(range(n)), n, 8.0)}
    vision = model.vision
    return torch.randn(model.cfg.num_frames, vision.num_patches, vision.hidden_size, generator=generator)


def batch(model, rows: int, prompt_words: int, answer_words: int, generator: torch.Generator):
    """Rows of equal length (no padding): ids, labels (answer only), one random video per row."""
    tok = model.tokenizer
    ids, labels = [], []
    videos = [random_video(model, generator) for _ in range(rows)]
    for video in videos:
        words = [WORDS[int(i)] for i in torch.randint(len(WORDS), (prompt_words + answer_words,), generator=generator)]
        prompt = model.encode_prompt("<video>\n" + " ".join(words[:prompt_words]), model.inputs_layout(video))
        answer = tok(" ".join(words[prompt_words:]), add_special_tokens=False)["input_ids"][:answer_words] + [tok.eos_token_id]
        ids.append(prompt + answer)
        labels.append([IGNORE_INDEX] * len(prompt) + answer)
    return torch.tensor(ids), torch.tensor(labels), videos


def run_stage(stage: str, args, work: Path) -> dict:
    from vlmalign.losses import dpo_loss, grpo_loss, grpo_rank_advantages, sequence_logps, sft_loss, token_logps
    from vlmalign.model.generation import GenerationConfig, sample_tokens
    from vlmalign.model.policy import labelled_logits

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model = build(args, work).to(device)
    dtype = next(p for p in model.parameters() if p.is_floating_point()).dtype
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-5)
    gen = torch.Generator().manual_seed(0)
    b = args.batch_size

    def visual(videos) -> dict:
        return {k: v.to(device, dtype) if v.is_floating_point() else v.to(device)
                for k, v in model.stack_visual(videos).items()}

    def train_on(ids, labels, videos, loss_fn):
        model.train()
        rows = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels, **visual(videos)}
        if args.logits == "answers":
            logits, labels = labelled_logits(model, rows, device)
        else:
            logits, labels = model(**model.model_inputs(rows, device)).logits, labels.to(device)
        loss = loss_fn(logits, labels)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    # every step's batch is made before the timing starts: in training the caches hand a step its
    # videos ready made (VideoLM its features, an HF family its features or patches)
    rows, answer_words = {"sft": (b, args.answer_words), "dpo": (2 * b, args.answer_words), "grpo_rank": (b, 0)}[stage]
    batches = [batch(model, rows, args.prompt_words, answer_words, gen) for _ in range(args.warmup + args.steps)]

    def step(ids, labels, videos) -> dict:
        if stage == "sft":
            train_on(ids, labels, videos, lambda logits, y: sft_loss(logits, y))
            return {"trained": ids.numel()}
        if stage == "dpo":
            ref = -torch.rand(2 * b, generator=gen).to(device) * 50

            def loss_fn(logits, y):
                logps = sequence_logps(logits, y)
                return dpo_loss(logps[:b], logps[b:], ref[:b], ref[b:], beta=0.1)[0].mean()
            train_on(ids, labels, videos, loss_fn)
            return {"trained": ids.numel()}
        # grpo_rank: sample G answers per prompt, then one clipped update on them
        g = args.group
        prompts = ids[:, :-1]  # drop the (empty) answer's EOS: the prompt ends with ASSISTANT:
        model.eval()
        started = time.perf_counter()
        with torch.no_grad():
            tokens, _, lengths = sample_tokens(
                model, prompts.to(device), torch.ones_like(prompts, device=device), visual(videos),
                GenerationConfig(max_new_tokens=args.answer_words, do_sample=True, num_return_sequences=g, batch_size=b),
                generator=torch.Generator(device=device).manual_seed(0))
        _sync()
        sampling = time.perf_counter() - started
        rows = torch.cat([prompts.repeat_interleave(g, 0), tokens.cpu()], dim=1)
        labels = rows.clone()
        labels[:, : prompts.shape[1]] = IGNORE_INDEX
        for i, n in enumerate(lengths.tolist()):
            labels[i, prompts.shape[1] + n:] = IGNORE_INDEX

        def loss_fn(logits, y):
            logps, mask = token_logps(logits, y)
            seq = (logps.detach() * mask).sum(-1).view(b, g)
            oracle = torch.stack([torch.randperm(g, generator=gen) for _ in range(b)]).to(device)
            advantages, _ = grpo_rank_advantages(oracle, seq)
            return grpo_loss(logps, logps.detach(), None, advantages.flatten(), mask)[0]
        train_on(rows, labels, [v for v in videos for _ in range(g)], loss_fn)
        return {"trained": rows.numel(), "sampled": int(lengths.sum()), "sampling_s": sampling}

    for data in batches[: args.warmup]:
        step(*data)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    _sync()
    records, started = [], time.perf_counter()
    for data in batches[args.warmup :]:
        records.append(step(*data))
    _sync()
    seconds = time.perf_counter() - started
    peak = (torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda"
            else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20)
    return {"stage": stage, "seconds": seconds, "steps": args.steps, "peak_gib": peak, "device": str(device),
            "trained": sum(r["trained"] for r in records), "sampled": sum(r.get("sampled", 0) for r in records),
            "sampling_s": sum(r.get("sampling_s", 0.0) for r in records),
            "trainable": sum(p.numel() for p in model.parameters() if p.requires_grad),
            "total": sum(p.numel() for p in model.parameters()), "visual_tokens": model.num_visual_tokens}


def _sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--stages", default=",".join(STAGES))
    p.add_argument("--batch-size", type=int, default=4, help="rows (SFT), pairs (DPO) or prompts (GRPO_rank) per step")
    p.add_argument("--group", type=int, default=5, help="GRPO_rank answers per prompt (G)")
    p.add_argument("--prompt-words", type=int, default=12)
    p.add_argument("--answer-words", type=int, default=24)
    p.add_argument("--frames", type=int, default=16)
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--threads", type=int, default=0, help="torch threads on CPU (0: torch's default)")
    p.add_argument("--qlora", action="store_true", help="nf4 base weights + LoRA (bitsandbytes)")
    p.add_argument("--llama-7b", action="store_true", help="LLaMA-7B / CLIP ViT-L/14-336 shapes (use a GPU)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="more model config overrides")
    p.add_argument("--families", default="video_lm",
                   help="comma-separated: video_lm, or the HF families of `vlmalign gym --family` (qwen2_5_vl, qwen3_vl, ...)")
    p.add_argument("--frame-size", type=int, default=112,
                   help="HF families: frame side in pixels (Qwen: the nearest multiple of its patch grid; LLaVA towers: their own size)")
    p.add_argument("--vocab", type=int, default=0,
                   help="words in the tokenizer (at least the rows' 19 and the template's); the grid gym's is 2,625")
    p.add_argument("--logits", default="answers",
                   help="comma-separated: answers (the LM head on the answers' positions, as the trainers run it), whole")
    p.add_argument("--family", default="video_lm", help=argparse.SUPPRESS)
    p.add_argument("--worker", choices=STAGES, help=argparse.SUPPRESS)
    p.add_argument("--work", type=Path, help=argparse.SUPPRESS)
    args = p.parse_args()
    from vlmalign.cli import quiet_libraries

    quiet_libraries()
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.worker:
        print(json.dumps(run_stage(args.worker, args, args.work)))
        return

    stages = [s for s in args.stages.split(",") if s]
    unknown = set(stages) - set(STAGES)
    if unknown:
        p.error(f"unknown stage(s) {sorted(unknown)}; choose from {', '.join(STAGES)}")
    logits = [v for v in args.logits.split(",") if v]
    if set(logits) - {"answers", "whole"}:
        p.error(f"--logits: {args.logits!r}; choose from answers, whole")
    listed = ("--stages", "--families", "--logits")
    forwarded, skip = [], False  # the workers get every option but the lists
    for arg in sys.argv[1:]:
        if skip or arg in listed or arg.startswith(tuple(f"{o}=" for o in listed)):
            skip = arg in listed
            continue
        forwarded.append(arg)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for family in [f for f in args.families.split(",") if f]:
            for stage in stages:
                for variant in logits:
                    proc = subprocess.run([sys.executable, __file__, *forwarded, "--family", family, "--worker", stage,
                                           "--logits", variant, "--work", tmp], capture_output=True, text=True)
                    if proc.returncode:
                        sys.exit(f"{family} {stage} failed:\n{proc.stderr[-4000:]}")
                    rows.append({"family": family, "logits": variant, **json.loads(proc.stdout.strip().splitlines()[-1])})

    shape = "LLaMA-7B shape" if args.llama_7b else "tiny config"
    first = rows[0]
    print(f"{shape}{', QLoRA nf4' if args.qlora else ''}, {args.frames} frames, {first['device']}; "
          f"{args.steps} timed steps after {args.warmup} warm-up, batch {args.batch_size}, G={args.group}")
    for family in dict.fromkeys(r["family"] for r in rows):
        r = next(r for r in rows if r["family"] == family)
        print(f"  {family}: {r['trainable'] / 1e6:.2f}M of {r['total'] / 1e6:.2f}M parameters trainable, "
              f"{r['visual_tokens']} visual tokens per video")
    header = (f"{'family':<11} {'stage':<10} {'logits':<8} {'s/step':>8} {'trained tok/s':>14} {'sampled tok/s':>14} {'sampling share':>15} "
              f"{'peak GiB':>9}")
    print(header)
    print("-" * len(header))
    for r in rows:
        train_s = r["seconds"] - r["sampling_s"]
        sampled = f"{r['sampled'] / r['sampling_s']:.0f}" if r["sampling_s"] else "-"
        share = f"{100 * r['sampling_s'] / r['seconds']:.0f}%" if r["sampling_s"] else "-"
        print(f"{r['family']:<11} {r['stage']:<10} {r['logits']:<8} {r['seconds'] / r['steps']:>8.3f} {r['trained'] / train_s:>14.0f} {sampled:>14} {share:>15} "
              f"{r['peak_gib']:>9.2f}")
    if len(logits) > 1:  # the same steps, side by side
        for family, stage in dict.fromkeys((r["family"], r["stage"]) for r in rows):
            answers, whole = (next(r for r in rows if (r["family"], r["stage"], r["logits"]) == (family, stage, v))
                              for v in ("answers", "whole"))
            print(f"{family} {stage}: s/step whole / answers = {whole['seconds'] / answers['seconds']:.2f}x")


if __name__ == "__main__":
    main()
