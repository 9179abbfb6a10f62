"""Training throughput: vlmalign's DPO and GRPO vs TRL's `DPOTrainer` and `GRPOTrainer`, side by
side in one run.

    python scripts/bench_train.py                          # DPO: 64 pairs, 16 steps of 4 pairs, 3 repeats
    python scripts/bench_train.py --pairs 256 --steps 64 --batch-size 8
    python scripts/bench_train.py --method grpo            # GRPO: 8 steps of 4 prompts x G = 8, 24 tokens

GRPO (`--method grpo`): the same tiny model samples G = `--g` answers to each of `--batch-size`
prompts per step, exactly `--new-tokens` tokens each (vlmalign's decoder is given an EOS id that
never comes up; TRL gets `min_new_tokens`), then takes one optimizer step on them (one mini-batch,
one pass, beta 0.04 with a reference model, the `bnpo` token-mean loss, lr constant, fp32). Rewards
are random on both sides (vlmalign's `random` judge, a random reward function for TRL), so the
figure is the trainer's, not a judge's. TRL generates with plain transformers `generate` (no vLLM);
vlmalign with its shared-prefix sampler (one prefill per prompt, its KV cache copied to the G
samples). Extra GRPO columns: `sampling` is the share of the loop spent generating (vlmalign's
`time_sampling` metric; TRL's `_generate`, timed by a wrapper). Tokens are answer tokens: prompts
x G x new tokens per step.

DPO (the default):

Both train the same random-initialised tiny text-only LLaMA (configs/tiny, saved once to a temp dir)
on the same synthetic preference pairs, with the same recipe: sigmoid loss, beta 0.1, summed
sequence log-probs, reference log-probs precomputed once from the starting policy, AdamW at a
constant lr without warmup, grad-norm clip 1.0, fp32, no gradient checkpointing (TRL defaults to
bf16 and checkpointing; both are turned off here).

Same tokens: TRL gets each prompt already rendered in vlmalign's vicuna_v1 template, starting with
"<s>" (the word-level tokenizer adds no BOS of its own), and each answer with a leading space; TRL
appends "</s>". The script checks that the token ids TRL trains on equal vlmalign's, pair by pair.
Every prompt, chosen and rejected answer has a fixed number of words, so every pair has the same
length: no padding on either side, and every step processes batch x tokens-per-pair tokens, where
tokens-per-pair = len(prompt + chosen) + len(prompt + rejected).

Each run is its own subprocess (so peak RSS is per system) with `--threads` torch threads (default
1), repeated `--repeats` times in alternation; the table shows medians. Columns:
  total s    the whole training call, imports done before it: vlmalign `train(cfg, pairs)` (model
             load, tokenisation, reference log-probs, the loop, saving final/) vs `DPOTrainer(...)` +
             `.train()` (model load, tokenisation, reference log-probs, the loop; nothing saved)
  loop s     steps 2..N only: the first step's end to the last step's end (vlmalign: metrics.jsonl
             timestamps, logged every step; TRL: a callback at each step end, logging every step)
  loop tok/s tokens of steps 2..N / loop s: the steady-state figure the ratio is taken on
  total tok/s tokens of all N steps / total s
  peak RSS   the subprocess's ru_maxrss, imports included (TRL also imports datasets)
"""

from __future__ import annotations

import argparse
import json
import os
import random
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")  # everything is local; never reach a hub
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from vlmalign.data.template import VICUNA_V1_SYSTEM  # noqa: E402

WORDS = ("red blue green yellow square circle triangle star moves left right up down slowly quickly "
         "appears vanishes grows shrinks spins bounces twice near far top bottom corner centre").split()
PROMPT_WORDS, ANSWER_WORDS = 12, 16
MAX_LENGTH = 384
SYSTEMS = ("vlmalign", "TRL")


def make_pairs(n: int) -> list[dict]:
    rng = random.Random(0)
    words = lambda k: " ".join(rng.choice(WORDS) for _ in range(k))  # noqa: E731
    return [{"id": f"pair-{i}", "prompt": "describe " + words(PROMPT_WORDS - 1),
             "chosen": words(ANSWER_WORDS), "rejected": words(ANSWER_WORDS)} for i in range(n)]


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


