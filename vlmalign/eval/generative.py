"""The video generative benchmark: five criteria, each scored 0..5 by a judge (Video-ChatGPT's protocol).

Three question sets, each a `read_generative` file:
- general `{"video_name", "Q", "A"}`: correctness of information, detail orientation, contextual
  understanding (one judge prompt per criterion: `eval.correctness`, `eval.detail`, `eval.context`);
- temporal (same layout): temporal understanding (`eval.temporal`);
- consistency `{"video_name", "Q1", "Q2", "A"}`: the model answers Q1 and Q2 separately, and the judge
  reads both answers (`eval.consistency`). Q2 is the file's own second question (one public script
  asked Q1 twice).
A criterion whose set is not given is reported as not evaluated. The synthetic benchmark's folder
gives all three (`generative_test.json` for general and temporal, its describe questions asking for
events in order, and `consistency_test.json`).

Each criterion's score is the mean over its judged items; failed and unparseable judgments are counted
and left out, as in the QA evaluation, and replies are cached the same way. `average` is the mean of the
evaluated criteria. With `predictions`, the set files hold the model's answers (`pred`, or `pred1` and
`pred2` for consistency, the Video-ChatGPT prediction layout) and nothing is generated; a file whose
records carry a `set` field (the predictions.jsonl written here) holds several sets at once.

On the synthetic benchmark the `oracle` judge scores the criteria from the ground truth instead of a
prompt (`vlmalign.feedback.oracle`), on a continuous 0-5 scale. A description makes claims (each
object it names, each direction and disappearance it gives an object, the order in which it names two
objects that appear at different frames); the video has facts (each object, its direction, its
disappearance if it leaves early, the order of appearance of each pair):
- correctness: 5 x the share of the answer's claims that are true (no claim: 0);
- detail: 5 x the share of the video's facts the answer states;
- context: 5 x |objects named and present| / |objects named or present| (the scene, nothing invented);
- temporal: 5 x the share of the motion and order facts (directions, disappearances, order) stated;
- consistency: 5 x the true claims both answers make / all claims either makes.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path

from vlmalign.config import JudgeConfig
from vlmalign.data.formats import VIDEO_EXTS, iter_json_records, read_generative, resolve_video
from vlmalign.errors import DataError, JudgeError, VlmalignError
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
from vlmalign.eval.replies import parse_criterion_score
from vlmalign.feedback.cache import utc_now
from vlmalign.prompts import load_prompt

__all__ = ["CRITERIA", "GenItem", "prediction_sets", "read_generative_predictions", "synthetic_sets", "evaluate_generative"]

# criterion -> the question set it is judged on
CRITERIA = {"correctness": "general", "detail": "general", "context": "general", "temporal": "temporal",
            "consistency": "consistency"}
SETS = ("general", "temporal", "consistency")


@dataclass
class GenItem:
    set: str
    key: str
    video: str
    video_name: str
    question: str
    answer: str
    question2: str | None = None  # consistency only
    pred: str | None = None
    pred2: str | None = None  # consistency only: the answer to question2

    def record(self) -> dict:
        """The Video-ChatGPT prediction record, tagged with its set."""
        if self.set == "consistency":
            return {"set": self.set, "id": self.key, "video_name": self.video_name, "Q1": self.question,
                    "Q2": self.question2, "A": self.answer, "pred1": self.pred, "pred2": self.pred2}
        return {"set": self.set, "id": self.key, "video_name": self.video_name, "Q": self.question, "A": self.answer,
                "pred": self.pred}


def prediction_sets(path) -> dict[str, Path]:
    """{set: path} for a prediction file: the sets its records are tagged with (`set`, as in the
    predictions.jsonl this module writes), else the general set alone."""
    names = {data.get("set") for _, data in iter_json_records(path)} - {None}
    if names - set(SETS):
        raise DataError(f"{path}: unknown question set(s) {', '.join(map(repr, sorted(names - set(SETS), key=str)))} "
                        f"in field 'set' (known: {', '.join(SETS)})")
    return {name: Path(path) for name in SETS if name in names} or {"general": Path(path)}


def read_generative_predictions(path, set_name: str, video_root=None) -> list[GenItem]:
    """Read the predictions of one set (records tagged with another `set` are skipped); errors name
    the file, line and field."""
    consistency = set_name == "consistency"
    items, ids = [], []
    for f, data in read_records(path):
        if data.get("set", set_name) != set_name:
            continue
        name = f.text("video_name", alternatives=("id", "video"))
        item = GenItem(set_name, "", resolve_video(name, path, video_root, VIDEO_EXTS), name,
                       f.text("Q1" if consistency else "Q"), f.text("A"))
        if consistency:
            item.question2 = f.text("Q2")
            item.pred, item.pred2 = f.text("pred1", allow_empty=True), f.text("pred2", allow_empty=True)
        else:
            item.pred = f.text("pred", allow_empty=True)
        items.append(item)
        ids.append(f.text("question_id", alternatives=("id", "video_name", "video")))
    for item, key in zip(items, unique_keys(ids)):
        item.key = key
    return items


def _read_questions(path, set_name: str, video_root) -> list[GenItem]:
    items = read_generative(path, video_root=video_root)
    if set_name == "consistency":
        bad = next((it for it in items if it.question2 is None), None)
        if bad is not None:
            raise VlmalignError(f"{bad.source}: the consistency set needs 'Q1' and 'Q2' in every record")
    else:
        bad = next((it for it in items if it.question2 is not None), None)
        if bad is not None:
            raise VlmalignError(f"{bad.source}: the {set_name} set takes 'Q' and 'A'; "
                                "'Q1'/'Q2' records belong to --consistency")
    return [GenItem(set_name, key, it.video, Path(it.video).name, it.question, it.answer, it.question2)
            for key, it in zip(unique_keys([it.id for it in items]), items)]


def synthetic_sets(bench_dir) -> dict[str, Path]:
    """The three sets of a synthetic benchmark folder."""
    bench = Path(bench_dir)
    return {"general": bench / "generative_test.json", "temporal": bench / "generative_test.json",
            "consistency": bench / "consistency_test.json"}


def _generate(items: list[GenItem], model_dir, decoding, out_dir, feature_cache, progress):
    """Answer every question once: a question asked in two sets (the synthetic general and temporal
    sets are one file) shares its answer."""
    requests, key_of = [], {}

    def ask(video, question, key) -> str:
        ident = (str(video), question)
        if ident not in key_of:
            key_of[ident] = key
            requests.append(Request(key, video, question))
        return key_of[ident]

    slots = [(it, ask(it.video, it.question, f"{it.set}:{it.key}"),
              ask(it.video, it.question2, f"{it.set}:{it.key}:2") if it.set == "consistency" else None) for it in items]
    answers, stats = generate(model_dir, requests, decoding, out_dir, feature_cache, progress)
    for it, first, second in slots:
        it.pred = answers[first]
        if second is not None:
            it.pred2 = answers[second]
    return stats


def _render(prompt, it: GenItem) -> str:
    if it.set == "consistency":
        return prompt.render(question1=strip_placeholder(it.question), question2=strip_placeholder(it.question2),
                             answer=it.answer, pred1=it.pred, pred2=it.pred2)
    return prompt.render(question=strip_placeholder(it.question), answer=it.answer, pred=it.pred)


def _judge(items_by_set: dict[str, list[GenItem]], cfg: JudgeConfig, cache_path, float_scores, progress):
    """(records, judge, prompt ids): one judgment per (item, criterion) of the sets given."""
    from vlmalign.feedback.judges import build_judge

    judge = build_judge(cfg, cache_path, progress=progress)
    records, prompt_ids = [], []
    try:
        for criterion, set_name in CRITERIA.items():
            items = items_by_set.get(set_name)
            if not items:
                continue
            prompt = load_prompt(f"eval.{criterion}", cfg.prompts)
            prompt_ids.append(prompt.id)
            # Text-only judging: the video is not part of what the judge reads, nor of the cache key.
            results = judge.complete([(None, _render(prompt, it)) for it in items], prompt_id=prompt.id,
                                     parse=lambda raw: parse_criterion_score(raw, float_scores))
            for it, j in zip(items, results):
                status, score = j.status, None
                if status == "ok":
                    score = parse_criterion_score(j.value, float_scores)
                    status = "ok" if score is not None else "parse_error"
                records.append({"criterion": criterion, "set": set_name, "id": it.key, "status": status,
                                "score": score, "raw": j.raw, "judge": j.judge, "prompt": j.prompt, "model": j.model,
                                "date": j.created, "cached": j.cached, "error": j.error})
    finally:
        judge.cache.close()
    return records, judge, prompt_ids


def _oracle_judgments(items_by_set: dict[str, list[GenItem]], bench) -> list[dict]:
    """One record per (item, criterion), scored from the benchmark's ground truth (module doc)."""
    from vlmalign.feedback.oracle import Oracle, consistency_score, description_claims, describe_facts, generative_scores

    oracle, now, records = Oracle.from_dir(bench), utc_now(), []

    def record(criterion, it, score, reason):
        records.append({"criterion": criterion, "set": it.set, "id": it.key, "status": "ok", "score": score,
                        "raw": reason, "judge": "oracle", "prompt": "oracle.generative", "model": "oracle",
                        "date": now, "cached": False, "error": None})

    def reason(meta, answer) -> str:
        claims, facts = description_claims(meta, answer), describe_facts(meta, answer)
        return (f"{sum(claims.values())}/{len(claims)} claims true, {facts['stated']}/{facts['total']} facts stated"
                + ("; missing: " + ", ".join(facts["missing"]) if facts["missing"] else ""))

    for criterion, set_name in CRITERIA.items():
        for it in items_by_set.get(set_name, []):
            try:
                meta = oracle.metadata(it.video)
            except VlmalignError as e:
                raise VlmalignError(f"{set_name} set, item {it.key!r}: {e}") from None
            if criterion == "consistency":
                record(criterion, it, consistency_score(meta, it.pred, it.pred2),
                       f"answer 1: {reason(meta, it.pred)} | answer 2: {reason(meta, it.pred2)}")
            else:
                record(criterion, it, generative_scores(meta, it.pred)[criterion], reason(meta, it.pred))
    return records


