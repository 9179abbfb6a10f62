"""Preference data from AI feedback (`vlmalign make-prefs`): sample, add context, judge, pair.

For each question the policy samples G answers (one shared video prefix per question); a context
(none, the policy's narrative, a caption proxy, or a retrospective context) is attached; a judge
compares, scores or ranks the answers; and the judgments become preference records:

- pairwise (VLM-RLAIF): G = 2; the judge's pick is chosen.
- score_threshold (LLaVA-Hound): each answer scored 1-5; chosen drawn from answers scoring
  >= chosen_min, rejected from those <= rejected_max; a question without such a pair is dropped.
- ranked (Oracle-RLAIF): the judge's full ranking is kept; chosen = best, rejected = worst (the first
  of each, when the judge ties them; a group it ranks all alike is dropped as a tie).

Every record carries its provenance (all answers with their log-probs, scores or ranks, the
context, judge id, the model that judged, prompt version, the policy that answered), in the flat
`{"id", "video", "prompt", "chosen", "rejected"}` layout that `read_preference_pairs` and the DPO
trainer read. Nothing is silently scored: a judgment that failed, did not parse or was inconsistent
under swap_check drops its question and is counted under that reason, as are pairs whose two answers
are identical or one of them empty.

Artifacts in RUN/: `samples.jsonl`, `contexts.json`, `judge_cache.sqlite`, `judgments.jsonl` (per
question, kept or dropped: the question, its video, its context and every judgment with its status
and raw reply; what `vlmalign inspect` shows), `preferences.jsonl`, `stats.json`. Re-running reuses
the samples (same question ids), the contexts (made with the same settings) and asks the judge only
what its cache lacks.
"""

from __future__ import annotations

import itertools
import json
import math
import os
import random
import statistics
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from vlmalign.config import ContextConfig, PrefsConfig, SamplingConfig, save_config
from vlmalign.data.formats import VIDEO_TOKEN, iter_json_records, read_instructions, read_json, read_qa
from vlmalign.errors import ConfigError, DataError
from vlmalign.feedback.context import caption_for, load_captions, narratives, retrospective_contexts
from vlmalign.feedback.judges import JudgeRequest, build_judge
from vlmalign.losses import kendall_tau
from vlmalign.model.generation import GenerationConfig, Sample, sample_answers


@dataclass
class Question:
    id: str
    video: str | list[str] | None
    question: str  # without the <video> placeholder
    reference: str = ""  # the data's answer (QA files) or first assistant turn: the score prompt shows it


def read_questions(paths: list[str], video_root=None, limit: int | None = None) -> list[Question]:
    """Questions from instruction data (the first user turn) or zero-shot QA files."""
    questions: list[Question] = []
    for path in paths:
        first = next(iter_json_records(path), None)
        if first is None:
            raise DataError(f"{path}: no records")
        record = first[1]
        if "question" in record:
            questions += [Question(q.id, q.video, q.question, q.answer) for q in read_qa(path, video_root)]
        else:
            for s in read_instructions(path, video_root):
                text = s.turns[0].text.replace(VIDEO_TOKEN, "").strip()
                reference = s.turns[1].text.strip() if len(s.turns) > 1 and s.turns[1].role == "assistant" else ""
                questions.append(Question(s.id, s.video, text, reference))
    return questions[:limit] if limit is not None else questions


def absolute_video(video):
    """Video paths as absolute paths: a preference file is read relative to its own folder."""
    if video is None:
        return None
    return str(Path(video).resolve()) if isinstance(video, str) else [str(Path(v).resolve()) for v in video]


def video_key(video) -> str:
    return video if isinstance(video, str) else "|".join(video)


# --- sampling --------------------------------------------------------------------------------------
def sample_candidates(
    model, visual, questions: list[Question], sampling: SamplingConfig, seed: int, progress: bool = False
) -> list[list[Sample]]:
    gen = GenerationConfig(
        max_new_tokens=sampling.max_new_tokens, do_sample=True, temperature=sampling.temperature,
        top_p=sampling.top_p, num_return_sequences=sampling.num_samples, batch_size=sampling.batch_size,
    )
    generator = torch.Generator(device=model.device).manual_seed(seed)
    requests = [(q.video, q.question) for q in questions]
    return sample_answers(model, visual, requests, gen, progress=progress, generator=generator)


