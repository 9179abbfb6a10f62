"""Zero-shot open-ended video QA (MSVD-QA, MSRVTT-QA, TGIF-QA, ActivityNet-QA, the synthetic benchmark).

The protocol (Video-ChatGPT's): the model answers each question; a text-only judge reads the
question, the reference answer and the prediction and replies with a verdict (yes / no) and a score
0..5 (prompt `eval.qa`; integer part of the score unless `float_scores`). Accuracy is
yes / (yes + no); the score is the mean over judged items. Both are reported overall and per question
type when the data has types (`question_type`, `type` or `qtype`).

A judgment that failed (the request never got a reply) or whose reply could not be parsed is kept in
`judgments.jsonl` with its status and counted in the report, and is left out of accuracy and score,
never counted as a "no" or a 0. Judge replies are cached (`judge_cache.sqlite` in the output folder,
or `judge.cache`), so a re-run, after a kill or a failure, sends only what has no reply yet; the
report says how many judgments came from the cache.

The synthetic benchmark's `oracle` judge scores with the benchmark's ground truth instead
(`Oracle.verdict`: correct -> yes, its 1..5 score -> score); it is instant and not cached.

Inputs: a QA file (`read_qa`) answered by a model, or `predictions`: a Video-ChatGPT prediction file
`[{"id" | "video_name", "question", "answer", "pred"}]` (JSON array or JSONL; optional
`question_id` and question type), judged as it is.

Outputs in `out_dir`: `predictions.jsonl` (the Video-ChatGPT fields plus `qtype`), `judgments.jsonl`
(per item: status, verdict, score, raw reply, judge, prompt, the model that answered, date, cached),
`report.json`, `report.md`, and `generations.jsonl` (see `vlmalign.eval.common`).
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, replace
from pathlib import Path

from vlmalign.config import JudgeConfig
from vlmalign.data.formats import QAItem, read_qa
from vlmalign.errors import JudgeError, VlmalignError
from vlmalign.eval.common import (
    Decoding,
    Request,
    check_limit,
    decoding_summary,
    describe_decoding,
    describe_judge,
    fmt,
    generate,
    judge_summary,
    read_records,
    strip_placeholder,
    unique_keys,
    write_outputs,
)
from vlmalign.eval.replies import parse_qa_reply
from vlmalign.feedback.cache import utc_now
from vlmalign.prompts import load_prompt, parse_score

__all__ = ["QAPrediction", "read_predictions", "evaluate_qa", "qa_results", "results_table", "format_table"]

_QTYPE_FIELDS = ("question_type", "type", "qtype")
# LLaVA-Hound's caption-grounded test sets: the judge reads the video's caption too (`eval.caption_qa`).
CAPTION_QA_BENCHMARKS = ("msvd-caption-qa", "msrvtt-caption-qa", "tgif-caption-qa", "ssv2-caption-qa")
CAPTION_QA_PASS = 3  # a score of 3 or more counts as correct, as in LLaVA-Hound's evaluation


@dataclass
class QAPrediction:
    key: str  # unique within the evaluation
    video: str  # what the oracle looks up (a path or a bare video name)
    video_name: str
    question: str
    answer: str
    pred: str
    qtype: str | None = None
    source: str = ""  # "file:line" of the question or prediction
    caption: str | None = None  # the caption-grounded protocol: what the judge reads about the video

    def record(self) -> dict:
        """The Video-ChatGPT prediction record (plus qtype and caption when present)."""
        out = {"id": self.key, "video_name": self.video_name, "question": self.question, "answer": self.answer,
               "pred": self.pred}
        if self.qtype is not None:
            out["qtype"] = self.qtype
        if self.caption is not None:
            out["caption"] = self.caption
        return out


def read_caption_qa(path, video_root=None) -> list[tuple[QAItem, str]]:
    """LLaVA-Hound's released test files ({msvd,msrvtt,tgif,ssv2}.qa.jsonl): per line `id`, `video`
    (a video or a folder of frames), `caption`, and the question and reference answer as `question`
    and `answer`, or as the first two `conversations` turns. Returns (item, caption) pairs."""
    out = []
    for f, data in read_records(path):
        turns = data.get("conversations")
        if turns is not None:
            if not isinstance(turns, list) or len(turns) < 2 or not all(isinstance(t, dict) and "value" in t for t in turns[:2]):
                raise f.error("field 'conversations' needs a question turn and an answer turn, each with 'value'")
            question, answer = strip_placeholder(str(turns[0]["value"])), str(turns[1]["value"]).strip()
        else:
            question, answer = f.text("question"), f.text("answer")
        video = f.text("video")
        video = str(Path(video_root) / video) if video_root else video
        out.append((QAItem(f.text("id"), video, question, answer, source=f.where), f.text("caption")))
    return out


def attach_captions(preds: list[QAPrediction], captioned: list[tuple[QAItem, str]], data) -> None:
    """Give each prediction its video's caption from the released file (by question id, else video)."""
    by_id = {item.id: caption for item, caption in captioned}
    by_video = {Path(item.video).name: caption for item, caption in captioned}
    for p in preds:
        caption = by_id.get(p.key, by_video.get(Path(p.video_name).name))
        if caption is None:
            raise VlmalignError(f"{p.source}: prediction {p.key!r} has no caption in {data} (matched by id, then video)")
        p.caption = caption


