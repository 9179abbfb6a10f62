"""`vlmalign eval BENCHMARK ...`: turn the command's arguments into one evaluation (parsed in vlmalign.cli).

    synthetic | msvd-qa | msrvtt-qa | tgif-qa | activitynet-qa   zero-shot QA, judged (vlmalign.eval.qa)
    msvd- | msrvtt- | tgif- | ssv2-caption-qa                      the same, the judge reading captions (LLaVA-Hound)
    video-mme                                                      multiple choice, no judge (vlmalign.eval.mcq)
    generative                                                     five criteria, judged (vlmalign.eval.generative)
    retrieval | action                                             CLIP-score, no judge (vlmalign.eval.retrieval)
    compare REPORT ...                                             reports side by side (vlmalign.eval.compare)
"""

from __future__ import annotations

from pathlib import Path

from vlmalign.config import JudgeConfig
from vlmalign.data.formats import HUB_SCHEME
from vlmalign.errors import VlmalignError
from vlmalign.eval.common import Decoding, load_judge_config
from vlmalign.eval.qa import CAPTION_QA_BENCHMARKS

QA_BENCHMARKS = ("synthetic", "msvd-qa", "msrvtt-qa", "tgif-qa", "activitynet-qa", *CAPTION_QA_BENCHMARKS)


def _decoding(args, default_tokens: int) -> Decoding:
    tokens = args.max_new_tokens if args.max_new_tokens is not None else default_tokens
    if tokens < 1 or args.batch_size < 1:
        raise VlmalignError("--max-new-tokens and --batch-size must be at least 1")
    if args.temperature < 0 or not 0 < args.top_p <= 1:
        raise VlmalignError("--temperature must be >= 0 (0: greedy) and --top-p in (0, 1]")
    return Decoding(temperature=args.temperature, top_p=args.top_p, max_new_tokens=tokens, batch_size=args.batch_size,
                    seed=args.seed)


def _judge(args, default: str | None) -> tuple[JudgeConfig, str]:
    spec = args.judge or default
    if spec is None:
        raise VlmalignError(f"eval {args.benchmark}: needs --judge, a judge config (e.g. configs/judges/"
                            "gpt-3.5-turbo-0613.yaml): every number must say which judge made it")
    return load_judge_config(spec, args.overrides)


def _out(args) -> Path:
    if args.out:
        return Path(args.out)
    source = args.model or args.predictions
    return Path(source).resolve().parent / f"eval-{args.benchmark}"


def _source_checks(args) -> None:
    if args.predictions and args.model:
        raise VlmalignError(f"eval {args.benchmark}: --predictions evaluates existing answers; drop --model")
    if not args.predictions and not args.model:
        raise VlmalignError(f"eval {args.benchmark}: give --model (with --data) or --predictions")
    if args.predictions and not _hub(args.predictions) and not Path(args.predictions).is_file():
        raise VlmalignError(f"--predictions: {args.predictions}: file not found")
    if args.model and not args.data:
        raise VlmalignError(f"eval {args.benchmark}: --model needs --data, the questions to answer")
    if args.data and not _hub(args.data) and not Path(args.data).exists():
        raise VlmalignError(f"--data: {args.data}: not found")


def _hub(name: str) -> bool:
    """A hub file URL: read through the hub cache, which reports a missing file itself."""
    return name.startswith(HUB_SCHEME)


def _summary(report: dict, out: Path) -> str:
    lines = [report["table"], ""]
    j, judge = report.get("judging"), report.get("judge")
    if judge and judge["backend"] == "oracle":
        lines.append(f"judged by the oracle (the benchmark's ground truth): {j.get('items', j.get('judgments'))} "
                     f"{'items' if 'items' in j else 'judgments'}")
    elif j:
        lines.append(f"judge {judge['id']}: {j['cached']} judgments from the cache, {j['sent']} prompts sent, "
                     f"{j['failed']} failed, {j['parse_errors']} unparseable (excluded from the numbers)")
    lines.append(f"report: {out / 'report.md'}")
    return "\n".join(lines)


def _qa(args) -> dict:
    from vlmalign.eval.qa import evaluate_qa

    _source_checks(args)
    data = Path(args.data) if args.data else None
    bench = None
    if args.benchmark == "synthetic" and data is not None:
        bench = data if data.is_dir() else data.parent
        data = data / "qa_test.json" if data.is_dir() else data
    cfg, judge_file = _judge(args, "oracle" if args.benchmark == "synthetic" else None)
    if cfg.backend == "oracle" and cfg.bench is None and bench is not None:
        cfg.bench = str(bench)
    # caption-grounded sets read their captions from --data, also when judging given predictions
    keep_data = not args.predictions or args.benchmark in CAPTION_QA_BENCHMARKS
    return evaluate_qa(args.benchmark, _out(args), cfg, judge_file=judge_file, data=data if keep_data else None,
                       videos=args.videos, model_dir=args.model, predictions=args.predictions,
                       decoding=_decoding(args, 64), limit=args.limit, feature_cache=args.feature_cache,
                       float_scores=args.float_scores)