def save_samples(path: Path, questions: list[Question], samples: list[list[Sample]]) -> None:
    rows = [
        {"id": q.id, "answers": [{"text": s.text, "logp": s.logp, "num_tokens": len(s.token_ids), "finished": s.finished} for s in group]}
        for q, group in zip(questions, samples)
    ]
    _write_jsonl(path, rows)


def load_samples(path: Path, questions: list[Question]) -> list[list[Sample]] | None:
    """Samples saved by an earlier run over the same questions, else None."""
    if not path.is_file():
        return None
    rows = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    if [r["id"] for r in rows] != [q.id for q in questions]:
        return None  # another question set: sample again
    return [[Sample(a["text"], [], [a["logp"]], a["finished"]) for a in r["answers"]] for r in rows]


# --- context ---------------------------------------------------------------------------------------
def build_contexts(
    cfg: ContextConfig, model, visual, questions: list[Question], previous: dict | None = None,
    prompts_path=None, progress: bool = False,
) -> dict[str, str]:
    """{video key: context} for the videos of `questions` under `cfg.kind`."""
    videos = [q.video for q in questions if q.video is not None]
    if cfg.kind == "none":
        return {}
    if cfg.kind == "caption":
        if not cfg.captions:
            raise ConfigError("context.kind 'caption' needs context.captions (a caption file)")
        captions = load_captions(cfg.captions)
        return {video_key(v): caption_for(captions, v) for v in videos}
    if cfg.kind == "narrative":
        return narratives(model, visual, videos, cfg.clips, cfg.max_clip_len, cfg.max_new_tokens, prompts_path=prompts_path, progress=progress)
    return retrospective_contexts(model, visual, videos, previous, cfg.max_new_tokens, prompts_path=prompts_path, progress=progress)


def save_contexts(path: Path, settings: dict, contexts: dict) -> None:
    """RUN/contexts.json: the contexts and the settings that made them, written atomically."""
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps({"settings": settings, "contexts": contexts}, indent=1, ensure_ascii=False, default=str),
                   encoding="utf-8")
    os.replace(tmp, path)


def load_contexts(path: Path, settings: dict | None = None, videos=()) -> dict | None:
    """Contexts saved by `save_contexts`, or None when there are none to reuse: with `settings`, those
    saved must have been made with the same settings and cover every one of `videos` (a run resumed
    after its context settings changed writes them again instead of judging with stale ones)."""
    if not path.is_file():
        return None
    saved = read_json(path)
    if "settings" not in saved:  # a bare {video: context}, as runs before the settings were kept wrote it
        return saved if settings is None else None
    if settings is not None:
        same = saved.get("settings") == json.loads(json.dumps(settings, default=str))
        if not same or any(video_key(v) not in saved["contexts"] for v in videos):
            return None
    return saved["contexts"]


# --- judging ---------------------------------------------------------------------------------------
def judge_candidates(judge, method: str, questions: list[Question], samples: list[list[Sample]], contexts: dict) -> list:
    """Per question: one Judgment (pairwise, ranked) or one per answer (score_threshold)."""
    def request(q, answers):
        ctx = contexts.get(video_key(q.video), "") if q.video is not None else ""
        return JudgeRequest(q.video, q.question, tuple(answers), ctx, reference=q.reference)

    if method == "pairwise":
        return judge.compare([request(q, [s.text for s in group]) for q, group in zip(questions, samples)])
    if method == "ranked":
        return judge.rank([request(q, [s.text for s in group]) for q, group in zip(questions, samples)])
    flat = judge.score([request(q, [s.text]) for q, group in zip(questions, samples) for s in group])
    g = len(samples[0]) if samples else 0
    return [flat[i * g : (i + 1) * g] for i in range(len(questions))]


