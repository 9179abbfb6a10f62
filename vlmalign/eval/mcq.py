"""Multiple-choice video QA (Video-MME and any file in its layout, e.g. the synthetic `mcq_test.json`).

No judge: the model is asked the question with its lettered options (prompt `eval.mcq`), the letter it
chose is read from its reply (`extract_choice`), and accuracy is reported overall, per task category
(`task_type`, else `question_type` / `category`) and per video duration when the data has one
(Video-MME's short / medium / long). A reply from which no letter can be read counts as wrong: the
model, not a judge, failed to choose; how many there were is reported.

Record layout (JSON array or JSONL): `{"video_name" | "videoID" | "video" | "video_id", "question_id",
"task_type", "question", "options", "answer"}` with `options` a list of "A. text" strings (Video-MME),
a list of plain texts (lettered A, B, ... in order) or a mapping {"A": text, ...}, and `answer` a
letter (or the text of the right option). With `predictions`, each record also holds the model's
reply in `pred` (or `response`) and nothing is generated.
"""

from __future__ import annotations

import re
import string
from collections import defaultdict
from dataclasses import dataclass

from vlmalign.data.formats import VIDEO_EXTS, resolve_video
from vlmalign.errors import VlmalignError
from vlmalign.eval.common import (
    Decoding,
    Fields,
    Request,
    check_limit,
    decoding_summary,
    describe_decoding,
    fmt,
    generate,
    read_records,
    unique_keys,
    write_outputs,
)
from vlmalign.feedback.cache import utc_now
from vlmalign.prompts import load_prompt

__all__ = ["MCQItem", "read_mcq", "extract_choice", "evaluate_mcq"]

_VIDEO_FIELDS = ("video_name", "videoID", "video", "video_id")
_CATEGORY_FIELDS = ("task_type", "question_type", "category")
_LETTERED = re.compile(r"\s*[(\[]?([A-Za-z])[)\]]?[.:)]\s*(.*)", re.S)
_NUMBER_WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten")


@dataclass
class MCQItem:
    key: str
    video: str
    video_name: str
    question: str
    options: dict[str, str]  # letter -> option text
    answer: str  # letter
    category: str | None = None
    duration: str | None = None
    pred: str | None = None  # the model's reply, when read from a predictions file

    def record(self) -> dict:
        out = {"id": self.key, "video_name": self.video_name, "question": self.question,
               "options": [f"{k}. {v}" for k, v in self.options.items()], "answer": self.answer, "pred": self.pred}
        if self.category is not None:
            out["task_type"] = self.category
        if self.duration is not None:
            out["duration"] = self.duration
        return out


def _options(f: Fields) -> dict[str, str]:
    raw = f.data.get("options")
    if isinstance(raw, dict) and raw:
        options = {str(k).strip().upper(): str(v).strip() for k, v in raw.items()}
    elif isinstance(raw, list) and 0 < len(raw) <= 26 and all(isinstance(o, (str, int, float)) for o in raw):
        matches = [_LETTERED.fullmatch(str(o)) for o in raw]
        if all(matches):
            options = {m.group(1).upper(): m.group(2).strip() for m in matches}
        else:
            options = {string.ascii_uppercase[i]: str(o).strip() for i, o in enumerate(raw)}
    else:
        raise f.error("field 'options' must be a list of up to 26 options or a mapping letter -> option")
    if len(options) < 2 or not all(len(k) == 1 and k.isalpha() for k in options):
        raise f.error(f"field 'options' must give at least two options lettered A, B, ...; got {list(options)}")
    return options


def _answer_letter(f: Fields, options: dict[str, str]) -> str:
    text = f.text("answer").strip()
    m = re.fullmatch(r"[(\[]?([A-Za-z])[)\].]?", text)
    if m and m.group(1).upper() in options:
        return m.group(1).upper()
    for letter, option in options.items():
        if _normalise(option) == _normalise(text):
            return letter
    raise f.error(f"field 'answer' {text!r} is neither an option letter ({', '.join(options)}) nor an option's text")