# --- one run per subprocess -------------------------------------------------------------------------
def run_vlmalign(work: Path, tag: str, args) -> dict:
    # train() imports these lazily (~3.5 s here); TRL's worker pays for them in `from trl import ...`
    # before its timer starts, so import them before ours too
    import accelerate  # noqa: F401
    import transformers.models.clip.modeling_clip  # noqa: F401
    import transformers.models.llama.modeling_llama  # noqa: F401

    from vlmalign.config import DPOConfig, load_config
    from vlmalign.data.formats import read_preference_pairs
    from vlmalign.train.dpo import train

    run_dir = work / f"vlmalign-{tag}"
    overrides = {
        "run.dir": run_dir, "run.progress": "false", "model.init_from": work / "policy",
        "data.train": f"[{work / 'pairs.jsonl'}]", "data.feature_cache": "null", "data.max_length": MAX_LENGTH,
        "model.gradient_checkpointing": "false", "dpo.sft_weight": 0, "dpo.beta": 0.1, "dpo.loss_type": "sigmoid",
        "train.epochs": 1, "train.max_steps": args.steps, "train.batch_size": args.batch_size, "train.lr": args.lr,
        "train.scheduler": "constant", "train.warmup_ratio": 0,  # train.mixed_precision defaults to "no": fp32
        "train.log_every": 1, "train.save_every": args.steps,  # no intermediate checkpoint
    }
    cfg = load_config(DPOConfig, REPO / "configs/tiny/dpo.yaml", [f"{k}={v}" for k, v in overrides.items()])
    pairs = read_preference_pairs(work / "pairs.jsonl")
    start = time.perf_counter()
    train(cfg, pairs)
    seconds = time.perf_counter() - start
    metrics = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return {"seconds": seconds, "step_ends": [m["time"] for m in metrics], "first_loss": metrics[0]["loss"]}


def step_end_recorder():
    """A TRL trainer callback that records the time each optimizer step ends (`.times`)."""
    from transformers import TrainerCallback

    class StepEnds(TrainerCallback):
        def __init__(self):
            self.times = []

        def on_step_end(self, *_, **__):
            self.times.append(time.time())

    return StepEnds()


def run_trl(work: Path, tag: str, args) -> dict:
    from datasets import Dataset
    from transformers import AutoTokenizer
    from trl import DPOConfig, DPOTrainer

    rows = [json.loads(line) for line in (work / "pairs.jsonl").read_text().splitlines()]
    # the prompt as vlmalign renders it, so both train on the same ids (checked by the parent)
    data = Dataset.from_list([{"prompt": f"<s>{VICUNA_V1_SYSTEM} USER: {r['prompt']} ASSISTANT:",
                               "chosen": " " + r["chosen"], "rejected": " " + r["rejected"]} for r in rows])
    config = DPOConfig(
        output_dir=str(work / f"trl-{tag}"), report_to="none", use_cpu=True, seed=0,
        max_steps=args.steps, per_device_train_batch_size=args.batch_size, learning_rate=args.lr,
        lr_scheduler_type="constant", warmup_steps=0, weight_decay=0.0, max_grad_norm=1.0,
        beta=0.1, loss_type="sigmoid", max_length=MAX_LENGTH,
        precompute_ref_log_probs=True, precompute_ref_batch_size=args.batch_size,
        bf16=False, gradient_checkpointing=False,
        logging_steps=1, save_strategy="no", dataloader_num_workers=0, disable_tqdm=True,
    )
    tokenizer = AutoTokenizer.from_pretrained(work / "policy" / "tokenizer")
    step_ends = step_end_recorder()
    start = time.perf_counter()
    trainer = DPOTrainer(model=str(work / "policy" / "llm"), args=config, train_dataset=data,
                         processing_class=tokenizer, callbacks=[step_ends])
    trainer.train()
    seconds = time.perf_counter() - start
    first_loss = next(log["loss"] for log in trainer.state.log_history if "loss" in log)
    ds = trainer.train_dataset
    sequences = [[p + c, p + r] for p, c, r in zip(ds["prompt_ids"], ds["chosen_ids"], ds["rejected_ids"])]
    return {"seconds": seconds, "step_ends": step_ends.times, "first_loss": first_loss, "sequences": sequences}


