"""grpo-rank trainer on the 12-video benchmark with a tiny model and the oracle ranker."""

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from tests.conftest import check_shared_prompt_forward
from vlmalign import losses as L
from vlmalign.config import GRPOConfig, load_config
from vlmalign.errors import ConfigError
from vlmalign.train import grpo_rank


def grpo_cfg(policy, bench, run_dir, **extra) -> GRPOConfig:
    base = {
        "run.dir": str(run_dir), "run.progress": "false", "model.init_from": str(policy),
        "data.train": f"[{bench}/sft_easy.json]", "data.feature_cache": str(run_dir.parent / "feature_cache"),
        "judge.bench": str(bench), "sampling.max_new_tokens": "5", "grpo.rollout_batch": "4", "grpo.mini_batch": "10",
        "train.max_steps": "3", "train.log_every": "1", "train.save_every": "2", "eval_qa": "null",
    }
    base.update(extra)
    return load_config(GRPOConfig, "configs/tiny/grpo_rank.yaml", [f"{k}={v}" for k, v in base.items()])


def _metrics(run_dir):
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.parametrize("advantage,loss", [
    ("grpo_rank", "bnpo"), ("grpo", "bnpo"), ("grpo_rank_monotone", "grpo"), ("dr_grpo", "dr_grpo"), ("grpo", "dapo")])
def test_grpo_runs_and_logs_what_a_researcher_watches(tiny_policy, tiny_bench, tmp_path, advantage, loss):
    run_dir = tmp_path / advantage
    extra = {"grpo.advantage": advantage, "grpo.num_iterations": "2", "grpo.loss": loss}
    if loss == "dapo":  # with clip-higher and GSPO's sequence ratio: every knob runs in the trainer
        extra.update({"grpo.clip_high": "0.28", "grpo.ratio": "sequence"})
    final = grpo_rank.run(grpo_cfg(tiny_policy, tiny_bench, run_dir, **extra))
    metrics = _metrics(run_dir)
    assert [m["step"] for m in metrics] == [1, 2, 3]
    ranks = advantage.startswith("grpo_rank")
    for m in metrics:
        assert m["groups_skipped"] == 0 and m["kl"] >= 0 and 0 <= m["clip_fraction"] <= 1
        assert m["time_sampling"] > 0 and m["time_judging"] > 0 and m["time_update"] > 0
        if ranks:
            assert 0 <= m["delta_mean"] < 1 and 0 <= m["ranking_matches"] <= 1
        else:
            assert 1 <= m["score_mean"] <= 5
    if ranks:  # kendall_tau: the mean tau-b of the policy's ranking against the judge's, over the
        # rollout's groups the judge did not rank all alike (None if it ranked every group so)
        rows = [json.loads(line) for line in (run_dir / "rollouts.jsonl").read_text().splitlines()]
        for m, step in zip(metrics, sorted({r["step"] for r in rows}), strict=True):
            pairs = [(torch.tensor([r["policy_ranks"]]), torch.tensor([r["judgments"][0]["value"]]))
                     for r in rows if r["step"] == step and len(set(r["judgments"][0]["value"])) > 1]
            taus = [float(L.kendall_tau(a, b)[0]) for a, b in pairs]
            assert m["kendall_tau"] == (pytest.approx(sum(taus) / len(taus)) if taus else None)
    before = load_file(tiny_policy / "llm" / "model.safetensors")
    after = load_file(final / "llm" / "model.safetensors")
    moved = any(not torch.equal(before[k], after[k]) for k in before)
    # an untrained model's answers may all score 1: zero score advantages, nothing to learn
    assert moved == any(m["advantage_abs_mean"] > 0 for m in metrics)
    if ranks:
        # rank advantages are zero only where the policy already orders like the oracle or the
        # oracle ties every answer (equal scores); this policy's groups are not all such
        assert moved