def read_predictions(path) -> list[QAPrediction]:
    """Read a Video-ChatGPT prediction file; errors name the file, line and field."""
    rows, ids = [], []
    for f, data in read_records(path):
        name = f.text("video_name", alternatives=("id", "video"))
        qtype_key = f.first(_QTYPE_FIELDS)
        rows.append((name, f.text("question"), f.text("answer"), f.text("pred", allow_empty=True),
                     f.text(qtype_key) if qtype_key else None, f.where))
        ids.append(f.text("question_id", alternatives=("id", "video_name", "video")))
    return [QAPrediction(key, name, Path(name).name, *row) for key, (name, *row) in zip(unique_keys(ids), rows)]


def _generate(items, model_dir, decoding: Decoding, out_dir, feature_cache, progress):
    keys = unique_keys([it.id for it in items])
    answers, stats = generate(model_dir, [Request(k, it.video, it.question) for k, it in zip(keys, items)],
                              decoding, out_dir, feature_cache, progress)
    preds = [QAPrediction(k, it.video, Path(it.video).name, it.question, it.answer, answers[k], it.qtype, it.source)
             for k, it in zip(keys, items)]
    return preds, stats


# ------------------------------------------------------------------------------------ judging


def _oracle_judgments(preds: list[QAPrediction], bench) -> list[dict]:
    from vlmalign.feedback.oracle import Oracle

    oracle, now, records = Oracle.from_dir(bench), utc_now(), []
    for p in preds:
        try:
            v = oracle.verdict(p.video, p.question, p.pred)
        except VlmalignError as e:
            raise VlmalignError(f"{p.source}: item {p.key!r}: {e}") from None
        if p.qtype is None:
            p.qtype = v.qtype
        records.append({"id": p.key, "status": "ok", "verdict": "yes" if v.correct else "no", "score": v.score,
                        "raw": v.reason, "judge": "oracle", "prompt": "oracle.verdict", "model": "oracle",
                        "date": now, "cached": False, "error": None})
    return records


def _caption_qa_reply(text) -> tuple[bool, int] | None:
    """(score >= 3, score) from an `eval.caption_qa` reply ("Explanation: ...", "Score: N", 1-5)."""
    score = parse_score(text)
    return None if score is None else (score >= CAPTION_QA_PASS, score)


def _llm_judgments(preds: list[QAPrediction], cfg: JudgeConfig, cache_path, float_scores: bool, progress: bool):
    """(records, judge, prompt id) from an openai or hf judge asked with the `eval.qa` prompt, or with
    `eval.caption_qa` when the predictions carry captions."""
    from vlmalign.feedback.judges import build_judge

    grounded = bool(preds) and preds[0].caption is not None
    prompt = load_prompt("eval.caption_qa" if grounded else "eval.qa", cfg.prompts)
    judge = build_judge(cfg, cache_path, progress=progress)
    fields = [{"question": strip_placeholder(p.question), "answer": p.answer, "pred": p.pred} for p in preds]
    texts = [prompt.render(**f, caption=p.caption) if grounded else prompt.render(**f) for f, p in zip(fields, preds)]
    read = _caption_qa_reply if grounded else (lambda raw: parse_qa_reply(raw, float_scores))
    try:
        # The judge never sees the video (the protocol is text-only), so the video is not part of the key.
        results = judge.complete([(None, t) for t in texts], prompt_id=prompt.id, parse=read)
    finally:
        judge.cache.close()
    records = []
    for p, j in zip(preds, results):
        status, verdict, score = j.status, None, None
        if status == "ok":
            parsed = read(j.value)
            if parsed is None:
                status = "parse_error"
            else:
                verdict, score = ("yes" if parsed[0] else "no"), parsed[1]
        records.append({"id": p.key, "status": status, "verdict": verdict, "score": score, "raw": j.raw,
                        "judge": j.judge, "prompt": j.prompt, "model": j.model, "date": j.created,
                        "cached": j.cached, "error": j.error})
    return records, judge, prompt.id