# --- pairing ---------------------------------------------------------------------------------------
def _words(text: str) -> int:
    return len(text.split())


def build_records(
    cfg: PrefsConfig, questions: list[Question], samples: list[list[Sample]], judgments: list, contexts: dict, seed: int
) -> tuple[list[dict], dict]:
    """Preference records and the counts of what was dropped and why."""
    method = cfg.preferences.method
    rng = random.Random(seed)
    records, dropped = [], {}

    def drop(reason):
        dropped[reason] = dropped.get(reason, 0) + 1

    for q, group, judged in zip(questions, samples, judgments):
        answers = [s.text for s in group]
        verdicts = judged if isinstance(judged, list) else [judged]
        bad = [j for j in verdicts if j.status != "ok"]
        if bad:
            drop(bad[0].status)
            continue
        if method == "pairwise":
            chosen, rejected = (0, 1) if verdicts[0].value == 0 else (1, 0)
            detail = {"choice": verdicts[0].value}
            scores = (None, None)
        elif method == "ranked":
            ranks = verdicts[0].value
            if min(ranks) == max(ranks):  # the judge ranked every answer alike (the oracle's ties)
                drop("tie")
                continue
            chosen, rejected = ranks.index(min(ranks)), ranks.index(max(ranks))
            detail = {"ranks": ranks}
            scores = (None, None)
        else:
            values = [j.value for j in verdicts]
            good = [i for i, v in enumerate(values) if v >= cfg.preferences.chosen_min]
            poor = [i for i, v in enumerate(values) if v <= cfg.preferences.rejected_max]
            if not good or not poor:
                drop("no_pair")
                continue
            chosen, rejected = rng.choice(good), rng.choice(poor)
            detail = {"scores": values}
            scores = (values[chosen], values[rejected])
        if answers[chosen].strip() == answers[rejected].strip():
            drop("identical_answers")
            continue
        if not answers[chosen].strip() or not answers[rejected].strip():
            drop("empty_answer")  # an answer that is only EOS: the preference readers refuse empty text
            continue
        first = verdicts[0]
        records.append({
            "id": q.id,
            "video": absolute_video(q.video),
            "prompt": f"{VIDEO_TOKEN}\n{q.question}" if q.video is not None else q.question,
            "chosen": answers[chosen],
            "rejected": answers[rejected],
            "chosen_score": scores[0],
            "rejected_score": scores[1],
            "method": method,
            "answers": answers,
            "answer_logps": [s.logp for s in group],
            **detail,
            "context": contexts.get(video_key(q.video), "") if q.video is not None else "",
            "reference": q.reference,
            # every reply the pair rests on, an explained score's explanation included
            "judge_replies": [j.raw for j in verdicts],
            "judge": first.judge,
            "judge_model": first.model,
            "prompt_version": first.prompt,
            "policy": cfg.policy,
        })
    return records, dropped


def judgment_rows(questions: list[Question], judgments: list, contexts: dict) -> list[dict]:
    """RUN/judgments.jsonl: per question its text, video, the context the judge read and every
    judgment as the judge returned it, parse failures and inconsistent swap checks included
    (preferences.jsonl keeps only the pairs that survived: this is where a dropped question's
    verdict can be read)."""
    rows = []
    for q, judged in zip(questions, judgments):
        verdicts = judged if isinstance(judged, list) else [judged]
        rows.append({
            "id": q.id, "video": absolute_video(q.video), "question": q.question, "reference": q.reference,
            "context": contexts.get(video_key(q.video), "") if q.video is not None else "",
            "judgments": [{"kind": j.kind, "status": j.status, "value": j.value, "raw": j.raw, "judge": j.judge,
                           "prompt": j.prompt, "model": j.model, "cached": j.cached, "error": j.error} for j in verdicts],
        })
    return rows


