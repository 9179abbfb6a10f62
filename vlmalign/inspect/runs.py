"""Find and read what the stages wrote, as the items the inspect site shows.

A run folder given to `vlmalign inspect` may be one stage's run or any folder above several (a gym
or demo output); it is walked for:

- preference runs: a folder with `samples.jsonl` (make-prefs, an ISR-DPO iteration, a judges-stage
  run), read with its `judgments.jsonl`, `preferences.jsonl`, `contexts.json` and `stats.json`;
- GRPO rollouts: `rollouts.jsonl` (grpo-rank);
- evaluations: a folder with `predictions.jsonl` and `judgments.jsonl` (eval, gym-eval);
- training curves: every `metrics.jsonl`; summaries: `stats.json`, `report.json`, `summary.json`.

Runs written before make-prefs kept `judgments.jsonl` still show: their kept pairs come from
preferences.jsonl (verdicts and raw replies included), their dropped questions with their answers
only. On the synthetic benchmark each answer also gets the oracle's score, from the benchmark that
the run's config names or that holds its videos.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from vlmalign.data.formats import VIDEO_TOKEN, read_json
from vlmalign.errors import DataError, VlmalignError
from vlmalign.feedback.preferences import load_contexts, video_key
from vlmalign.inspect.jsonfiles import read_json_object, read_jsonl

# folders that hold weights, caches or media, never artifacts to show
_SKIP = {"checkpoints", "final", "feature_cache", "tensorboard", "videos", "llm", "tokenizer", "vision", "frames",
         ".git", "__pycache__"}
_METHODS = {"compare": "pairwise", "score": "score_threshold", "rank": "ranked"}


@dataclass
class Found:
    """The artifacts under the run folders, each with a label (its path below their common folder)."""

    root: Path
    prefs: list[Path] = field(default_factory=list)  # folders with samples.jsonl
    rollouts: list[Path] = field(default_factory=list)  # rollouts.jsonl files
    evals: list[Path] = field(default_factory=list)  # folders with predictions.jsonl
    metrics: list[Path] = field(default_factory=list)  # metrics.jsonl files
    summaries: list[Path] = field(default_factory=list)  # stats.json, report.json, summary.json

    def label(self, path: Path) -> str:
        rel = os.path.relpath(path, self.root)
        return self.root.name if rel == "." else rel


def find_runs(run_dirs) -> Found:
    dirs = [Path(d).resolve() for d in run_dirs]
    for d in dirs:
        if not d.is_dir():
            raise VlmalignError(f"{d}: no such folder")
    root = Path(os.path.commonpath(dirs)) if len(dirs) > 1 else dirs[0]
    found = Found(root.parent if len(dirs) > 1 and root in dirs else root)
    for d in dirs:
        before = len(found.prefs) + len(found.rollouts) + len(found.evals) + len(found.metrics)
        for folder, subdirs, files in os.walk(d):
            subdirs[:] = sorted(s for s in subdirs if s not in _SKIP and not s.startswith("."))
            here = Path(folder)
            if "samples.jsonl" in files:
                found.prefs.append(here)
            if "rollouts.jsonl" in files:
                found.rollouts.append(here / "rollouts.jsonl")
            if "predictions.jsonl" in files:
                found.evals.append(here)
            if "metrics.jsonl" in files:
                found.metrics.append(here / "metrics.jsonl")
            found.summaries += [here / name for name in ("stats.json", "report.json", "summary.json") if name in files]
        if len(found.prefs) + len(found.rollouts) + len(found.evals) + len(found.metrics) == before:
            raise VlmalignError(f"{d}: nothing to inspect (no samples.jsonl, rollouts.jsonl, predictions.jsonl or "
                                "metrics.jsonl in it or below it)")
    return found


# --- reading ---------------------------------------------------------------------------------------
def _config(run: Path) -> dict:
    """The run's config.yaml, or {} when it is missing or not a readable mapping: the config only
    adds to what is shown (the oracle's benchmark, the pairing thresholds)."""
    path = run / "config.yaml"
    if not path.is_file():
        return {}
    try:
        cfg = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError:
        return {}
    return cfg if isinstance(cfg, dict) else {}


def _need(row: dict, key: str, path: Path):
    if key not in row:
        raise DataError(f"{path}: a record has no field {key!r}")
    return row[key]


def _is_ranking(ranks) -> bool:
    """Whether `ranks` ranks n answers, 0 = best: each rank the number of answers ranked above it (a
    permutation of 0 .. n - 1, or with ties, as the oracle ranks)."""
    return (isinstance(ranks, list) and all(type(r) is int for r in ranks)
            and all(r == sum(other < r for other in ranks) for r in ranks))


def _finite(x):
    return x if isinstance(x, (int, float)) and math.isfinite(x) else None


# --- the oracle ------------------------------------------------------------------------------------
class OracleScores:
    """The synthetic benchmark's oracle score of an answer, or None off the benchmark. The benchmark
    is the one a run's config names (preferences.oracle, judge.bench), else the folder holding its
    videos (bench/videos/vid.mp4 -> bench/); benchmarks are read once."""

    def __init__(self):
        self._oracles: dict[Path, object] = {}

    def for_run(self, cfg: dict, video) -> object | None:
        """The oracle of a run with config `cfg` (a dict) and a video of it."""
        named = [(cfg.get("preferences") or {}).get("oracle"), (cfg.get("judge") or {}).get("bench")]
        candidates = [Path(p) for p in named if p]
        if isinstance(video, str):
            candidates.append(Path(video).parent.parent)
        for bench in candidates:
            if bench in self._oracles or (bench / "metadata.jsonl").is_file():
                if bench not in self._oracles:
                    from vlmalign.feedback.oracle import Oracle

                    self._oracles[bench] = Oracle.from_dir(bench)
                return self._oracles[bench]
        return None

    @staticmethod
    def score(oracle, video, question: str, answer: str) -> int | None:
        if oracle is None or video is None or not question:
            return None
        try:
            return oracle.score(video, question, answer)
        except VlmalignError:  # a question or video outside the benchmark
            return None


# --- preference items ------------------------------------------------------------------------------
def _judge_order(method: str, values: list, i: int, j: int):
    """+1 when the judge puts answer i above j, -1 below, 0 level, None unknown (no verdict)."""
    if method == "pairwise":
        if values[0] is None:
            return None
        return 1 if values[0] == i else -1
    if any(values[k] is None for k in (i, j)):
        return None
    a, b = values[i], values[j]
    if method == "ranked":
        a, b = -a, -b  # rank 0 is best
    return (a > b) - (a < b)


def _display(method: str, values: list, i: int) -> str:
    if method == "pairwise":
        return "" if values[0] is None else ("preferred" if values[0] == i else "")
    if values[i] is None:
        return ""
    return f"rank {values[i]}" if method == "ranked" else f"score {values[i]:g}"


def _text(raw) -> list[str]:
    """A judgment's raw reply as lines to show: swap-checked pairs keep both orders' replies."""
    if raw is None:
        return []
    if isinstance(raw, (list, tuple)):
        return [f"{order}: {r}" for order, r in zip(("(A, B)", "(B, A)"), raw)]
    return [str(raw)]


def _chosen_rejected(rec: dict, method: str, values: list) -> tuple[int | None, int | None]:
    answers = rec.get("answers") or []
    if method == "pairwise" and rec.get("choice") in (0, 1):
        return rec["choice"], 1 - rec["choice"]
    if method == "ranked" and rec.get("ranks"):
        ranks = rec["ranks"]
        return ranks.index(0), ranks.index(len(ranks) - 1)

    def find(text, score):
        for k, a in enumerate(answers):
            if a == text and (score is None or k >= len(values) or values[k] == score):
                return k
        return None

    return find(rec.get("chosen"), rec.get("chosen_score")), find(rec.get("rejected"), rec.get("rejected_score"))


def _item(run_label: str, qid: str, question: str, video, context: str, reference: str, method: str,
          answers: list[dict], judgments: list[dict] | None, record: dict | None, oracle, extra: dict,
          thresholds: tuple = (3, 2)) -> dict:
    """One question of a preference run or rollout, as the site shows it (see site.py);
    `thresholds`: the run's (chosen_min, rejected_max) of 1-5 scores."""
    g = len(answers)
    if judgments is not None:
        statuses = [j.get("status", "ok") for j in judgments]
        if method == "pairwise":
            values = [judgments[0].get("value") if statuses[0] == "ok" else None]
        elif method == "ranked":
            ranks = judgments[0].get("value") if statuses[0] == "ok" else None
            values = list(ranks) if _is_ranking(ranks) and len(ranks) == g else [None] * g
        else:
            values = [j.get("value") if s == "ok" else None for j, s in zip(judgments, statuses)]
        replies = [line for j in judgments for line in _text(j.get("raw"))]
    else:  # an older run: only the kept pair's verdicts are known
        statuses = ["ok"] if record else []
        values = ([record.get("choice")] if method == "pairwise" else record.get("ranks") if method == "ranked"
                  else record.get("scores")) if record else None
        values = values or ([None] if method == "pairwise" else [None] * g)
        replies = [line for r in (record or {}).get("judge_replies", []) for line in _text(r)]
    chosen, rejected = _chosen_rejected(record, method, values) if record else (None, None)
    texts = [a.get("text", "") for a in answers]
    oracle_scores = [OracleScores.score(oracle, video, question, t) for t in texts]
    pairs = [(i, j) for i in range(g) for j in range(i + 1, g)]
    order = {(i, j): _judge_order(method, values, i, j) for i, j in pairs}

    flags = []
    if any(o is not None for o in oracle_scores):
        for (i, j), o in order.items():
            if o and oracle_scores[i] is not None and oracle_scores[j] is not None:
                truth = (oracle_scores[i] > oracle_scores[j]) - (oracle_scores[i] < oracle_scores[j])
                if truth and truth != o:
                    flags.append("disagree")  # the judge puts above an answer the oracle scores lower
                    break
    if "parse_error" in statuses:
        flags.append("parse_error")
    if "failed" in statuses:
        flags.append("failed")
    if "inconsistent" in statuses:
        flags.append("position")  # swap check: the two orders named the same position, not the same answer
    if any(o is not None for o in oracle_scores):
        # the judge scored level two answers the oracle tells apart (make-prefs' pairs_tied)
        tie = any(order[(i, j)] == 0 and None not in (oracle_scores[i], oracle_scores[j])
                  and oracle_scores[i] != oracle_scores[j] for i, j in pairs)
    else:  # no truth to compare with: the judge gave every answer one score, though they differ
        tie = (method == "score_threshold" and None not in values and len(set(values)) == 1
               and len({t.strip() for t in texts}) > 1)
    if tie:
        flags.append("tie")

    bad = next((s for s in statuses if s != "ok"), None)
    if record:
        status = "pair kept"
    elif bad:
        status = f"dropped ({bad})"
    elif judgments is not None and method == "score_threshold" and None not in values and not (
            any(v >= thresholds[0] for v in values) and any(v <= thresholds[1] for v in values)):
        status = "dropped (no pair)"  # no answer scored chosen_min or more, or none rejected_max or less
    elif judgments is not None:
        status = "dropped (identical or empty answer)"
    else:
        status = "dropped"
    item = {
        "run": run_label, "id": qid, "question": question, "video": video, "context": context,
        "reference": reference, "method": method, "status": status, "flags": flags, "replies": replies,
        "chosen": chosen, "rejected": rejected,
        "answers": [{"text": t, "logp": _finite(a.get("logp")), "tokens": a.get("num_tokens"), "words": len(t.split()),
                     "judge": _display(method, values, k), "oracle": oracle_scores[k], **a.get("extra", {})}
                    for k, (t, a) in enumerate(zip(texts, answers))],
        **extra,
    }
    item["pair"] = _annotation_pair(texts, chosen, rejected, order)
    return item


def _annotation_pair(texts: list[str], chosen, rejected, order: dict) -> dict | None:
    """The pair a person judges blind: the two answers of a 2-sample run, else the chosen and
    rejected answer, unless both say the same; `judge`: 0 or 1 (which of the two the judge
    preferred), "tie", or None (no usable verdict: failed, unreadable, inconsistent under the
    swap check)."""
    g = len(texts)
    if g == 2:
        i, j = 0, 1
    elif chosen is not None and rejected is not None:
        i, j = chosen, rejected
    else:
        return None
    if texts[i].strip() == texts[j].strip():
        return None  # nothing to choose between
    o = order.get((i, j)) if i < j else (None if order.get((j, i)) is None else -order[(j, i)])
    return {"answers": [i, j], "judge": None if o is None else "tie" if o == 0 else (0 if o > 0 else 1)}


def _context_mode(stats: dict, cfg: dict, judgments_rows: list[dict]) -> str:
    mode = stats.get("context") or (cfg.get("context") or {}).get("kind") or "unknown"
    swapped = any(isinstance(j.get("raw"), list) for r in judgments_rows[:20] for j in r.get("judgments", []))
    return f"{mode} + swap check" if swapped else mode


def _questions_of(cfg: dict) -> dict:
    """{id: Question} of a make-prefs run's question files (its config's data.train), for runs
    written before judgments.jsonl recorded each question; {} when they cannot be read."""
    from vlmalign.feedback.preferences import absolute_video, read_questions

    data = cfg.get("data") or {}
    try:
        questions = read_questions(list(data.get("train") or []), data.get("video_root"),
                                   (cfg.get("preferences") or {}).get("limit"))
    except (VlmalignError, OSError):
        return {}
    for q in questions:
        q.video = absolute_video(q.video)
    return {q.id: q for q in questions}


def preference_items(run: Path, label: str, oracles: OracleScores) -> tuple[list[dict], dict]:
    """(items, about) of a preference run; `about` holds its judge, method, context mode and stats."""
    samples_path = run / "samples.jsonl"
    samples = read_jsonl(samples_path)
    judged_path = run / "judgments.jsonl"
    judged_rows = read_jsonl(judged_path) if judged_path.is_file() else []
    judged = {_need(r, "id", judged_path): r for r in judged_rows}
    prefs_path = run / "preferences.jsonl"
    kept = {_need(r, "id", prefs_path): r for r in read_jsonl(prefs_path)} if prefs_path.is_file() else {}
    for qid, rec in kept.items():
        if "ranks" in rec and not _is_ranking(rec["ranks"]):
            raise DataError(f"{prefs_path}: record {qid!r}: field 'ranks' is {rec['ranks']!r}; expected one rank "
                            "per answer, 0 = best, each the number of answers ranked above it")
    contexts = (load_contexts(run / "contexts.json") or {}) if (run / "contexts.json").is_file() else {}
    stats = read_json_object(run / "stats.json") if (run / "stats.json").is_file() else {}
    cfg = _config(run)
    kinds = {j.get("kind") for r in judged_rows[:1] for j in r.get("judgments", [])}
    method = (_METHODS.get(next(iter(kinds))) if kinds else None) or next(
        (r.get("method") for r in kept.values()), None) or (cfg.get("preferences") or {}).get("method", "score_threshold")
    mode = _context_mode(stats, cfg, judged_rows)
    asked = {} if judged else _questions_of(cfg)
    pairing = cfg.get("preferences") or {}
    thresholds = (pairing.get("chosen_min", 3), pairing.get("rejected_max", 2))
    items = []
    for row in samples:
        qid = _need(row, "id", samples_path)
        answers = _need(row, "answers", samples_path)
        j, rec = judged.get(qid), kept.get(qid)
        if j is not None:
            question, video = j.get("question", ""), j.get("video")
            context, reference = j.get("context", ""), j.get("reference", "")
        elif rec is not None:
            question = rec.get("prompt", "").replace(VIDEO_TOKEN, "").strip()
            video, context, reference = rec.get("video"), rec.get("context", ""), rec.get("reference", "")
        elif qid in asked:
            q = asked[qid]
            question, video, reference, context = q.question, q.video, q.reference, ""
        else:
            question, video, reference, context = "", None, "", ""
        if not context and video is not None and contexts:
            context = contexts.get(video_key(video), "")
        oracle = oracles.for_run(cfg, video if isinstance(video, str) else None)
        items.append(_item(label, qid, question, video, context, reference, method, answers,
                           j.get("judgments") if j is not None else None, rec, oracle, {"mode": mode}, thresholds))
    about = {"run": label, "kind": "preferences", "method": method, "mode": mode, "judge": stats.get("judge"),
             "questions": len(items), "pairs": stats.get("pairs"), "first_answer_chosen": stats.get("first_answer_chosen"),
             "oracle_agreement": stats.get("oracle_agreement"), "has_judgments": judged_path.is_file()}
    return items, about


def rollout_items(path: Path, label: str, oracles: OracleScores) -> tuple[list[dict], dict]:
    """GRPO rollouts (grpo-rank's rollouts.jsonl): one item per group, with each answer's
    advantage and the policy's own rank (the order of its log-probs)."""
    run = path.parent
    rows = read_jsonl(path)
    cfg = _config(run)
    contexts = (load_contexts(run / "contexts.json") or {}) if (run / "contexts.json").is_file() else {}
    items = []
    for row in rows:
        judgments = _need(row, "judgments", path)
        kind = judgments[0].get("kind") if judgments else "rank"
        method = _METHODS.get(kind, "ranked")
        video = row.get("video")
        answers = [{**a, "extra": {"advantage": _finite(adv), "policy_rank": pr}}
                   for a, adv, pr in zip(_need(row, "answers", path), row.get("advantages", []),
                                         row.get("policy_ranks") or [None] * len(row["answers"]))]
        context = contexts.get(video_key(video), "") if video is not None else ""
        oracle = oracles.for_run(cfg, video if isinstance(video, str) else None)
        items.append(_item(label, _need(row, "id", path), row.get("question", ""), video, context, "", method, answers,
                           judgments, None, oracle, {"step": row.get("step"), "mode": row.get("mode", "")}))
    for item in items:
        item["status"] = f"rollout {item['step']}"
        item["pair"] = None  # no chosen / rejected pair: a group trains on advantages
    about = {"run": label, "kind": "rollouts", "method": items[0]["method"] if items else "ranked",
             "mode": (cfg.get("context") or {}).get("kind", ""), "judge": (cfg.get("judge") or {}).get("backend"),
             "questions": len(items)}
    return items, about


# --- evaluations -----------------------------------------------------------------------------------
def compare_groups(found: Found) -> list[dict]:
    """Eval outputs grouped by what was evaluated (the eval folder's name and the report's data
    file); one row per question with each model's answer and verdict."""
    groups: dict[tuple, dict] = {}
    for folder in found.evals:
        report = read_json_object(folder / "report.json") if (folder / "report.json").is_file() else {}
        key = (folder.name, str(report.get("data") or ""))
        # the model is the run the eval folder belongs to: its parent (the folder's own name when
        # an eval folder was given by itself)
        model = found.label(folder.parent) if folder != found.root else folder.parent.name
        preds_path = folder / "predictions.jsonl"
        verdicts_path = folder / "judgments.jsonl"
        verdicts = {r.get("id"): r for r in read_jsonl(verdicts_path)} if verdicts_path.is_file() else {}
        group = groups.setdefault(key, {"name": folder.name, "data": key[1], "models": [], "rows": {}})
        m = len(group["models"])
        group["models"].append(model)
        for p in read_jsonl(preds_path):
            qid = str(p.get("id", p.get("question_id", p.get("video_name", ""))))
            row = group["rows"].setdefault(qid, {"id": qid, "question": p.get("question", p.get("Q", "")),
                                                 "answer": p.get("answer", p.get("A", "")),
                                                 "video": p.get("video_name", p.get("video")), "models": {}})
            v = verdicts.get(qid, {})
            row["models"][m] = {"pred": str(p.get("pred", "")), "verdict": v.get("verdict"), "score": _finite(v.get("score")),
                                "status": v.get("status"), "raw": v.get("raw") if isinstance(v.get("raw"), str) else
                                json.dumps(v.get("raw")) if v.get("raw") is not None else None}
    out = []
    for group in groups.values():
        n = len(group["models"])
        rows = []
        for row in group["rows"].values():
            cells = [row["models"].get(k) for k in range(n)]
            verdicts = {c["verdict"] for c in cells if c and c["status"] == "ok" and c["verdict"] is not None}
            flags = []
            if len(verdicts) > 1 or (not verdicts and len({c["pred"].strip().lower() for c in cells if c}) > 1):
                flags.append("disagree")
            if any(c and c["status"] not in (None, "ok") for c in cells):
                flags.append("failed")
            rows.append({**{k: row[k] for k in ("id", "question", "answer", "video")}, "models": cells, "flags": flags})
        out.append({"name": group["name"], "data": group["data"], "models": group["models"], "rows": rows})
    return out


# --- training and summaries ------------------------------------------------------------------------
def training_curves(found: Found) -> list[dict]:
    """Every metrics.jsonl as {run, series: {metric: [[step, value], ...]}} (numbers only)."""
    runs = []
    for path in found.metrics:
        series: dict[str, list] = {}
        for row in read_jsonl(path):
            step = row.get("step")
            if not isinstance(step, (int, float)):
                continue
            for key, value in row.items():
                if key not in ("step", "time") and _finite(value) is not None and not isinstance(value, bool):
                    series.setdefault(key, []).append([step, value])
        runs.append({"run": found.label(path.parent), "series": series})
    return runs


def _flat(value, prefix: str = "") -> list[list]:
    if isinstance(value, dict):
        return [row for k, v in value.items() for row in _flat(v, f"{prefix}.{k}" if prefix else str(k))]
    if isinstance(value, list) and value and all(isinstance(v, dict) for v in value):
        return [row for k, v in enumerate(value) for row in _flat(v, f"{prefix}[{k}]")]
    return [[prefix, value if isinstance(value, (str, int, float, bool)) or value is None else json.dumps(value)]]


def summaries(found: Found) -> list[dict]:
    """stats.json, summary.json and report.json files, flattened to (key, value) rows."""
    out = []
    for path in found.summaries:
        data = read_json(path)
        if path.name == "report.json" and isinstance(data, dict):
            # a report's results table and the judge that made it; the rest is provenance
            data = {"benchmark": data.get("benchmark"), "judge": (data.get("judge") or {}).get("id"),
                    "results": data.get("results")}
        out.append({"run": found.label(path.parent), "file": path.name, "rows": _flat(data)})
    return out
