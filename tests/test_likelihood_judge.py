"""The likelihood judge (`judge.backend: likelihood`): a model judges by how likely it finds each answer
after the context and the question."""

import pytest
import torch

from vlmalign.config import JudgeConfig
from vlmalign.feedback.judges import JudgeRequest, LikelihoodJudge, build_judge, likelihood_prompt
from vlmalign.feedback.preferences import read_questions


def _answer_logprob(model, visual, prompt_ids: list[int], answer_ids: list[int], video) -> float:
    """log p(answer | prompt), one token at a time on growing unpadded inputs: an independent
    computation of what the judge gets from one padded teacher-forced batch."""
    total, ids = 0.0, list(prompt_ids)
    with torch.no_grad():
        for token in answer_ids:
            kwargs = {}
            if video is not None:
                kwargs = model.stack_visual(visual.batch([video]))
            logits = model(input_ids=torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long), **kwargs).logits
            total += float(logits[0, -1].float().log_softmax(-1)[token])
            ids.append(token)
    return total


@pytest.mark.parametrize("read_video", [True, False])
def test_likelihood_judge_scores_compares_and_ranks_by_answer_log_probability(tiny_policy, tiny_bench, tmp_path, read_video):
    from vlmalign.data.formats import Turn
    from vlmalign.model.policy import load_model

    cfg = JudgeConfig(backend="likelihood", model=str(tiny_policy), batch_size=2, max_length=512, read_video=read_video)
    judge = build_judge(cfg, tmp_path / "cache.sqlite", progress=False)
    assert isinstance(judge, LikelihoodJudge) and judge.id.startswith(f"likelihood:{tiny_policy}#")
    questions = read_questions([str(tiny_bench / "sft_easy.json")], None)[:3]
    context = "The video shows one object. At the start, a red square moves left."
    answers = ("Red.", "It is blue.", "It moves to the left.")
    scored = judge.score([JudgeRequest(q.video, q.question, (a,), context=context) for q in questions for a in answers])
    ranked = judge.rank([JudgeRequest(q.video, q.question, answers, context=context) for q in questions])
    compared = judge.compare([JudgeRequest(q.video, q.question, answers[1:], context=context) for q in questions])

    model = load_model(tiny_policy).eval()
    visual = model.visual_inputs(None)
    expected = []
    for q in questions:
        video = q.video if read_video else None
        _, text = likelihood_prompt(q.question, context, None, video)
        assert ("<video>" in text) == read_video and "Notes about the video" in text and context in text
        row = []
        for a in answers:
            enc = model.encode_conversation([Turn("user", text), Turn("assistant", a)], 512, layout=model.video_layout(video))
            first = next(i for i, label in enumerate(enc.labels) if label != -100)
            row.append(_answer_logprob(model, visual, enc.input_ids[:first], enc.input_ids[first:], video))
        expected.append(row)

    assert all(j.status == "ok" and j.prompt == "judge.likelihood@v1" for j in scored + ranked + compared)
    assert [j.value for j in scored] == pytest.approx([x for row in expected for x in row], abs=1e-4)
    for row, rank, comp in zip(expected, ranked, compared):
        # each answer's rank: how many answers are likelier (0 = best)
        assert rank.value == [sorted(row, reverse=True).index(x) for x in row] and rank.raw.startswith("log-probs: ")
        assert comp.value == (0 if row[1] >= row[2] else 1)
    # a ranking of two answers is not read back from the cached comparison of the same two
    pairs = judge.rank([JudgeRequest(q.video, q.question, answers[1:], context=context) for q in questions])
    assert [j.value for j in pairs] == [[0, 1] if row[1] > row[2] else [1, 0] for row in expected]
    # what the judge reads matters: the video (when shown) and the context change the scores
    without_context = judge.score([JudgeRequest(questions[0].video, questions[0].question, (answers[0],))])[0].value
    assert without_context != pytest.approx(expected[0][0], abs=1e-4)
    if read_video:
        other = next(q for q in read_questions([str(tiny_bench / "sft_easy.json")], None) if q.video != questions[0].video)
        moved = judge.score([JudgeRequest(other.video, questions[0].question, (answers[0],), context=context)])[0].value
        assert moved != pytest.approx(expected[0][0], abs=1e-5)

    # cached: asked again, nothing is computed
    again = build_judge(cfg, tmp_path / "cache.sqlite", progress=False)
    assert [j.value for j in again.rank([JudgeRequest(q.video, q.question, answers, context=context) for q in questions])] \
        == [j.value for j in ranked]
    assert again.stats()["calls"] == 0 and again.stats()["cache_hits"] == 3