def run_vlmalign_grpo(work: Path, tag: str, args) -> dict:
    import accelerate  # noqa: F401  (imported before the timer, as TRL's worker imports its own)
    import transformers.models.clip.modeling_clip  # noqa: F401
    import transformers.models.llama.modeling_llama  # noqa: F401

    from vlmalign.config import GRPOConfig, load_config
    from vlmalign.train import grpo_rank

    build_model = grpo_rank.build_model

    def build_without_eos(model_cfg):  # every answer decodes the full --new-tokens
        model = build_model(model_cfg)
        model.tokenizer = NoEos(model.tokenizer)
        return model

    grpo_rank.build_model = build_without_eos
    run_dir = work / f"vlmalign-grpo-{tag}"
    g, prompts = args.g, args.batch_size
    overrides = {
        "run.dir": run_dir, "run.progress": "false", "model.init_from": work / "policy",
        "data.train": f"[{work / 'prompts.json'}]", "data.feature_cache": "null", "data.max_length": MAX_LENGTH,
        "model.gradient_checkpointing": "false", "judge.backend": "random", "judge.seed": 0,
        "sampling.num_samples": g, "sampling.max_new_tokens": args.new_tokens, "sampling.batch_size": prompts,
        "sampling.temperature": 1.0, "sampling.top_p": 1.0,
        "grpo.advantage": "grpo", "grpo.rollout_batch": prompts, "grpo.mini_batch": prompts * g, "grpo.num_iterations": 1,
        "grpo.beta": 0.04, "grpo.loss": "bnpo", "grpo.clip": 0.2,
        "train.epochs": 1, "train.max_steps": args.steps, "train.lr": args.lr, "train.scheduler": "constant",
        "train.warmup_ratio": 0, "train.log_every": 1, "train.save_every": args.steps + 1, "eval_qa": "null",
    }
    cfg = load_config(GRPOConfig, REPO / "configs/tiny/grpo_rank.yaml", [f"{k}={v}" for k, v in overrides.items()])
    start = time.perf_counter()
    grpo_rank.run(cfg)
    seconds = time.perf_counter() - start
    metrics = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return {"seconds": seconds, "step_ends": [m["time"] for m in metrics], "first_loss": metrics[0]["loss"],
            "sampling_s": [m["time_sampling"] for m in metrics], "answer_tokens": [m["answer_tokens"] for m in metrics]}


class NoEos:
    """A tokenizer whose EOS id never comes up, everything else delegated."""

    eos_token_id = -1

    def __init__(self, tokenizer):
        self._tokenizer = tokenizer

    def __getattr__(self, name):
        return getattr(self._tokenizer, name)

    def __call__(self, *args, **kwargs):
        return self._tokenizer(*args, **kwargs)


def run_trl_grpo(work: Path, tag: str, args) -> dict:
    import random as rand

    from datasets import Dataset
    from transformers import AutoTokenizer
    from trl import GRPOConfig, GRPOTrainer

    rng = rand.Random(0)

    def random_reward(completions, **_):
        return [rng.uniform(1, 5) for _ in completions]

    prompts = [json.loads(line)["prompt"] for line in (work / "prompts.jsonl").read_text().splitlines()]
    data = Dataset.from_list([{"prompt": p} for p in prompts])
    g = args.g
    config = GRPOConfig(
        output_dir=str(work / f"trl-grpo-{tag}"), report_to="none", use_cpu=True, seed=0,
        max_steps=args.steps, per_device_train_batch_size=args.batch_size * g, num_generations=g,
        gradient_accumulation_steps=1, steps_per_generation=1, num_iterations=1,
        max_completion_length=args.new_tokens, generation_kwargs={"min_new_tokens": args.new_tokens},
        temperature=1.0, top_p=1.0, use_vllm=False,
        learning_rate=args.lr, lr_scheduler_type="constant", warmup_steps=0, weight_decay=0.0, max_grad_norm=1.0,
        beta=0.04, loss_type="bnpo", epsilon=0.2, bf16=False, gradient_checkpointing=False,
        logging_steps=1, save_strategy="no", dataloader_num_workers=0, disable_tqdm=True,
    )
    tokenizer = AutoTokenizer.from_pretrained(work / "policy" / "tokenizer")
    step_ends = step_end_recorder()
    start = time.perf_counter()
    trainer = GRPOTrainer(model=str(work / "policy" / "llm"), reward_funcs=random_reward, args=config,
                          train_dataset=data, processing_class=tokenizer, callbacks=[step_ends])
    generate, sampling_s = trainer._generate, []

    def timed_generate(*a, **k):
        started = time.perf_counter()
        out = generate(*a, **k)
        sampling_s.append(time.perf_counter() - started)
        return out

    trainer._generate = timed_generate
    trainer.train()
    seconds = time.perf_counter() - start
    first_loss = next(log["loss"] for log in trainer.state.log_history if "loss" in log)
    lengths = [log.get("completions/mean_length") for log in trainer.state.log_history if "loss" in log]
    prompt_ids = [tokenizer(p, add_special_tokens=False)["input_ids"] for p in prompts[: args.batch_size]]
    return {"seconds": seconds, "step_ends": step_ends.times, "first_loss": first_loss, "sampling_s": sampling_s,
            "answer_tokens": lengths, "prompt_ids": prompt_ids}


