"""Does a judge read the answers? Pairs of a true and a wrong answer, for the synthetic benchmark.

Agreement with the oracle on pairs of the policy's own samples mixes two things: how often the two
samples differ in a way the judge could see, and whether the judge looks. This probe removes the
first. Each pair holds the oracle's reference answer to a question and a wrong but plausible one:
the reference answer to the same question about another video, which the oracle scores lower on
this video. The order is random, so a judge that follows the position is right about half the
time, and a judge that reads the answers and the video (or its caption) every time.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

from vlmalign.feedback.judges import JudgeRequest
from vlmalign.feedback.preferences import Question, video_key


@dataclass(frozen=True)
class ProbePair:
    question: Question
    answers: tuple[str, str]
    true_index: int  # 0: the first answer is the true one


def true_vs_wrong_pairs(oracle, questions: list[Question], seed: int = 0) -> list[ProbePair]:
    """One pair per question that has a wrong answer to borrow (its text is asked about another
    video whose reference answer the oracle scores lower here); the others are left out."""
    rng = random.Random(seed)
    references = [oracle.reference(q.video, q.question) for q in questions]
    by_text: dict[str, list[int]] = {}
    for i, q in enumerate(questions):
        by_text.setdefault(q.question, []).append(i)
    pairs = []
    for i, q in enumerate(questions):
        true = references[i]
        best = oracle.score(q.video, q.question, true)
        wrong = sorted({references[j] for j in by_text[q.question]
                        if references[j] != true and oracle.score(q.video, q.question, references[j]) < best})
        if not wrong:
            continue
        false = rng.choice(wrong)
        true_index = rng.randrange(2)
        answers = (true, false) if true_index == 0 else (false, true)
        pairs.append(ProbePair(q, answers, true_index))
    return pairs


def probe_judge(judge, pairs: list[ProbePair], contexts: dict[str, str] | None = None) -> dict:
    """The judge's accuracy on `pairs` (share of parsed verdicts that pick the true answer), the
    share of verdicts for the first answer, and the unparsed ones. `contexts`: {video key: text}."""
    contexts = contexts or {}
    requests = [JudgeRequest(p.question.video, p.question.question, p.answers, contexts.get(video_key(p.question.video), ""))
                for p in pairs]
    judged = judge.compare(requests)
    verdicts = [(j.value, p.true_index) for j, p in zip(judged, pairs) if j.status == "ok"]
    n = len(verdicts)
    return {"accuracy": sum(v == t for v, t in verdicts) / n if n else None, "n": n,
            "first_answer_chosen": sum(v == 0 for v, _ in verdicts) / n if n else None,
            "not_judged": len(pairs) - n}
