"""The true-vs-wrong judge probe on the 12-video benchmark: pairs, and the accuracy it reports."""

import pytest

from vlmalign.config import JudgeConfig
from vlmalign.feedback.judge_probe import probe_judge, true_vs_wrong_pairs
from vlmalign.feedback.judges import Judgment, build_judge
from vlmalign.feedback.oracle import Oracle
from vlmalign.feedback.preferences import read_questions


@pytest.fixture(scope="module")
def probe_pairs(tiny_bench):
    oracle = Oracle.from_dir(tiny_bench)
    questions = read_questions([str(tiny_bench / "sft_easy.json")])
    return oracle, questions, true_vs_wrong_pairs(oracle, questions, seed=0)


def test_each_pair_holds_the_reference_and_a_worse_answer_to_the_same_question(probe_pairs):
    oracle, questions, pairs = probe_pairs
    assert len(pairs) > 20
    for p in pairs:
        q = p.question
        true, false = p.answers[p.true_index], p.answers[1 - p.true_index]
        assert true == oracle.reference(q.video, q.question)
        assert oracle.score(q.video, q.question, false) < oracle.score(q.video, q.question, true)
        # borrowed: the reference answer to the same question about another video
        assert any(o.question == q.question and o.video != q.video and oracle.reference(o.video, o.question) == false
                   for o in questions)
    second = sum(p.true_index for p in pairs)
    assert second == len(pairs) // 2  # the true answer first in half the pairs (one more when odd)
    assert 0 < sum(p.true_index for p in pairs[: len(pairs) // 2]) < len(pairs) // 2  # not in a fixed pattern
    assert true_vs_wrong_pairs(oracle, questions, seed=0) == pairs  # the same pairs for every judge


class _SecondAnswerJudge:
    """Follows the position: always picks B (with `fail_first`, its first reply does not parse)."""

    def __init__(self, fail_first=False):
        self.fail_first = fail_first

    def compare(self, requests):
        failed = [self.fail_first and i == 0 for i in range(len(requests))]
        return [Judgment("compare", None if bad else 1, "parse_error" if bad else "ok", "B", "fake", "p@v1", None, False)
                for bad in failed]


def test_accuracy_separates_a_judge_that_reads_from_one_that_follows_the_position(probe_pairs, tiny_bench, tmp_path):
    _, _, pairs = probe_pairs
    oracle_judge = build_judge(JudgeConfig(backend="oracle", bench=str(tiny_bench)), tmp_path / "cache.sqlite", progress=False)
    assert probe_judge(oracle_judge, pairs) == {"accuracy": 1.0, "n": len(pairs),
                                                 "first_answer_chosen": pytest.approx(sum(p.true_index == 0 for p in pairs) / len(pairs)),
                                                 "not_judged": 0}
    # balanced positions: following one scores half (less half a pair when the count is odd)
    assert probe_judge(_SecondAnswerJudge(), pairs)["accuracy"] == (len(pairs) // 2) / len(pairs)
    follower = probe_judge(_SecondAnswerJudge(fail_first=True), pairs)
    rest = pairs[1:]  # the first verdict did not parse: not counted, reported
    assert follower["accuracy"] == pytest.approx(sum(p.true_index == 1 for p in rest) / len(rest))
    assert (follower["n"], follower["not_judged"], follower["first_answer_chosen"]) == (len(rest), 1, 0.0)
