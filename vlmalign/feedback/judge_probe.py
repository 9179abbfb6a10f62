"""Does a judge read the answers? Pairs of a true and a wrong answer, for the synthetic benchmark.

Agreement with the oracle on pairs of the policy's own samples mixes two things: how often the two
samples differ in a way the judge could see, and whether the judge looks. This probe removes the
first. Each pair holds the oracle's reference answer to a question and a wrong but plausible one:
the reference answer to the same question about another video, which the oracle scores lower on
this video. The true answer comes first in half the pairs, in random order, so a judge that
follows the position is right half the time, and a judge that reads the answers and the video (or
its caption) every time.
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
    questions = [q for q in questions if q.video is not None]  # the oracle knows videos, not text-only items
    references = [oracle.reference(q.video, q.question) for q in questions]
    by_text: dict[str, list[int]] = {}
    for i, q in enumerate(questions):
        by_text.setdefault(q.question, []).append(i)
    chosen = []
    for i, q in enumerate(questions):
        true = references[i]
        best = oracle.score(q.video, q.question, true)
        wrong = sorted({references[j] for j in by_text[q.question]
                        if references[j] != true and oracle.score(q.video, q.question, references[j]) < best})
        if wrong:
            chosen.append((q, true, rng.choice(wrong)))
    # the true answer first in exactly half the pairs (one more when odd): a judge that always picks
    # the same position then scores 50%, not the share a coin flip happened to give that position
    positions = [k % 2 for k in range(len(chosen))]
    rng.shuffle(positions)
    return [ProbePair(q, (true, false) if first == 0 else (false, true), first)
            for (q, true, false), first in zip(chosen, positions)]


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