WORKERS = {("dpo", "vlmalign"): run_vlmalign, ("dpo", "TRL"): run_trl,
           ("grpo", "vlmalign"): run_vlmalign_grpo, ("grpo", "TRL"): run_trl_grpo}


# --- orchestration ----------------------------------------------------------------------------------
def prepare(work: Path, num_pairs: int) -> tuple[list[list[list[int]]], list[list[int]]]:
    """Save the tiny policy, the pairs and the GRPO prompts under `work`; returns vlmalign's token ids
    of every pair and every prompt."""
    import torch

    from vlmalign.config import SFTConfig, load_config
    from vlmalign.data.formats import read_preference_pairs, write_jsonl
    from vlmalign.model.policy import build_model
    from vlmalign.train.dpo import encode_pairs

    corpus = work / "corpus.txt"
    corpus.write_text(f"{VICUNA_V1_SYSTEM} USER: ASSISTANT: describe {' '.join(WORDS)}")
    cfg = load_config(SFTConfig, REPO / "configs/tiny/sft.yaml", [f"model.tokenizer.word_corpus=[{corpus}]"])
    torch.manual_seed(0)
    model = build_model(cfg.model)
    model.save_pretrained(work / "policy")  # policy/llm is a plain LlamaForCausalLM dir TRL can load
    write_jsonl(work / "pairs.jsonl", make_pairs(num_pairs))
    encoded = encode_pairs(read_preference_pairs(work / "pairs.jsonl"), model, MAX_LENGTH)
    # GRPO's prompts, text only: vlmalign reads the question as instruction data and renders it in
    # its template; TRL gets the rendered string (the parent checks both give the same ids)
    questions = [pair["prompt"] for pair in make_pairs(num_pairs)]
    (work / "prompts.json").write_text(json.dumps([
        {"id": f"q-{i}", "conversations": [{"from": "human", "value": q}, {"from": "gpt", "value": "x"}]}
        for i, q in enumerate(questions)]))
    write_jsonl(work / "prompts.jsonl", [{"prompt": f"<s>{VICUNA_V1_SYSTEM} USER: {q} ASSISTANT:"} for q in questions])
    return [[c.input_ids, r.input_ids] for c, r in encoded], [model.encode_prompt(q) for q in questions]


def spawn(system: str, work: Path, tag: str, args) -> dict:
    cmd = [sys.executable, __file__, "--worker", system, "--work", str(work), "--tag", tag, "--method", args.method,
           "--steps", str(args.steps), "--batch-size", str(args.batch_size), "--lr", str(args.lr), "--threads", str(args.threads),
           "--g", str(args.g), "--new-tokens", str(args.new_tokens)]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode:
        sys.exit(f"{system} run failed:\n{proc.stderr[-4000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--method", choices=("dpo", "grpo"), default="dpo")
    p.add_argument("--pairs", type=int, default=64, help="pairs (DPO) or prompts (GRPO) in the data")
    p.add_argument("--steps", type=int, default=None,
                   help="optimizer steps, at least 2: the loop time starts after step 1 (default: DPO 16, GRPO 8)")
    p.add_argument("--batch-size", type=int, default=4, help="pairs (DPO) or prompts (GRPO) per step")
    p.add_argument("--g", type=int, default=8, help="GRPO: answers per prompt")
    p.add_argument("--new-tokens", type=int, default=24, help="GRPO: tokens per answer")
    p.add_argument("--lr", type=float, default=1e-4)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--threads", type=int, default=1,
                   help="torch intra-op threads per run; on the 2-core CI machine 2 threads made a tiny step ~20x slower")
    p.add_argument("--worker", choices=SYSTEMS, help=argparse.SUPPRESS)
    p.add_argument("--work", type=Path, help=argparse.SUPPRESS)
    p.add_argument("--tag", default="0", help=argparse.SUPPRESS)
    args = p.parse_args()
    from vlmalign.cli import quiet_libraries

    quiet_libraries()

    if args.worker:
        import torch

        torch.set_num_threads(args.threads)
        out = WORKERS[args.method, args.worker](args.work, args.tag, args)
        print(json.dumps({**out, "peak_rss_mb": peak_rss_mb()}))
        return
    if args.steps is None:
        args.steps = 16 if args.method == "dpo" else 8
    if args.steps < 2:
        p.error("--steps must be at least 2")
    if args.steps * args.batch_size > args.pairs:
        p.error("--steps x --batch-size must not exceed --pairs (both trainers run one epoch at most)")

    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        ours, prompt_ids = prepare(work, args.pairs)
        runs = {s: [] for s in SYSTEMS}
        for r in range(args.repeats):
            for system in SYSTEMS:
                runs[system].append(spawn(system, work, str(r), args))
    if args.method == "grpo":
        report_grpo(runs, prompt_ids, args)
        return

    lengths = {len(seq) for pair in ours for seq in pair}
    assert len(lengths) == 1, f"pairs differ in length ({sorted(lengths)}): the token count per step would vary"
    tokens_per_pair = 2 * lengths.pop()
    same_ids = runs["TRL"][0]["sequences"] == ours

    print(f"DPO, tiny text-only LLaMA ({args.pairs} pairs, {args.steps} steps x {args.batch_size} pairs, "
          f"{tokens_per_pair} tokens per pair, median of {args.repeats} runs, {args.threads} torch thread(s) each)")
    print(f"token ids TRL trains on == vlmalign's: {'yes' if same_ids else 'NO (the token counts below are vlmalign-side)'}")
    header = f"{'system':<9} {'total s':>8} {'total tok/s':>12} {'loop s':>8} {'loop tok/s':>11} {'first loss':>11} {'peak RSS MB':>12}"
    print(header)
    print("-" * len(header))
    loop_rate = {}
    total_rate = {}
    for system in SYSTEMS:
        rs = runs[system]
        assert all(len(x["step_ends"]) == args.steps for x in rs), f"{system}: not every step was timed"
        total_s = statistics.median(x["seconds"] for x in rs)
        loop_s = statistics.median(x["step_ends"][-1] - x["step_ends"][0] for x in rs)
        total_rate[system] = args.steps * args.batch_size * tokens_per_pair / total_s
        loop_rate[system] = (args.steps - 1) * args.batch_size * tokens_per_pair / loop_s
        print(f"{system:<9} {total_s:>8.2f} {total_rate[system]:>12.0f} {loop_s:>8.3f} {loop_rate[system]:>11.0f} "
              f"{rs[0]['first_loss']:>11.4f} {max(x['peak_rss_mb'] for x in rs):>12.0f}")
    print(f"vlmalign/TRL tokens/s ratio: {loop_rate['vlmalign'] / loop_rate['TRL']:.2f} "
          f"(loop, steps 2..{args.steps}); {total_rate['vlmalign'] / total_rate['TRL']:.2f} (total, setup included)")