# ------------------------------------------------------------------------------------ results


def qa_results(qtypes: list[str | None], records: list[dict]) -> dict:
    """Per question type (when there are types) and "all": n, judged, yes, no, failed, parse_errors,
    accuracy = yes / (yes + no) and the mean score of judged items (None when nothing was judged)."""
    groups = defaultdict(list)
    for qtype, r in zip(qtypes, records):
        if qtype is not None:
            groups[qtype].append(r)
        groups["all"].append(r)
    results = {}
    for name in sorted(groups, key=lambda g: (g == "all", g)):
        rows = groups[name]
        judged = [r for r in rows if r["status"] == "ok"]
        yes = sum(r["verdict"] == "yes" for r in judged)
        results[name] = {
            "n": len(rows),
            "judged": len(judged),
            "yes": yes,
            "no": len(judged) - yes,
            "failed": sum(r["status"] == "failed" for r in rows),
            "parse_errors": sum(r["status"] == "parse_error" for r in rows),
            "accuracy": yes / len(judged) if judged else None,
            "score": sum(r["score"] for r in judged) / len(judged) if judged else None,
        }
    return results


def results_table(results: dict) -> str:
    """Markdown: per group n, judged, accuracy %, mean score, failed and unparseable judgments."""
    lines = ["| question type | n | judged | accuracy % | score | failed | unparseable |", "|---|---|---|---|---|---|---|"]
    for name, r in results.items():
        lines.append(f"| {name} | {r['n']} | {r['judged']} | {fmt(r['accuracy'], True)} | {fmt(r['score'])} | "
                     f"{r['failed']} | {r['parse_errors']} |")
    return "\n".join(lines)


