"""Parsers for the evaluation judges' replies (prompts `eval.qa` and the five generative criteria).

The prompts ask for a Python dictionary, `{'pred': 'yes', 'score': 4}` or `{'score': 3}`, as the
published zero-shot protocol does, and judges answer it in many near forms: JSON with double quotes,
a dictionary inside prose or a code fence, or plain text ("Yes. Score: 4"). The parsers read all of
those and return None for anything else, so the caller can count the reply as unparseable instead
of scoring it.

Scores: the published protocol keeps the integer part of the score (`int(4.8)` is 4); `float_scores`
keeps the value as given. A score outside 0..5 is unparseable rather than clipped.
"""

from __future__ import annotations

import ast
import json
import re

__all__ = ["parse_qa_reply", "parse_criterion_score", "SCORE_RANGE"]

SCORE_RANGE = (0, 5)

_DICT = re.compile(r"\{[^{}]*\}", re.S)
_NUMBER = r"(-?\d+(?:\.\d+)?)"
_SCORE_KEYWORD = re.compile(r"(?i)\bscore\b['\"]?\s*(?:is|of|=|:)?\s*['\"]?" + _NUMBER)
_ANY_NUMBER = re.compile(r"(?<![\w.])" + _NUMBER + r"(?![\w]|\.\d)")
_YES_NO = re.compile(r"(?i)\b(yes|no)\b")
# Keys a judge may use for the verdict: the protocol's 'pred' and the names judges drift to.
_VERDICT_KEYS = ("pred", "verdict", "correct", "match", "answer")


def _as_dict(text: str) -> dict | None:
    """The one dictionary in the reply (JSON or a Python literal), lower-cased keys; else None."""
    found = []
    for chunk in _DICT.findall(text):
        for load in (json.loads, ast.literal_eval):
            try:
                value = load(chunk)
            except (ValueError, SyntaxError, TypeError, MemoryError, RecursionError):
                continue
            if isinstance(value, dict):
                found.append({str(k).strip().lower(): v for k, v in value.items()})
                break
    return found[0] if len(found) == 1 else None


def _score(value, float_scores: bool) -> int | float | None:
    if isinstance(value, bool):
        return None
    if isinstance(value, str):
        value = value.strip()
        if not re.fullmatch(_NUMBER, value):
            return None
        value = float(value)
    if not isinstance(value, (int, float)):
        return None
    lo, hi = SCORE_RANGE
    if not lo <= value <= hi:
        return None
    return float(value) if float_scores else int(value)


def _text_score(text: str, float_scores: bool) -> int | float | None:
    """"Score: N" (every mention agreeing), else the only number of the reply."""
    for pattern in (_SCORE_KEYWORD, _ANY_NUMBER):
        values = {float(v) for v in pattern.findall(text)}
        if len(values) == 1:
            return _score(values.pop(), float_scores)
        if values:
            return None
    return None


def _verdict(value) -> bool | None:
    if isinstance(value, bool):
        return value
    if isinstance(value, str):
        return {"yes": True, "no": False, "true": True, "false": False}.get(value.strip().strip(".!").lower())
    return None


def parse_qa_reply(text, float_scores: bool = False) -> tuple[bool, int | float] | None:
    """(matches, score) from an `eval.qa` reply; None when either part is missing or ambiguous.

    A dictionary in the reply decides when it has a verdict key ('pred', or 'verdict', 'correct',
    'match', 'answer') and 'score'; otherwise the text must hold exactly one of the words yes / no
    and one score ("Score: N", or a single number).
    """
    text = "" if text is None else str(text)
    fields = _as_dict(text)
    if fields is not None:
        verdict = next((_verdict(fields[k]) for k in _VERDICT_KEYS if k in fields), None)
        score = _score(fields["score"], float_scores) if "score" in fields else None
        if verdict is not None and score is not None:
            return verdict, score
    words = {w.lower() for w in _YES_NO.findall(text)}
    if len(words) != 1:
        return None
    score = _text_score(text, float_scores)
    return None if score is None else (words.pop() == "yes", score)


def parse_criterion_score(text, float_scores: bool = False) -> int | float | None:
    """The 0..5 score of a generative-criterion reply ({'score': N}, "Score: N" or a lone number)."""
    text = "" if text is None else str(text)
    fields = _as_dict(text)
    if fields is not None and "score" in fields:
        return _score(fields["score"], float_scores)
    return _text_score(text, float_scores)