def report_grpo(runs: dict, prompt_ids: list[list[int]], args) -> None:
    same_ids = runs["TRL"][0]["prompt_ids"] == prompt_ids[: args.batch_size]
    step_tokens = args.batch_size * args.g * args.new_tokens
    print(f"GRPO, tiny text-only LLaMA ({args.steps} steps x {args.batch_size} prompts x G = {args.g}, "
          f"{args.new_tokens} tokens per answer, prompt {len(prompt_ids[0])} tokens, median of {args.repeats} runs, "
          f"{args.threads} torch thread(s) each)")
    print(f"prompt token ids TRL samples from == vlmalign's: {'yes' if same_ids else 'NO'}")
    header = (f"{'system':<9} {'total s':>8} {'total tok/s':>12} {'loop s':>8} {'loop tok/s':>11} {'sampling':>9} "
              f"{'answer tok':>11} {'peak RSS MB':>12}")
    print(header)
    print("-" * len(header))
    loop_rate, total_rate = {}, {}
    for system in SYSTEMS:
        rs = runs[system]
        assert all(len(x["step_ends"]) == args.steps for x in rs), f"{system}: not every step was timed"
        total_s = statistics.median(x["seconds"] for x in rs)
        loop_s = statistics.median(x["step_ends"][-1] - x["step_ends"][0] for x in rs)
        # the sampling share of steps 2..N, whose generation calls are the 2nd to the last
        share = statistics.median(sum(x["sampling_s"][1:]) / (x["step_ends"][-1] - x["step_ends"][0]) for x in rs)
        total_rate[system] = args.steps * step_tokens / total_s
        loop_rate[system] = (args.steps - 1) * step_tokens / loop_s
        lengths = [t for x in rs for t in x["answer_tokens"]]
        print(f"{system:<9} {total_s:>8.2f} {total_rate[system]:>12.0f} {loop_s:>8.3f} {loop_rate[system]:>11.0f} "
              f"{share:>8.0%} {min(lengths):>5.1f}-{max(lengths):<5.1f} {max(x['peak_rss_mb'] for x in rs):>12.0f}")
    print(f"vlmalign/TRL tokens/s ratio: {loop_rate['vlmalign'] / loop_rate['TRL']:.2f} "
          f"(loop, steps 2..{args.steps}); {total_rate['vlmalign'] / total_rate['TRL']:.2f} (total, setup included)")


if __name__ == "__main__":
    main()