def test_interrupted_grpo_resumes_to_the_same_weights(tiny_policy, tiny_bench, tmp_path, monkeypatch, kill_at_step):
    straight = tmp_path / "straight"
    grpo_rank.run(grpo_cfg(tiny_policy, tiny_bench, straight))
    resumed = tmp_path / "resumed"
    cfg = grpo_cfg(tiny_policy, tiny_bench, resumed)
    kill_at_step(3)  # in rollout 3
    with pytest.raises(KeyboardInterrupt):
        grpo_rank.run(cfg)
    monkeypatch.undo()
    grpo_rank.run(cfg)
    a = load_file(straight / "final" / "llm" / "model.safetensors")
    b = load_file(resumed / "final" / "llm" / "model.safetensors")
    for name in a:
        torch.testing.assert_close(a[name], b[name], rtol=0, atol=1e-6)
    # rollouts.jsonl: each rollout's groups once, those redone after the resume not repeated
    rows = [json.loads(line) for line in (resumed / "rollouts.jsonl").read_text().splitlines()]
    same = [json.loads(line) for line in (straight / "rollouts.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1] * 4 + [2] * 4 + [3] * 4
    assert [(r["id"], [a["text"] for a in r["answers"]]) for r in rows] == [(r["id"], [a["text"] for a in r["answers"]]) for r in same]
    for r in rows:
        judged = r["judgments"][0]["value"]  # the oracle's: each rank counts the answers scoring higher
        assert judged == [sum(other < mine for other in judged) for mine in judged]
        assert sorted(r["policy_ranks"]) == list(range(5))
        assert len(r["advantages"]) == len(r["answers"]) == 5 and r["judgments"][0]["raw"]
    assert any(a != 0 for r in rows for a in r["advantages"])  # the resumed run had something to learn


def test_grpo_input_errors_name_the_key(tiny_policy, tiny_bench, tmp_path):
    from vlmalign.errors import ConfigError

    with pytest.raises(ConfigError, match="model.init_from"):
        grpo_rank.run(grpo_cfg(tiny_policy, tiny_bench, tmp_path / "a", **{"model.init_from": "null"}))
    with pytest.raises(ConfigError, match="sampling.num_samples"):
        grpo_rank.run(grpo_cfg(tiny_policy, tiny_bench, tmp_path / "b", **{"sampling.num_samples": "1"}))
    with pytest.raises(ConfigError, match="data.train"):
        grpo_rank.run(grpo_cfg(tiny_policy, tiny_bench, tmp_path / "c", **{"data.train": "[]"}))


def test_text_ranker_reads_each_video_caption(tiny_policy, tiny_bench, tmp_path, monkeypatch):
    """An API ranker sees no video: with context.kind caption, every ranking prompt carries the
    video's caption, kept in RUN/contexts.json."""
    from tests.judge_server import FakeJudgeServer
    from vlmalign.feedback.context import caption_for, load_captions

    monkeypatch.delenv("OPENAI_API_KEY", raising=False)  # a localhost server gets a placeholder key
    captions = load_captions(tiny_bench / "captions.json")
    with FakeJudgeServer() as server:
        run_dir = tmp_path / "api"
        grpo_rank.run(grpo_cfg(tiny_policy, tiny_bench, run_dir, **{
            "judge.backend": "openai", "judge.model": "ranker", "judge.base_url": server.url, "judge.max_retries": "0",
            "context.kind": "caption", "context.captions": str(tiny_bench / "captions.json"), "train.max_steps": "1"}))
        prompts = list(server.hits)
    contexts = json.loads((run_dir / "contexts.json").read_text())
    assert len(prompts) == 4 and all(m["groups_skipped"] == 0 for m in _metrics(run_dir))
    for prompt in prompts:  # each of the rollout's 4 prompts names one video's caption
        assert sum(caption_for(captions, video) in prompt for video in contexts["contexts"]) >= 1, prompt
    with pytest.raises(ConfigError, match="retrospective contexts belong to iterative DPO"):
        grpo_rank.run(grpo_cfg(tiny_policy, tiny_bench, tmp_path / "bad", **{"context.kind": "retrospective"}))


@pytest.mark.parametrize("advantage", ["grpo_rank", "grpo"])
def test_every_judge_request_carries_its_own_video_context(advantage):
    """Ranked or scored, each request reads the context of its own question's video."""

    from vlmalign.config import GRPOSection
    from vlmalign.feedback.judges import Judgment
    from vlmalign.feedback.preferences import Question, video_key

    class RecordingJudge:
        requests = []

        def rank(self, requests):
            self.requests += requests
            return [Judgment("rank", [0, 1, 2], "ok", "", "j", "p", "m", False, None) for _ in requests]

        def score(self, requests):
            self.requests += requests
            return [Judgment("score", 3, "ok", "", "j", "p", "m", False, None) for _ in requests]

    questions = [Question(f"q{i}", f"/v/video{i % 2}.mp4", f"question {i}?") for i in range(3)]
    contexts = {video_key(q.video): f"caption of {Path(q.video).stem}" for q in questions}
    judge = RecordingJudge()
    texts = [("a", "b", "c")] * 3
    grpo_rank.judge_rollout(judge, GRPOSection(advantage=advantage), questions, texts, torch.zeros(3, 3), contexts)
    per_question = 1 if advantage == "grpo_rank" else 3
    assert len(judge.requests) == 3 * per_question
    for i, request in enumerate(judge.requests):
        assert request.context == f"caption of video{(i // per_question) % 2}"


def test_max_steps_sets_the_rollout_count_past_the_epochs():
    """train.max_steps overrides train.epochs, as in the other stages: 10 questions in rollouts of 4
    give 2 whole rollouts an epoch, so 5 rollouts take 3 epochs' plans, cut at 5; epoch 0 comes first
    and unchanged, so a longer run resumes a shorter one's rollouts."""
    from vlmalign.train.common import epoch_batches, rollout_plan

    plan = rollout_plan(10, 4, seed=0, epochs=1, max_rollouts=5)
    assert len(plan) == 5 and all(len(b) == 4 for b in plan)
    assert plan[:2] == epoch_batches(10, 4, 0, 0)[:2] == rollout_plan(10, 4, seed=0, epochs=1)
    assert plan[2:4] == epoch_batches(10, 4, 0, 1)[:2]
    assert len(rollout_plan(10, 4, seed=0, epochs=3, max_rollouts=1)) == 1


def test_dynamic_sampling_keeps_only_groups_with_reward_spread(monkeypatch):
    """DAPO's dynamic sampling: a group whose answers all score alike has zero advantages and is
    dropped; extra random batches are sampled until rollout_batch groups are kept, or the rounds run
    out. Here questions with an even number are answered 'bad' by every sample (no spread)."""
    from vlmalign.feedback.judges import Judgment
    from vlmalign.feedback.preferences import Question
    from vlmalign.model.generation import Sample

    class TextJudge:
        def score(self, requests):
            return [Judgment("score", 5 if r.answers[0] == "good" else 1, "ok", "", "j", "p", "m", False, None)
                    for r in requests]

    def fake_share(policy, visual, batch, gen, seed, step, rank, world):
        groups = [[Sample("bad" if int(q.id[1:]) % 2 == 0 or k else "good", [1], [-1.0], True) for k in range(3)]
                  for q in batch]
        return batch, groups

    monkeypatch.setattr(grpo_rank, "sample_share", fake_share)
    questions = [Question(f"q{i}", None, f"question {i}?") for i in range(20)]

    def rollout(**grpo):
        cfg = GRPOConfig()
        cfg.grpo.advantage, cfg.grpo.rollout_batch = "grpo", 4
        for key, value in grpo.items():
            setattr(cfg.grpo, key, value)
        return grpo_rank.collect_rollout(cfg, None, None, None, TextJudge(), questions, [0, 1, 2, 3], 0, {}, 0, 1)

    kept, groups, advantages, metrics = rollout(dynamic_sampling=True, max_sampling_rounds=10)
    assert len(kept) == 4 and all(int(q.id[1:]) % 2 == 1 for q in kept)
    assert kept[:2] == [questions[1], questions[3]]  # the first batch's informative groups come first
    assert (advantages.abs().sum(1) > 0).all() and len(groups) == 4
    assert metrics["groups_kept"] == 4 and metrics["groups_sampled"] == 4 * metrics["sampling_rounds"] >= 8
    assert metrics["score_mean"] == pytest.approx((5 + 1 + 1) / 3 / 2 + 1 / 2)  # the first batch's scores

    kept, _, advantages, metrics = rollout(dynamic_sampling=True, max_sampling_rounds=1)
    assert kept == [questions[1], questions[3]] and metrics["groups_kept"] == 2  # rounds ran out: what there is

    kept, _, advantages, metrics = rollout()  # off: the plan's questions, informative or not
    assert kept == questions[:4] and advantages[0].abs().sum() == 0 and "groups_kept" not in metrics


def test_epoch_reference_resets_the_kl_term_each_epoch(tiny_policy, tiny_bench, tmp_path, monkeypatch, kill_at_step):
    """grpo.reference=epoch (Oracle-RLAIF's Algorithm 1): when an epoch begins the reference becomes
    the current policy, so the first update of each epoch has zero KL; against the fixed start it
    does not. A run interrupted within an epoch resumes with that epoch's reference."""
    from vlmalign.feedback.preferences import read_questions

    n = len(read_questions([f"{tiny_bench}/sft_easy.json"], None, None))
    per_epoch_batch = n // 2  # 2 rollouts per epoch, one update each
    extra = {"grpo.rollout_batch": per_epoch_batch, "grpo.mini_batch": per_epoch_batch * 5, "train.max_steps": 4,
             "train.lr": "1e-3", "train.save_every": 1, "grpo.reference": "epoch"}
    epoch_run = tmp_path / "epoch"
    grpo_rank.run(grpo_cfg(tiny_policy, tiny_bench, epoch_run, **extra))
    kl = [m["kl"] for m in _metrics(epoch_run)]
    assert abs(kl[0]) < 1e-6 and abs(kl[2]) < 1e-6 and kl[1] > 1e-5 and kl[3] > 1e-5
    assert sorted(p.name for p in epoch_run.glob("reference-epoch-*")) == ["reference-epoch-0.safetensors",
                                                                          "reference-epoch-1.safetensors"]
    start_run = tmp_path / "start"
    grpo_rank.run(grpo_cfg(tiny_policy, tiny_bench, start_run, **{**extra, "grpo.reference": "start", "train.max_steps": 3}))
    assert _metrics(start_run)[2]["kl"] > 1e-5

    resumed = tmp_path / "resumed"
    kill_at_step(4)  # in rollout 4, within epoch 2
    with pytest.raises(KeyboardInterrupt):
        grpo_rank.run(grpo_cfg(tiny_policy, tiny_bench, resumed, **extra))
    monkeypatch.undo()
    grpo_rank.run(grpo_cfg(tiny_policy, tiny_bench, resumed, **extra))  # resumes at rollout 3, within epoch 1
    a = load_file(epoch_run / "final" / "llm" / "model.safetensors")
    b = load_file(resumed / "final" / "llm" / "model.safetensors")
    for name in a:
        torch.testing.assert_close(a[name], b[name], rtol=0, atol=1e-6)
    with pytest.raises(ConfigError, match="grpo.reference"):
        grpo_rank.run(grpo_cfg(tiny_policy, tiny_bench, tmp_path / "no-kl", **{**extra, "grpo.beta": 0}))


def test_rollout_log_resumes_past_a_cut_write_and_names_a_bad_line(tmp_path):
    """A crash while rollouts.jsonl was written leaves half a line: resuming drops it with the rows of
    rollouts that are sampled again; a line that is no rollout row is a one-line error naming it."""
    from vlmalign.errors import DataError
    from vlmalign.train.grpo_rank import RolloutLog

    path = tmp_path / "rollouts.jsonl"
    path.write_text("".join(json.dumps({"step": s, "id": f"q{s}"}) + "\n" for s in (1, 2, 3)) + '{"step": 4, "id"')
    log = RolloutLog(path, done=2)
    log.append([{"step": 3, "id": "again"}])
    assert [json.loads(line)["id"] for line in path.read_text().splitlines()] == ["q1", "q2", "again"]
    path.write_text(json.dumps({"step": 1}) + "\nnot json\n")
    with pytest.raises(DataError, match=f"{path}:2: not a rollout row"):
        RolloutLog(path, done=1)


def test_training_runs_each_prompt_once_for_its_answers(tiny_policy, tiny_bench):
    from vlmalign.data.formats import read_instructions
    from vlmalign.model.policy import load_model

    model = load_model(tiny_policy, trainable=True)
    samples = read_instructions(tiny_bench / "sft_easy.json")[:2]
    requests = [(s.video, s.turns[0].text) for s in samples] + [(None, "How many objects are there?")]
    check_shared_prompt_forward(model, model.visual_inputs(None), requests)