def read_mcq(path, video_root=None, predictions: bool = False) -> list[MCQItem]:
    """Read multiple-choice records (with the model's `pred` when `predictions`)."""
    items, ids = [], []
    for f, _ in read_records(path):
        name = f.text("video_name", alternatives=_VIDEO_FIELDS[1:])
        options = _options(f)
        category_key, duration_key = f.first(_CATEGORY_FIELDS), f.first(("duration",))
        items.append(MCQItem(
            key="", video=resolve_video(name, path, video_root, VIDEO_EXTS), video_name=name,
            question=f.text("question"), options=options, answer=_answer_letter(f, options),
            category=f.text(category_key) if category_key else None,
            duration=f.text(duration_key) if duration_key else None,
            pred=f.text("pred", allow_empty=True, alternatives=("response",)) if predictions else None,
        ))
        ids.append(f.text("question_id", alternatives=("id",)) if f.first(("question_id", "id")) else name)
    for item, key in zip(items, unique_keys(ids)):
        item.key = key
    return items


# ------------------------------------------------------------------------------ letter extraction


def _normalise(text: str) -> str:
    """Lower case, punctuation to spaces, number words to digits ("Two." and "2" are one option)."""
    words = re.sub(r"[^\w\s]", " ", str(text).lower()).split()
    return " ".join(str(_NUMBER_WORDS.index(w)) if w in _NUMBER_WORDS else w for w in words)


def _by_option_text(reply: str, options: dict[str, str]) -> str | None:
    """The one option whose text the reply states; the longest wins when texts nest ("red", "dark red")."""
    said = f" {_normalise(reply)} "
    found = {k: _normalise(v) for k, v in options.items() if _normalise(v) and f" {_normalise(v)} " in said}
    if len(found) == 1:
        return next(iter(found))
    longest = [k for k, v in found.items() if not any(v != w and f" {v} " in f" {w} " for w in found.values())]
    return longest[0] if len(longest) == 1 else None


def extract_choice(reply, options: dict[str, str]) -> str | None:
    """The option letter a free-text reply chose, or None when it names none or several.

    Rules in order, the first that finds a letter decides:
    1. the whole reply is a letter: "B", "(b)", "B.", "[B]";
    2. the reply opens with a marked letter: "B. red", "(B) red", "B: red", "B) red";
    3. a letter after "answer", "option" or "choice": "The answer is B", "Answer: (c)", "answer: d.";
       several different letters here make the reply ambiguous;
    4. the text of exactly one option ("It is red." for "B. red"; number words match digits);
    5. exactly one capital option letter standing alone ("I'd go with C"), where "A" followed by a
       lower-case word is the article ("A red square"), not a choice.
    """
    text = re.sub(r"[*_`#\"“”]", "", "" if reply is None else str(reply)).strip()
    letters = "".join(options)
    if not text or not letters:
        return None
    m = re.fullmatch(rf"[(\[]?([{letters}])[)\]]?[.:!]?", text, re.I)
    if m:
        return m.group(1).upper()
    m = re.match(rf"(?:[(\[]([{letters}])[)\]]|([{letters}])[.:)])(?:\s|$)", text, re.I)
    if m:
        return (m.group(1) or m.group(2)).upper()
    keyword = re.compile(
        rf"(?i:\b(?:answer|option|choice)\b)(?:\s*(?i:is|:|=|-))?\s*"
        # "(b)" in any case, a capital "B", or a lower-case "b" ending the sentence
        rf"(?:[(\[]([{letters}{letters.lower()}])[)\]]|([{letters}])(?![\w'])|([{letters.lower()}])(?=\s*(?:$|[.,;:!])))"
    )
    found = {m.group(m.lastindex).upper() for m in keyword.finditer(text) if m.lastindex != 2 or not _article(text, m)}
    if found:
        return found.pop() if len(found) == 1 else None
    by_text = _by_option_text(text, options)
    if by_text is not None:
        return by_text
    bare = {m.group(1) for m in re.finditer(rf"(?<![\w'])([{letters}])(?![\w'])", text) if not _article(text, m)}
    return bare.pop() if len(bare) == 1 else None