def judge_stats(judgments: list) -> dict:
    flat = [j for item in judgments for j in (item if isinstance(item, list) else [item])]
    counts: dict[str, int] = {}
    for j in flat:
        counts[j.status] = counts.get(j.status, 0) + 1
    # the judge's failure rate in this stage: failed, unreadable (after re-asks) or inconsistent
    # verdicts; a tie is a verdict (no preference), not a failure
    failure_rate = (len(flat) - counts.get("ok", 0) - counts.get("tie", 0)) / max(len(flat), 1)
    stats = {"judgments": len(flat), "by_status": counts, "failure_rate": failure_rate, "cached": sum(j.cached for j in flat)}
    verdicts = [j.value for j in flat if j.kind == "compare" and j.status == "ok"]
    if verdicts:  # position bias: an unbiased judge of randomly ordered pairs picks A about half the time
        stats["first_answer_chosen"] = verdicts.count(0) / len(verdicts)
    return stats


def length_stats(records: list[dict]) -> dict:
    if not records:
        return {"mean_chosen_words": None, "mean_rejected_words": None, "length_ratio": None}
    chosen = statistics.fmean(_words(r["chosen"]) for r in records)
    rejected = statistics.fmean(_words(r["rejected"]) for r in records)
    return {"mean_chosen_words": chosen, "mean_rejected_words": rejected, "length_ratio": chosen / max(rejected, 1e-9)}


def oracle_agreement(oracle, method: str, questions: list[Question], samples: list[list[Sample]], judgments: list) -> dict:
    """How often the judge agrees with the synthetic benchmark's oracle, over judged questions.

    pairwise: the judge picks the answer the oracle scores higher (pairs the oracle scores equal
    are left out); score_threshold: the judge's score puts an answer on the same side of the
    chosen/rejected line (>= 3) as the oracle's, and `pair_agreement`: of the pairs of one question's
    answers that the oracle scores differently, those the judge scores differently (`pairs_ordered`)
    are ordered the same way (`pairs_tied`: the judge gave both the same score); a scoring judge sees
    one answer at a time, so unlike a pairwise one it has no position to follow. ranked: mean
    Kendall tau-b of the two rankings, over questions whose answers the oracle does not tie all alike.
    """
    agree, total, taus = 0, 0, []
    pairs_agree, pairs_ordered, pairs_tied = 0, 0, 0
    for q, group, judged in zip(questions, samples, judgments):
        answers = [s.text for s in group]
        if method == "pairwise":
            if judged.status != "ok":
                continue
            a, b = (oracle.score(q.video, q.question, x) for x in answers)
            if a == b:
                continue
            total += 1
            agree += int(judged.value == (0 if a > b else 1))
        elif method == "ranked":
            if judged.status != "ok":
                continue
            truth = oracle.rank(q.video, q.question, answers)
            if len(set(truth)) == 1:  # the oracle ties every answer: no order to agree with
                continue
            tau = float(kendall_tau(torch.tensor([judged.value]), torch.tensor([truth]))[0])
            taus.append(0.0 if math.isnan(tau) else tau)  # a judge that ties every answer orders none
        else:
            truth = [oracle.score(q.video, q.question, answer) for answer in answers]
            for j, true in zip(judged, truth):
                if j.status == "ok":
                    total += 1
                    agree += int((j.value >= 3) == (true >= 3))
            for a, b in itertools.combinations(range(len(answers)), 2):
                if judged[a].status != "ok" or judged[b].status != "ok" or truth[a] == truth[b]:
                    continue
                if judged[a].value == judged[b].value:
                    pairs_tied += 1
                else:
                    pairs_ordered += 1
                    pairs_agree += int((judged[a].value > judged[b].value) == (truth[a] > truth[b]))
    if method == "ranked":
        return {"kendall_tau": statistics.fmean(taus) if taus else None, "n": len(taus)}
    if method == "score_threshold":
        return {"agreement": agree / total if total else None, "n": total,
                "pair_agreement": pairs_agree / pairs_ordered if pairs_ordered else None,
                "pairs_ordered": pairs_ordered, "pairs_tied": pairs_tied}
    return {"agreement": agree / total if total else None, "n": total}