def _results(records: list[dict]) -> dict:
    results = {}
    for criterion in CRITERIA:
        rows = [r for r in records if r["criterion"] == criterion]
        if not rows:
            continue
        judged = [r["score"] for r in rows if r["status"] == "ok"]
        results[criterion] = {
            "n": len(rows), "judged": len(judged),
            "failed": sum(r["status"] == "failed" for r in rows),
            "parse_errors": sum(r["status"] == "parse_error" for r in rows),
            "score": sum(judged) / len(judged) if judged else None,
        }
    scores = [r["score"] for r in results.values() if r["score"] is not None]
    results["average"] = {"n": len(scores), "score": sum(scores) / len(scores) if scores else None}
    return results


def _table(results: dict) -> str:
    lines = ["| criterion | n | judged | score (0-5) | failed | unparseable |", "|---|---|---|---|---|---|"]
    for name in CRITERIA:
        r = results.get(name)
        if r is None:
            lines.append(f"| {name} | - | - | not evaluated | - | - |")
        else:
            lines.append(f"| {name} | {r['n']} | {r['judged']} | {fmt(r['score'])} | {r['failed']} | {r['parse_errors']} |")
    avg = results["average"]
    lines.append(f"| average | {avg['n']} criteria | | {fmt(avg['score'])} | | |")
    return "\n".join(lines)