def format_table(columns: dict[str, dict]) -> str:
    """Markdown table of accuracy (%) per question type, one column per model's results."""
    first = next(iter(columns.values()))
    lines = ["| question type | n | " + " | ".join(columns) + " |", "|---|---|" + "---|" * len(columns)]
    for name in first:
        cells = [fmt(col.get(name, {}).get("accuracy"), True) for col in columns.values()]
        lines.append(f"| {name} | {first[name]['n']} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


# --------------------------------------------------------------------------------------- main


def evaluate_qa(
    benchmark: str, out_dir, judge_cfg: JudgeConfig, *, judge_file: str | None = None, data=None, videos=None,
    model_dir=None, predictions=None, decoding: Decoding | None = None, limit: int | None = None,
    feature_cache: str | None = None, float_scores: bool = False, progress: bool = True,
) -> dict:
    """Answer (or read) and judge a zero-shot QA set; write the outputs and return the report."""
    check_limit(limit)
    out_dir = Path(out_dir)
    if (model_dir is None) == (predictions is None):
        raise VlmalignError(f"eval {benchmark}: give either a model with its data, or a predictions file")
    gen_stats = None
    captioned = None
    if benchmark in CAPTION_QA_BENCHMARKS:
        if data is None:
            raise VlmalignError(f"eval {benchmark}: needs --data, the released test file with its captions "
                                "(also with --predictions: the captions come from it)")
        if judge_cfg.backend == "oracle":
            raise JudgeError(f"eval {benchmark}: the caption-grounded protocol needs an LLM judge (--judge), not the oracle")
        captioned = read_caption_qa(data, video_root=videos)
    if predictions is not None:
        preds, decoding = read_predictions(predictions)[:limit], None
        if captioned is not None:
            attach_captions(preds, captioned, data)
    else:
        if data is None:
            raise VlmalignError(f"eval {benchmark}: the model needs --data, a QA file to answer")
        decoding = decoding or Decoding()
        items = [item for item, _ in captioned] if captioned is not None else read_qa(data, video_root=videos)
        preds, gen_stats = _generate(items[:limit], model_dir, decoding, out_dir, feature_cache, progress)
        if captioned is not None:
            for p, (_, caption) in zip(preds, captioned):
                p.caption = caption
    if not preds:
        raise VlmalignError(f"eval {benchmark}: {predictions or data} holds no questions")

    endpoint = None
    if judge_cfg.backend == "oracle":
        bench = judge_cfg.bench or (str(Path(data).parent) if data is not None else None)
        if bench is None:
            raise JudgeError("the oracle judge needs judge.bench, the synthetic benchmark folder (--set judge.bench=DIR)")
        judge_cfg = replace(judge_cfg, bench=str(bench))
        records, judge_id, prompts = _oracle_judgments(preds, bench), "oracle", ["oracle.verdict"]
        sent, reasks = 0, {"reasked": 0, "reask_fixed": 0}
    else:
        if judge_cfg.backend == "hf" and judge_cfg.model == "policy":
            if model_dir is None:
                raise JudgeError("judge.model 'policy' judges with the evaluated model, but --predictions has none; "
                                 "set judge.model to a saved model")
            judge_cfg = replace(judge_cfg, model=str(model_dir))
        records, judge, prompt_id = _llm_judgments(preds, judge_cfg, out_dir / "judge_cache.sqlite", float_scores, progress)
        judge_id, prompts, sent = judge.id, [prompt_id], judge.stats()["calls"]
        reasks = {k: judge.stats()[k] for k in ("reasked", "reask_fixed")}
        endpoint = getattr(judge, "endpoint", None)

    results = qa_results([p.qtype for p in preds], records)
    summary = judge_summary(judge_cfg, judge_id, judge_file, records, prompts, endpoint)
    judging = {
        "items": len(records),
        "cached": sum(r["cached"] for r in records),
        "sent": sent,
        "failed": results["all"]["failed"],
        "parse_errors": results["all"]["parse_errors"],
        # the judge's failure rate on this benchmark, after the re-asks of unreadable replies
        "failure_rate": (results["all"]["failed"] + results["all"]["parse_errors"]) / max(len(records), 1),
        **reasks,
    }
    report = {
        "benchmark": benchmark,
        "task": "qa",
        "model": str(model_dir) if model_dir is not None else None,
        "predictions": str(predictions) if predictions is not None else None,
        "data": str(data) if data is not None else None,
        "judge": summary,
        "generation": decoding_summary(decoding, gen_stats),
        "scores": "float" if float_scores else "integer part",
        "judging": judging,
        "results": results,
        "table": results_table(results),
        "created": utc_now(),
    }
    if captioned is not None:  # LLaVA-Hound reports accuracy (score >= 3, %) / mean score (1-5)
        a = results["all"]
        report["scores"] = "1-5; correct when >= 3"
        report["acc/score"] = None if a["accuracy"] is None else f"{100 * a['accuracy']:.2f}/{a['score']:.2f}"
    write_outputs(out_dir, [p.record() for p in preds], records, report, _markdown(report))
    return report


def _markdown(report: dict) -> str:
    source = f"model `{report['model']}`" if report["model"] else f"predictions `{report['predictions']}`"
    data = f", data `{report['data']}`" if report["data"] else ""
    lines = [f"# {report['benchmark']}: zero-shot QA", "", f"Answers: {source}{data}."]
    lines += describe_decoding(report["generation"])
    lines += [describe_judge(report["judge"]), f"Scores: {report['scores']}; accuracy = yes / (yes + no).", ""]
    lines += [report["table"], ""]
    if "acc/score" in report:
        lines += [f"acc/score (as LLaVA-Hound reports it): {report['acc/score']}", ""]
    j = report["judging"]
    lines.append(f"Judgments: {j['items']} items, {j['cached']} from the cache, {j['sent']} prompts sent to the judge.")
    if j["failed"] or j["parse_errors"]:
        lines.append(f"{j['failed']} judgments failed and {j['parse_errors']} replies could not be parsed: they are "
                     "excluded from accuracy and score (see judgments.jsonl)."
                     + (" Re-run the command to retry the failed ones." if j["failed"] else ""))
    return "\n".join(lines) + "\n"