def _write_jsonl(path: Path, rows: list[dict]) -> None:
    tmp = path.with_suffix(path.suffix + f".tmp{os.getpid()}")
    with open(tmp, "w", encoding="utf-8") as fh:
        for row in rows:
            fh.write(json.dumps(row, ensure_ascii=False) + "\n")
    os.replace(tmp, path)


def make_preferences(
    cfg: PrefsConfig, model, visual, questions: list[Question], out_dir: Path,
    contexts: dict | None = None, context_name: str | None = None, progress: bool = False,
) -> tuple[Path, dict]:
    """Sample, judge and pair for `questions`; write everything under `out_dir`; return (preferences, stats).

    `contexts` given: used as is (the iterative DPO loop computes them per its mode); otherwise built
    per `cfg.context` and saved to contexts.json, which a re-run with the same context settings
    reuses; `context_name` says what given contexts are (for stats.json; default `cfg.context.kind`).
    An `hf` judge with model "policy" judges with `model`; one with a saved model's path loads that
    model.
    """
    if cfg.judge.backend == "reward" and cfg.preferences.method == "score_threshold":
        raise ConfigError("preferences.method: score_threshold splits 1-5 scores at a threshold; the reward judge "
                          "gives unbounded rewards: use pairwise or ranked")
    out_dir.mkdir(parents=True, exist_ok=True)
    method = cfg.preferences.method
    if method == "pairwise" and cfg.sampling.num_samples != 2:
        raise ConfigError(f"preferences.method 'pairwise' compares 2 answers; sampling.num_samples is {cfg.sampling.num_samples}")
    if cfg.sampling.num_samples < 2:
        raise ConfigError("sampling.num_samples: need at least 2 answers per question to build preferences")

    samples_path = out_dir / "samples.jsonl"
    samples = load_samples(samples_path, questions) if cfg.run.resume else None
    if samples is None:
        samples = sample_candidates(model, visual, questions, cfg.sampling, cfg.seed, progress)
        save_samples(samples_path, questions, samples)

    if contexts is None:
        contexts_path = out_dir / "contexts.json"
        settings = {**asdict(cfg.context), "prompts": cfg.judge.prompts, "policy": cfg.policy}
        videos = [q.video for q in questions if q.video is not None]
        contexts = load_contexts(contexts_path, settings, videos) if cfg.run.resume else None
        if contexts is None:
            contexts = build_contexts(cfg.context, model, visual, questions, prompts_path=cfg.judge.prompts, progress=progress)
            save_contexts(contexts_path, settings, contexts)

    cache = Path(cfg.judge.cache) if cfg.judge.cache else out_dir / "judge_cache.sqlite"
    judge = build_judge(cfg.judge, cache, model=model, visual=visual)
    judgments = judge_candidates(judge, method, questions, samples, contexts)
    records, dropped = build_records(cfg, questions, samples, judgments, contexts, cfg.seed)

    stats = {
        "questions": len(questions),
        "pairs": len(records),
        "dropped": dropped,
        **judge_stats(judgments),
        **{k: judge.stats()[k] for k in ("reasked", "reask_fixed")},
        **length_stats(records),
        "judge": judge.id,
        "context": context_name or cfg.context.kind,
    }
    if cfg.preferences.oracle:
        from vlmalign.feedback.oracle import Oracle

        stats["oracle_agreement"] = oracle_agreement(Oracle.from_dir(cfg.preferences.oracle), method, questions, samples, judgments)
    _write_jsonl(out_dir / "judgments.jsonl", judgment_rows(questions, judgments, contexts))
    path = out_dir / "preferences.jsonl"
    _write_jsonl(path, records)
    (out_dir / "stats.json").write_text(json.dumps(stats, indent=2), encoding="utf-8")
    return path, stats