def _mcq(args) -> dict:
    from vlmalign.eval.mcq import evaluate_mcq

    _source_checks(args)
    if args.judge:
        raise VlmalignError(f"eval {args.benchmark}: multiple choice needs no judge; drop --judge")
    return evaluate_mcq(args.benchmark, _out(args), data=None if args.predictions else args.data, videos=args.videos,
                        model_dir=args.model, predictions=args.predictions, decoding=_decoding(args, 64),
                        limit=args.limit, feature_cache=args.feature_cache)


def _generative(args) -> dict:
    from vlmalign.eval.generative import evaluate_generative, prediction_sets, synthetic_sets

    _source_checks(args)
    bench = None
    if args.predictions:
        sets = prediction_sets(args.predictions)
    elif Path(args.data).is_dir():
        sets, bench = synthetic_sets(args.data), Path(args.data)
    else:
        sets = {"general": args.data}
    for name in ("temporal", "consistency"):
        path = getattr(args, name)
        if path:
            if not Path(path).is_file():
                raise VlmalignError(f"--{name}: {path}: file not found")
            sets[name] = path
    cfg, judge_file = _judge(args, "oracle" if bench is not None else None)
    if cfg.backend == "oracle" and cfg.bench is None and bench is not None:
        cfg.bench = str(bench)
    return evaluate_generative(_out(args), cfg, sets, judge_file=judge_file, predictions=bool(args.predictions),
                               videos=args.videos, model_dir=args.model, decoding=_decoding(args, 512), limit=args.limit,
                               feature_cache=args.feature_cache, float_scores=args.float_scores)


def _clip_score(args) -> dict:
    from vlmalign.eval.retrieval import evaluate_action, evaluate_retrieval, read_classes

    _source_checks(args)
    if args.judge:
        raise VlmalignError(f"eval {args.benchmark}: CLIP-score needs no judge; drop --judge (--text-encoder picks the text tower)")
    if args.overrides:
        raise VlmalignError(f"eval {args.benchmark}: --set overrides a judge config; CLIP-score has no judge")
    data = args.predictions or args.data
    classes = args.classes
    if not _hub(data) and Path(data).is_dir():  # a synthetic benchmark folder
        data = Path(data)
        data, classes = data / f"{args.benchmark}_test.json", classes or data / "action_classes.txt"
    if args.benchmark == "retrieval":
        if args.classes:
            raise VlmalignError("eval retrieval: --classes is for `action`")
        return evaluate_retrieval(_out(args), data, model_dir=args.model, predictions=bool(args.predictions),
                                  videos=args.videos, text_encoder=args.text_encoder, decoding=_decoding(args, 128),
                                  limit=args.limit, feature_cache=args.feature_cache)
    if classes is not None and not Path(classes).is_file():
        raise VlmalignError(f"--classes: {classes}: file not found")
    return evaluate_action(_out(args), data, classes=read_classes(classes) if classes else None,
                           class_template=args.class_template, model_dir=args.model, predictions=bool(args.predictions),
                           videos=args.videos, text_encoder=args.text_encoder, decoding=_decoding(args, 128),
                           limit=args.limit, feature_cache=args.feature_cache)


def _compare(args) -> int:
    from vlmalign.eval.compare import compare_reports

    result = compare_reports(args.reports, args.out)
    print(result["markdown"].rstrip())
    print(f"\nwritten: {Path(result['out']) / 'compare.md'}" + (f", {result['chart']}" if result["chart"] else ""))
    return 0


def run_eval(args) -> int:
    if args.benchmark == "compare":
        return _compare(args)
    if args.reports:
        raise VlmalignError(f"eval {args.benchmark}: unexpected arguments {' '.join(args.reports)} "
                            "(only `compare` takes reports)")
    if args.benchmark in QA_BENCHMARKS:
        report = _qa(args)
    elif args.benchmark == "video-mme":
        report = _mcq(args)
    elif args.benchmark in ("retrieval", "action"):
        report = _clip_score(args)
    else:
        report = _generative(args)
    print(_summary(report, _out(args)))
    return 0