def evaluate_generative(
    out_dir, judge_cfg: JudgeConfig, sets: dict[str, str | Path], *, judge_file: str | None = None,
    predictions: bool = False, videos=None, model_dir=None, decoding: Decoding | None = None, limit: int | None = None,
    feature_cache: str | None = None, float_scores: bool = False, progress: bool = True, benchmark: str = "generative",
) -> dict:
    """Evaluate the sets given (`{"general" | "temporal" | "consistency": file}`); `predictions`: the
    files hold the model's answers. Writes the outputs and returns the report."""
    check_limit(limit)
    out_dir = Path(out_dir)
    unknown = sorted(set(sets) - set(SETS))
    if unknown or not sets:
        raise VlmalignError(f"eval {benchmark}: question sets are {', '.join(SETS)}; got {', '.join(unknown) or 'none'}")
    if judge_cfg.backend == "oracle" and not judge_cfg.bench:
        raise JudgeError("the oracle judge needs judge.bench, the synthetic benchmark folder (--set judge.bench=DIR)")
    if predictions == (model_dir is not None):
        raise VlmalignError(f"eval {benchmark}: give either a model with question files, or prediction files")
    read = read_generative_predictions if predictions else _read_questions
    items_by_set = {name: read(path, name, videos)[:limit] for name, path in sets.items()}
    items = [it for name in SETS for it in items_by_set.get(name, [])]
    if not items:
        raise VlmalignError(f"eval {benchmark}: the question files hold no questions")
    gen_stats = None
    if not predictions:
        decoding = decoding or Decoding(max_new_tokens=512)
        gen_stats = _generate(items, model_dir, decoding, out_dir, feature_cache, progress)
    else:
        decoding = None
    if judge_cfg.backend == "hf" and judge_cfg.model == "policy":
        if model_dir is None:
            raise JudgeError("judge.model 'policy' judges with the evaluated model, but prediction files have none")
        judge_cfg = replace(judge_cfg, model=str(model_dir))
    if judge_cfg.backend == "oracle":
        records, judge_id, prompt_ids, sent, endpoint = _oracle_judgments(items_by_set, judge_cfg.bench), "oracle", \
            ["oracle.generative"], 0, None
        reasks = {"reasked": 0, "reask_fixed": 0}
    else:
        records, judge, prompt_ids = _judge(items_by_set, judge_cfg, out_dir / "judge_cache.sqlite", float_scores, progress)
        judge_id, sent, endpoint = judge.id, judge.stats()["calls"], getattr(judge, "endpoint", None)
        reasks = {k: judge.stats()[k] for k in ("reasked", "reask_fixed")}
    results = _results(records)
    summary = judge_summary(judge_cfg, judge_id, judge_file, records, prompt_ids, endpoint)
    judging = {"judgments": len(records), "cached": sum(r["cached"] for r in records), "sent": sent,
               "failed": sum(r["status"] == "failed" for r in records),
               "parse_errors": sum(r["status"] == "parse_error" for r in records), **reasks}
    # the judge's failure rate on this benchmark, after the re-asks of unreadable replies
    judging["failure_rate"] = (judging["failed"] + judging["parse_errors"]) / max(len(records), 1)
    report = {
        "benchmark": benchmark,
        "task": "generative",
        "model": str(model_dir) if model_dir is not None else None,
        "predictions": predictions,
        "data": {name: str(path) for name, path in sets.items()},
        "judge": summary,
        "generation": decoding_summary(decoding, gen_stats),
        "scores": "continuous (oracle)" if judge_cfg.backend == "oracle" else "float" if float_scores else "integer part",
        "judging": judging,
        "results": results,
        "table": _table(results),
        "created": utc_now(),
    }
    source = f"model `{model_dir}`" if model_dir is not None else "prediction files"
    md = [f"# {benchmark}: generative benchmark", "",
          f"Answers: {source}; sets: " + ", ".join(f"{k} `{v}`" for k, v in report["data"].items()) + ".",
          *describe_decoding(report["generation"]), describe_judge(summary), f"Scores: {report['scores']}.", "",
          report["table"], "",
          f"Judgments: {judging['judgments']}, {judging['cached']} from the cache, "
          f"{judging['sent']} prompts sent to the judge."]
    if judging["failed"] or judging["parse_errors"]:
        md.append(f"{judging['failed']} judgments failed and {judging['parse_errors']} replies could not be parsed: "
                  "they are excluded from the scores (see judgments.jsonl)."
                  + (" Re-run the command to retry the failed ones." if judging["failed"] else ""))
    write_outputs(out_dir, [it.record() for it in items], records, report, "\n".join(md) + "\n")
    return report