def swap_preferences(src: Path, dst: Path) -> Path:
    """The negative control of DPO and the reward model: every pair of `src` with chosen and
    rejected (and their scores, and a pairwise judge's choice) swapped, marked `"control": "swapped"`,
    written to `dst`. This reverses the feedback: a method trained on it must lose, so the control
    checks the direction of learning (the gym's random judge is the control with no information)."""
    rows = [json.loads(line) for line in Path(src).read_text(encoding="utf-8").splitlines() if line.strip()]
    for r in rows:
        r["chosen"], r["rejected"] = r["rejected"], r["chosen"]
        r["chosen_score"], r["rejected_score"] = r.get("rejected_score"), r.get("chosen_score")
        if r.get("choice") in (0, 1):
            r["choice"] = 1 - r["choice"]
        r["control"] = "swapped"
    dst = Path(dst)
    dst.parent.mkdir(parents=True, exist_ok=True)
    _write_jsonl(dst, rows)
    return dst


def every_pair(src: Path, dst: Path, chosen_min: int, rejected_max: int) -> Path:
    """score_threshold records (`src`) expanded to every pair of each question's answers: each answer
    scoring >= `chosen_min` against each scoring <= `rejected_max`, distinct non-empty texts, each
    pair of texts once, written to `dst` with the record's provenance. A reward model learns from all
    the comparisons of a prompt, as InstructGPT's does (all K-choose-2 of its K ranked answers); DPO
    keeps one pair per question."""
    rows = []
    for r in (json.loads(line) for line in Path(src).read_text(encoding="utf-8").splitlines() if line.strip()):
        if r.get("method") != "score_threshold" or "scores" not in r:
            raise DataError(f"{src}: record {r.get('id')!r} is no score_threshold record with its answers' scores; "
                            "every pair needs them")
        seen = set()
        for chosen, good in zip(r["answers"], r["scores"]):
            for rejected, poor in zip(r["answers"], r["scores"]):
                texts = (chosen.strip(), rejected.strip())
                if good < chosen_min or poor > rejected_max or not all(texts) or texts in seen:
                    continue
                seen.add(texts)
                rows.append({**r, "chosen": chosen, "rejected": rejected, "chosen_score": good, "rejected_score": poor})
    dst = Path(dst)
    dst.parent.mkdir(parents=True, exist_ok=True)
    _write_jsonl(dst, rows)
    return dst


def format_stats(stats: dict) -> str:
    lines = [
        f"questions {stats['questions']}, pairs kept {stats['pairs']}, dropped {sum(stats['dropped'].values())} {stats['dropped'] or ''}".rstrip(),
        f"judgments {stats['judgments']} ({stats['cached']} from cache): {stats['by_status']}"
        + (f", first answer chosen in {100 * stats['first_answer_chosen']:.0f}%" if "first_answer_chosen" in stats else ""),
    ]
    if stats.get("length_ratio") is not None:
        lines.append(
            f"mean words chosen {stats['mean_chosen_words']:.1f}, rejected {stats['mean_rejected_words']:.1f}, ratio {stats['length_ratio']:.2f}"
        )
    if "oracle_agreement" in stats:
        lines.append(f"agreement with the oracle: {stats['oracle_agreement']}")
    return "\n".join(lines)


def run(cfg: PrefsConfig) -> Path:
    """`vlmalign make-prefs`: config in, RUN/preferences.jsonl and RUN/stats.json out."""
    from accelerate.utils import set_seed

    from vlmalign.model.policy import load_model

    if not cfg.policy:
        raise ConfigError("policy: give the model that answers (e.g. runs/tiny-sft/final)")
    if not cfg.data.train:
        raise ConfigError("data.train: give at least one question file")
    run_dir = Path(cfg.run.dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    save_config(cfg, run_dir / "config.yaml")
    set_seed(cfg.seed)
    model = load_model(cfg.policy).eval()
    if torch.cuda.is_available():
        model.cuda()
    visual = model.visual_inputs(cfg.data.feature_cache)
    questions = read_questions(cfg.data.train, cfg.data.video_root, cfg.preferences.limit)
    path, stats = make_preferences(cfg, model, visual, questions, run_dir, progress=cfg.run.progress)
    print(format_stats(stats), flush=True)
    print(f"preferences written to {path}", flush=True)
    return path