def test_likelihood_judge_of_the_policy_follows_its_weights(tiny_policy, tiny_bench, tmp_path):
    """With judge.model "policy" the judge is the model being trained: after an update its former
    verdicts are not read back from the cache."""
    from vlmalign.model.policy import load_model

    model = load_model(tiny_policy)
    judge = build_judge(JudgeConfig(backend="likelihood", model="policy"), tmp_path / "c.sqlite", model=model, progress=False)
    assert judge.model is model and judge.id.startswith("likelihood:policy#")
    (q,) = read_questions([str(tiny_bench / "sft_easy.json")], None)[:1]
    first = judge.score([JudgeRequest(q.video, q.question, ("Red.",))])[0]
    with torch.no_grad():
        model.language_model.get_input_embeddings().weight.add_(0.1)
    second = judge.score([JudgeRequest(q.video, q.question, ("Red.",))])[0]
    assert not second.cached and second.value != pytest.approx(first.value, abs=1e-6)


def test_likelihood_judge_calls_a_tie_under_its_margin_and_caches_apart(tiny_policy, tiny_bench, tmp_path):
    """judge.tie_margin: two answers whose log-probabilities differ by less than the margin make no
    preference (status "tie", which make-prefs drops as such); wider gaps are judged as without one.
    Verdicts cached without a margin are not read back by a judge with one."""
    from vlmalign.errors import JudgeError
    from vlmalign.feedback.preferences import build_records
    from vlmalign.config import PrefsConfig
    from vlmalign.model.generation import Sample

    questions = read_questions([str(tiny_bench / "sft_easy.json")], None)[:4]
    pairs = [("Red.", "It is blue."), ("It is red.", "It moves to the left."), ("Blue.", "Two."), ("Green.", "It is a circle.")]
    requests = [JudgeRequest(q.video, q.question, p) for q, p in zip(questions, pairs)]
    cache = tmp_path / "cache.sqlite"
    plain = build_judge(JudgeConfig(backend="likelihood", model=str(tiny_policy), max_length=512), cache, progress=False)
    scores = [plain.score([JudgeRequest(r.video, r.question, (a,)) for a in r.answers]) for r in requests]
    gaps = [abs(a.value - b.value) for a, b in scores]
    margin = (min(gaps) + max(gaps)) / 2
    assert min(gaps) < margin < max(gaps)
    plain_verdicts = plain.compare(requests)

    judge = build_judge(JudgeConfig(backend="likelihood", model=str(tiny_policy), max_length=512, tie_margin=margin), cache,
                        progress=False)
    verdicts = judge.compare(requests)
    assert judge.stats()["cache_hits"] == 0  # the margin is part of what a verdict was judged under
    for gap, (a, b), verdict, plain_verdict in zip(gaps, scores, verdicts, plain_verdicts):
        if gap < margin:
            assert (verdict.status, verdict.value) == ("tie", None)
        else:
            assert (verdict.status, verdict.value) == ("ok", 0 if a.value >= b.value else 1) == ("ok", plain_verdict.value)
    # make-prefs keeps a pair only where the judge preferred one answer
    samples = [[Sample(a, [], [0.0], True) for a in p] for p in pairs]
    records, dropped = build_records(PrefsConfig(), questions, samples, verdicts, {}, seed=0)
    assert len(records) == sum(g >= margin for g in gaps) and dropped == {"tie": sum(g < margin for g in gaps)}

    for bad in (JudgeConfig(backend="likelihood", model=str(tiny_policy), tie_margin=-1.0),
                JudgeConfig(backend="oracle", bench=str(tiny_bench), tie_margin=1.0)):
        with pytest.raises(JudgeError, match="judge.tie_margin"):
            build_judge(bad, tmp_path / "other.sqlite", progress=False)