def _article(text: str, m: re.Match) -> bool:
    """Whether the capital "A" just matched opens a noun phrase ("A red square") rather than naming option A."""
    return m.group(m.lastindex) == "A" and re.match(r"\s+(?!(?:is|was|seems|or|and)\b)[a-z]", text[m.end():]) is not None


# --------------------------------------------------------------------------------------- main


def _accuracy(rows: list[tuple[MCQItem, str | None]]) -> dict:
    groups: dict[str, list] = defaultdict(list)
    for item, choice in rows:
        if item.category is not None:
            groups[item.category].append((item, choice))
        groups["all"].append((item, choice))
    out = {}
    for name in sorted(groups, key=lambda g: (g == "all", g)):
        g = groups[name]
        correct = sum(choice == item.answer for item, choice in g)
        out[name] = {"n": len(g), "correct": correct, "unparsed": sum(c is None for _, c in g),
                     "accuracy": correct / len(g)}
    return out


def _by_duration(rows) -> dict | None:
    durations = sorted({item.duration for item, _ in rows if item.duration is not None})
    if not durations:
        return None
    return {d: _accuracy([(i, c) for i, c in rows if i.duration == d])["all"] for d in durations}


def _table(results: dict, title: str) -> str:
    lines = [f"| {title} | n | accuracy % | no letter |", "|---|---|---|---|"]
    lines += [f"| {k} | {r['n']} | {fmt(r['accuracy'], True)} | {r['unparsed']} |" for k, r in results.items()]
    return "\n".join(lines)


def evaluate_mcq(
    benchmark: str, out_dir, *, data=None, videos=None, model_dir=None, predictions=None,
    decoding: Decoding | None = None, limit: int | None = None, feature_cache: str | None = None, progress: bool = True,
) -> dict:
    """Answer (or read) a multiple-choice set, read the chosen letters, write outputs, return the report."""
    check_limit(limit)
    if (model_dir is None) == (predictions is None):
        raise VlmalignError(f"eval {benchmark}: give either a model with its data, or a predictions file")
    gen_stats = None
    if predictions is not None:
        items, decoding = read_mcq(predictions, videos, predictions=True)[:limit], None
    else:
        if data is None:
            raise VlmalignError(f"eval {benchmark}: the model needs --data, a multiple-choice file to answer")
        items, decoding = read_mcq(data, videos)[:limit], decoding or Decoding()
        prompt = load_prompt("eval.mcq")
        requests = [Request(it.key, it.video, prompt.render(question=it.question, options="\n".join(
            f"{k}. {v}" for k, v in it.options.items()))) for it in items]
        answers, gen_stats = generate(model_dir, requests, decoding, out_dir, feature_cache, progress)
        for it in items:
            it.pred = answers[it.key]
    if not items:
        raise VlmalignError(f"eval {benchmark}: {predictions or data} holds no questions")
    rows = [(it, extract_choice(it.pred, it.options)) for it in items]
    results = _accuracy(rows)
    durations = _by_duration(rows)
    table = _table(results, "task category")
    report = {
        "benchmark": benchmark,
        "task": "mcq",
        "model": str(model_dir) if model_dir is not None else None,
        "predictions": str(predictions) if predictions is not None else None,
        "data": str(data) if data is not None else None,
        "judge": None,
        "generation": decoding_summary(decoding, gen_stats),
        "results": results,
        "by_duration": durations,
        "table": table,
        "created": utc_now(),
    }
    predictions_out = [{**it.record(), "choice": choice, "correct": choice == it.answer} for it, choice in rows]
    source = f"model `{model_dir}`, data `{data}`" if model_dir is not None else f"predictions `{predictions}`"
    md = [f"# {benchmark}: multiple choice", "", f"Answers: {source}.", *describe_decoding(report["generation"]),
          "No judge: the chosen letter is read from each reply; a reply naming no single option counts as wrong.", "",
          table]
    if durations:
        md += ["", _table(durations, "duration")]
    write_outputs(out_dir, predictions_out, None, report, "\n".join(md) + "\n")
    return report
