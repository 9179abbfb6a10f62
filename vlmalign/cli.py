"""`vlmalign <command>`: parse arguments, load the stage's config, call that stage's `run`.

Every training command takes `--config FILE` and any number of `--set key.sub=value` overrides, and
`--launch NAME` to re-run itself under `accelerate launch` with a bundled accelerate config
(`configs/accelerate/NAME.yaml`) or a path. Errors in user input print one line and exit 2.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

from vlmalign.errors import VlmalignError

CONFIGS_DIR = Path(__file__).resolve().parents[1] / "configs"

EVAL_BENCHMARKS = ["synthetic", "msvd-qa", "msrvtt-qa", "tgif-qa", "activitynet-qa", "msvd-caption-qa", "msrvtt-caption-qa",
                   "tgif-caption-qa", "ssv2-caption-qa", "generative", "video-mme", "retrieval", "action"]


def _add_config_args(p: argparse.ArgumentParser, required: bool = True) -> None:
    p.add_argument("--config", required=required, help="YAML config (may include others with `base:`)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config value, e.g. --set train.lr=2e-5 (repeatable)")
    p.add_argument("--launch", metavar="NAME|PATH",
                   help="run under `accelerate launch` with configs/accelerate/NAME.yaml or a config file")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="vlmalign", description="Align video LLMs with AI feedback.")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    p = sub.add_parser("train-sft", help="curriculum SFT of the video LLM on instruction data")
    _add_config_args(p)

    p = sub.add_parser("generate", help="answer questions about videos with a trained model")
    p.add_argument("--model", required=True, help="a saved model directory (e.g. runs/sft/final)")
    p.add_argument("--video", help="one video file or frame folder")
    p.add_argument("--question", help="the question for --video")
    p.add_argument("--data", help="instruction or QA file: answer every question in it")
    p.add_argument("--out", help="write answers as JSONL here (default: print)")
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--sample", action="store_true", help="sample instead of greedy decoding")
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--num-return-sequences", type=int, default=1, help="answers per question (G)")
    p.add_argument("--seed", type=int, default=None, help="seed of the sampling (with --sample): the same answers every run")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--feature-cache", default=None, help="folder for cached video features")

    p = sub.add_parser("make-instructions", help="turn detailed video captions into instruction data with an LLM")
    _add_config_args(p)

    p = sub.add_parser("make-prefs", help="sample answers, add context, judge them, and write preference data")
    _add_config_args(p)

    p = sub.add_parser("dpo", help="DPO on preference files, or iterative self-retrospective DPO with --iterations T")
    _add_config_args(p)
    p.add_argument("--iterations", type=int, default=None,
                   help="ISR-DPO iterations T (sets loop.iterations; 0 = offline DPO on data.train)")

    p = sub.add_parser("grpo-rank", help="GRPO with rank-based advantages from a judge's rankings (or plain GRPO on scores)")
    _add_config_args(p)

    p = sub.add_parser("train-rm", help="train a context-aware reward model on preference pairs")
    _add_config_args(p)

    p = sub.add_parser("ppo", help="optimise a policy with PPO against a reward model (or a judge's scores)")
    _add_config_args(p)

    p = sub.add_parser("eval", help="evaluate a model (or existing predictions) on a benchmark, or compare reports")
    p.add_argument("benchmark", choices=[*EVAL_BENCHMARKS, "compare"])
    p.add_argument("reports", nargs="*", help="compare: report.json files or eval folders to put side by side")
    p.add_argument("--model", help="a saved model directory (e.g. runs/sft/final)")
    p.add_argument("--data", help="the questions: a QA, multiple-choice or generative file; for `synthetic` "
                                  "(and `generative`) also the make-synthetic folder")
    p.add_argument("--videos", help="folder the data's video names are relative to (default: the data file's folder)")
    p.add_argument("--predictions", help="judge this file of existing answers (Video-ChatGPT format) instead of a model")
    p.add_argument("--temporal", help="generative: the temporal question set (its predictions with --predictions)")
    p.add_argument("--consistency", help="generative: the consistency set, Q1/Q2 (its predictions with --predictions)")
    p.add_argument("--judge", metavar="CONFIG|NAME",
                   help="judge config: a YAML file with a `judge:` section, or a name in configs/judges/ "
                        "(synthetic defaults to oracle)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override the judge config, e.g. --set judge.base_url=http://localhost:8000/v1 (repeatable)")
    p.add_argument("--out", help="output folder (default: eval-BENCHMARK beside --model or --predictions; "
                                 "compare: compare/ in the reports' common folder)")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--max-new-tokens", type=int, default=None,
                   help="default 64; 512 for generative, 128 for retrieval and action")
    p.add_argument("--temperature", type=float, default=0.0, help="0 (default): greedy; above 0: sampled (recorded)")
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=0, help="seed of sampled decoding")
    p.add_argument("--limit", type=int, default=None, help="evaluate only the first N questions (of each set)")
    p.add_argument("--feature-cache", default=None, help="folder for cached video features")
    p.add_argument("--text-encoder", metavar="CLIP", help="retrieval / action: the CLIP checkpoint whose text tower "
                                                           "scores (default: the one the model's vision tower came from)")
    p.add_argument("--classes", help="action: class names, one per line (default: the labels in --data)")
    p.add_argument("--class-template", default="a video of {}.", help="action: how a class name is written for CLIP")
    p.add_argument("--float-scores", action="store_true",
                   help="keep judge scores as given (default: their integer part, as the published protocol)")

    p = sub.add_parser("inspect", help="write an offline site of the runs' preferences, evaluations and training; "
                                       "judge-human agreement from an annotation file")
    p.add_argument("runs", nargs="*", metavar="RUN_DIR", help="run folders, or folders above them (a gym or demo output)")
    p.add_argument("--out", default="inspect", help="folder for the site (default: ./inspect)")
    p.add_argument("--serve", type=int, metavar="PORT",
                   help="after writing the site, serve it on 127.0.0.1:PORT; annotations go to OUT/annotations.jsonl")
    p.add_argument("--agreement", metavar="FILE", help="report judge-human agreement of an annotation file (no site written)")
    p.add_argument("--oracle-annotations", metavar="FILE",
                   help="synthetic benchmark: write the annotation file the oracle would, to check --agreement against "
                        "the judge-oracle agreement the stages report")

    p = sub.add_parser("make-synthetic", help="write the synthetic video-QA benchmark (videos, data, oracle metadata)")
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--videos", type=int, default=600, help="number of videos")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--frames", type=int, default=16, help="frames per video")
    p.add_argument("--size", type=int, default=64, help="frame width and height in pixels")
    p.add_argument("--max-objects", type=int, default=2,
                   help="each video shows 1..N objects (1: no question needs binding an attribute to its object)")
    p.add_argument("--prior-rate", type=float, default=0.0,
                   help="declared misalignment: share of short SFT answers that state the question's prior")
    p.add_argument("--invent-rate", type=float, default=0.0,
                   help="declared misalignment: share of SFT descriptions that gain an invented object")

    p = sub.add_parser("gym", help="the alignment gym: every method and its negative control from a misaligned SFT start")
    p.add_argument("--out", default="runs/gym", help="folder for the benchmark, runs and table")
    p.add_argument("--seeds", default="0,1,2", help="comma-separated training seeds")
    p.add_argument("--design", default="perception", choices=("perception", "grid", "pooled", "quick"),
                   help="the benchmark and budget (docs/results.md): perception (default; 2,100 training videos, each "
                        "frame a 2 x 2 grid of placed visual tokens, a direction-and-shape stage that both SFT models "
                        "start from), grid (the same without that stage; its ceiling's direction stays at chance), "
                        "pooled (240 training videos, pooled frames, 16 SFT epochs), quick (the demo's)")
    p.add_argument("--methods", default=None, help="comma-separated subset of dpo,grpo,grpo_rank,grpo_rank_monotone,ppo,ppo_oracle,isr_dpo,vlm_rlaif "
                                                   "(default: all), or none: the ceiling and the start only")
    p.add_argument("--family", default="video_lm",
                   help="the model every run trains: video_lm (vlmalign's VideoLM), or qwen2_5_vl, qwen2_vl, qwen3_vl, "
                        "llava_onevision, llava_next_video, video_llava (a tiny random transformers video model of that "
                        "family, built offline)")
    p.add_argument("--jobs", type=int, default=1,
                   help="seeds trained side by side, each in a process of its own with a share of the torch threads "
                        "(tiny models: one seed per core is fastest)")

    p = sub.add_parser("demo", help="the embedded default: the alignment gym on one seed, small budget, on a CPU")
    p.add_argument("--out", default="runs/demo", help="folder for the benchmark, runs and table")
    p.add_argument("--seeds", default="0", help="comma-separated training seeds; several give mean ± standard deviation")
    p.add_argument("--family", default="video_lm",
                   help="the model every run trains: video_lm (vlmalign's VideoLM), or qwen2_5_vl, qwen2_vl, qwen3_vl, "
                        "llava_onevision, llava_next_video, video_llava (a tiny random transformers video model of that "
                        "family, built offline)")
    return parser


def _relaunch(args: argparse.Namespace, argv: list[str]) -> int:
    bundled = CONFIGS_DIR / "accelerate" / f"{args.launch}.yaml"
    config = bundled if bundled.is_file() else Path(args.launch)
    if not config.is_file():
        names = sorted(p.stem for p in (CONFIGS_DIR / "accelerate").glob("*.yaml"))
        raise VlmalignError(f"--launch: no accelerate config {args.launch!r} (bundled: {', '.join(names)})")
    rest = []
    skip = False
    for i, tok in enumerate(argv):
        if skip:
            skip = False
            continue
        if tok == "--launch":
            skip = True
            continue
        if tok.startswith("--launch="):
            continue
        rest.append(tok)
    import yaml

    settings = yaml.safe_load(config.read_text()) or {}
    processes = int(settings.get("num_processes", 1))
    if settings.get("use_cpu") and processes > 1 and int(settings.get("num_machines", 1)) == 1:
        # `accelerate launch` starts one process for a CPU config unless MPI is set up; torchrun
        # starts them all, and ACCELERATE_USE_CPU makes accelerate join them with gloo.
        env = {**os.environ, "ACCELERATE_USE_CPU": "true", "ACCELERATE_MIXED_PRECISION": str(settings.get("mixed_precision", "no"))}
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(processes), "-m", "vlmalign.cli", *rest]
        return subprocess.call(cmd, env=env)
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(config)]
    ds_file = (settings.get("deepspeed_config") or {}).get("deepspeed_config_file")
    if ds_file and not Path(ds_file).is_absolute() and not Path(ds_file).is_file():
        # the bundled configs name their DeepSpeed file relative to the repository root
        cmd += ["--deepspeed_config_file", str(CONFIGS_DIR.parent / ds_file)]
    cmd += ["-m", "vlmalign.cli", *rest]
    return subprocess.call(cmd)


def _cmd_train_sft(args) -> int:
    from vlmalign.config import SFTConfig, load_config
    from vlmalign.train import sft

    sft.run(load_config(SFTConfig, args.config, args.overrides))
    return 0


def _cmd_make_instructions(args) -> int:
    from vlmalign.config import InstructionsConfig, load_config
    from vlmalign.feedback import instructions

    instructions.run(load_config(InstructionsConfig, args.config, args.overrides))
    return 0


def _cmd_make_prefs(args) -> int:
    from vlmalign.config import PrefsConfig, load_config
    from vlmalign.feedback import preferences

    preferences.run(load_config(PrefsConfig, args.config, args.overrides))
    return 0


def _cmd_dpo(args) -> int:
    from vlmalign.config import DPOConfig, load_config
    from vlmalign.train import dpo

    overrides = list(args.overrides)
    if args.iterations is not None:
        overrides.append(f"loop.iterations={args.iterations}")
    dpo.run(load_config(DPOConfig, args.config, overrides))
    return 0


def _cmd_grpo_rank(args) -> int:
    from vlmalign.config import GRPOConfig, load_config
    from vlmalign.train import grpo_rank

    grpo_rank.run(load_config(GRPOConfig, args.config, args.overrides))
    return 0


def _cmd_train_rm(args) -> int:
    from vlmalign.config import RMConfig, load_config
    from vlmalign.train import rm

    rm.run(load_config(RMConfig, args.config, args.overrides))
    return 0


def _cmd_ppo(args) -> int:
    from vlmalign.config import PPOConfig, load_config
    from vlmalign.train import ppo

    ppo.run(load_config(PPOConfig, args.config, args.overrides))
    return 0


def _cmd_generate(args) -> int:
    from vlmalign.data.formats import read_instructions, read_qa, write_jsonl
    from vlmalign.model.generation import GenerationConfig, generate_answers
    from vlmalign.model.policy import load_model

    if bool(args.video) == bool(args.data):
        raise VlmalignError("generate: give either --video with --question, or --data")
    if args.video and not args.question:
        raise VlmalignError("generate: --video needs --question")
    model = load_model(args.model)
    if args.video:
        requests = [("q0", args.video, args.question)]
    else:
        try:
            requests = [(q.id, q.video, q.question) for q in read_qa(args.data)]
        except VlmalignError:
            requests = [(s.id, s.video, s.turns[0].text) for s in read_instructions(args.data)]
    gen = GenerationConfig(args.max_new_tokens, args.sample, args.temperature, args.top_p, args.num_return_sequences, args.batch_size)
    answers = generate_answers(model, model.visual_inputs(args.feature_cache), [(v, q) for _, v, q in requests], gen,
                               progress=args.data is not None, seed=args.seed)
    records = [{"id": i, "video": v, "question": q, "answers": a} for (i, v, q), a in zip(requests, answers)]
    if args.out:
        write_jsonl(args.out, records)
    else:
        for r in records:
            print(json.dumps(r, ensure_ascii=False))
    return 0


def _cmd_make_synthetic(args) -> int:
    from vlmalign.data.synthetic import generate_benchmark

    from vlmalign.data.synthetic import Misalignment

    manifest = generate_benchmark(args.out, num_videos=args.videos, seed=args.seed, num_frames=args.frames, size=args.size,
                                  max_objects=args.max_objects, misalignment=Misalignment(args.prior_rate, args.invent_rate))
    for name, info in manifest["files"].items():
        print(f"{name}: {info['records']} records")
    return 0


def _cmd_eval(args) -> int:
    from vlmalign.eval.command import run_eval

    return run_eval(args)


def _cmd_inspect(args) -> int:
    from vlmalign.inspect import agreement

    if args.agreement:
        if args.runs:
            raise VlmalignError("inspect --agreement FILE reads only the annotation file; give no run folders")
        print(agreement.format_agreement(agreement.agreement(agreement.read_annotations(args.agreement)), args.agreement))
        return 0
    if not args.runs:
        raise VlmalignError("inspect: give at least one run folder (or --agreement FILE)")
    from vlmalign.inspect.site import build_site, collect

    if args.oracle_annotations:
        rows = agreement.oracle_rows(collect(args.runs)[1])
        if not rows:
            raise VlmalignError("--oracle-annotations: no pair has oracle scores (runs on the synthetic benchmark only)")
        from vlmalign.data.formats import write_jsonl

        try:  # atomically: an existing file is kept whole if the write fails
            write_jsonl(args.oracle_annotations, rows)
        except OSError as e:
            raise VlmalignError(f"--oracle-annotations {args.oracle_annotations}: cannot write ({e.strerror or e})") from None
        print(f"{len(rows)} oracle annotations written to {args.oracle_annotations}")
        return 0
    index = build_site(args.runs, args.out)
    print(f"site written to {index}")
    if args.serve is not None:
        from vlmalign.inspect.serve import serve

        serve(index.parent, index.parent / "annotations.jsonl", args.serve)
    return 0


def _seeds(text: str) -> list[int]:
    try:
        seeds = [int(s) for s in text.split(",") if s.strip()]
    except ValueError:
        raise VlmalignError(f"--seeds: comma-separated integers, got {text!r}") from None
    if not seeds:
        raise VlmalignError("--seeds: give at least one seed")
    return seeds


def _cmd_gym(args) -> int:
    import dataclasses

    from vlmalign.gym import DESIGNS, METHODS, run_gym

    budget = DESIGNS[args.design]
    if args.methods:
        methods = () if args.methods == "none" else tuple(m.strip() for m in args.methods.split(",") if m.strip())
        unknown = sorted(set(methods) - set(METHODS))
        if unknown:
            raise VlmalignError(f"--methods: unknown {', '.join(unknown)}; choose from {', '.join(METHODS)}")
        budget = dataclasses.replace(budget, methods=methods)
    budget = dataclasses.replace(budget, family=args.family)
    command = " ".join(["vlmalign gym", *(["--design", args.design] if args.design != "perception" else []),
                        "--out", args.out, "--seeds", args.seeds,
                        *(["--methods", args.methods] if args.methods else []),
                        *(["--family", args.family] if args.family != "video_lm" else [])])
    run_gym(args.out, budget, _seeds(args.seeds), progress=True, command=command, jobs=args.jobs)
    return 0


def _cmd_demo(args) -> int:
    from vlmalign.demo import run_demo

    run_demo(args.out, seeds=_seeds(args.seeds), family=args.family)
    return 0


COMMANDS = {
    "train-sft": _cmd_train_sft,
    "generate": _cmd_generate,
    "make-instructions": _cmd_make_instructions,
    "make-prefs": _cmd_make_prefs,
    "dpo": _cmd_dpo,
    "grpo-rank": _cmd_grpo_rank,
    "train-rm": _cmd_train_rm,
    "ppo": _cmd_ppo,
    "make-synthetic": _cmd_make_synthetic,
    "eval": _cmd_eval,
    "gym": _cmd_gym,
    "demo": _cmd_demo,
    "inspect": _cmd_inspect,
}


def quiet_libraries() -> None:
    """Our own progress bars say what is happening; per-shard bars from transformers only add noise
    (the scripts in scripts/ call this too).
    DeepSpeed warns on every CPU-only start that it picked the CPU (it is told so instead), and
    bitsandbytes on some CPUs that an optional speed-up package is missing."""
    import logging

    import torch

    if not torch.cuda.is_available():
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    logging.getLogger("bitsandbytes").setLevel(logging.ERROR)
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    hf_logging.set_verbosity_error()


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(argv)
    quiet_libraries()
    try:
        if getattr(args, "launch", None):
            return _relaunch(args, argv)
        return COMMANDS[args.command](args)
    except VlmalignError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted: re-run the same command to resume from the last checkpoint", file=sys.stderr)
        return 130


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    sys.exit(main())
