"""PPO trainer on the 12-video benchmark with a tiny policy and a tiny reward model."""

import json
import math

import pytest
import torch
from safetensors.torch import load_file

from vlmalign.cli import main
from vlmalign.config import PPOConfig, RMConfig, load_config
from vlmalign.data.formats import write_jsonl
from vlmalign.errors import ConfigError
from vlmalign.feedback.oracle import Oracle
from vlmalign.train import ppo, rm

pytestmark = pytest.mark.usefixtures("one_thread")

TINY_PPO = "configs/tiny/ppo.yaml"


@pytest.fixture(scope="module")
def tiny_rm(tiny_policy, tiny_bench, tmp_path_factory):
    """A reward model trained for a few steps on oracle pairs (our flat preference JSONL)."""
    out = tmp_path_factory.mktemp("rm")
    oracle = Oracle.from_dir(tiny_bench)
    records = json.loads((tiny_bench / "sft_easy.json").read_text())
    rows = []
    for i, r in enumerate(records[:24]):
        question = r["conversations"][0]["value"]
        video = str(tiny_bench / r["video"])
        rows.append({"id": r["id"], "video": video, "prompt": question,
                     "chosen": oracle.reference(video, question.replace("<video>", "").strip()),
                     "rejected": records[(i + 7) % len(records)]["conversations"][1]["value"]})
    write_jsonl(out / "pairs.jsonl", rows)
    overrides = {
        "run.dir": str(out / "run"), "run.progress": "false", "model.init_from": str(tiny_policy),
        "data.train": f"[{out / 'pairs.jsonl'}]", "data.feature_cache": str(out / "feature_cache"),
        "rm.eval_fraction": "0.0", "train.batch_size": "8", "train.epochs": "2", "train.lr": "3e-4",
    }
    return rm.run(load_config(RMConfig, "configs/tiny/rm.yaml", [f"{k}={v}" for k, v in overrides.items()]))


def ppo_cfg(policy, rm_dir, bench, run_dir, **extra) -> PPOConfig:
    base = {
        "run.dir": str(run_dir), "run.progress": "false", "model.init_from": str(policy), "reward_model": str(rm_dir),
        "data.train": f"[{bench}/sft_easy.json]", "data.feature_cache": str(run_dir.parent / "feature_cache"),
        "sampling.num_samples": "2", "sampling.max_new_tokens": "6",
        # 4 questions x 2 answers per rollout; optimizer steps of 4 answers in forward passes of 2
        "ppo.rollout_batch": "4", "ppo.step_batch": "4", "ppo.micro_batch": "2",
        "train.lr": "1e-3", "train.max_steps": "3", "train.log_every": "1", "train.save_every": "2", "eval_qa": "null",
    }
    base.update(extra)
    return load_config(PPOConfig, TINY_PPO, [f"{k}={v}" for k, v in base.items()])


def _metrics(run_dir):
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.parametrize("lora", [False, True])
def test_ppo_runs_and_logs_what_a_researcher_watches(tiny_policy, tiny_rm, tiny_bench, tmp_path, lora):
    run_dir = tmp_path / "ppo"
    extra = {"model.lora.enabled": "true", "model.lora.r": "8", "model.lora.alpha": "16"} if lora else {
        "eval_qa": str(tiny_bench / "qa_test.json"), "eval_limit": "4"}
    final = ppo.run(ppo_cfg(tiny_policy, tiny_rm, tiny_bench, run_dir, **extra))
    metrics = _metrics(run_dir)
    assert [m["step"] for m in metrics] == [1, 2, 3]
    for m in metrics:
        for key in ("reward", "score", "kl", "entropy", "policy_loss", "value_loss", "approx_kl", "return_mean"):
            assert math.isfinite(m[key]), key
        assert 0 <= m["clip_fraction"] <= 1 and 0 <= m["value_clip_fraction"] <= 1 and m["approx_kl"] >= 0
        assert 1 <= m["response_length"] <= 6 and 0 <= m["eos_fraction"] <= 1 and m["entropy"] > 0
        assert m["kl_coef"] == 0.1 and min(m["time_rollout"], m["time_reward"], m["time_train"]) > 0
    # the first rollout comes from the starting policy, which is the reference: its KL is 0
    assert metrics[0]["kl"] == pytest.approx(0.0, abs=1e-5)
    # the value model (the reward model's copy) starts at the first rollout's mean return
    assert metrics[0]["value_mean"] == pytest.approx(metrics[0]["return_mean"], abs=1e-4)
    assert any(m["kl"] != pytest.approx(0.0, abs=1e-5) for m in metrics[1:])  # and then the policy moved
    if lora:
        assert (final / "adapter").is_dir() and not (final / "llm").exists()
        adapter = load_file(final / "adapter" / "adapter_model.safetensors")
        assert any(bool(t.abs().sum() > 0) for name, t in adapter.items() if "lora_B" in name)  # B starts at 0
    else:
        before = load_file(tiny_policy / "llm" / "model.safetensors")
        after = load_file(final / "llm" / "model.safetensors")
        assert any(not torch.equal(before[k], after[k]) for k in before)
        report = json.loads((run_dir / "eval" / "report.json").read_text())
        assert 0 <= report["results"]["all"]["accuracy"] <= 1


def test_interrupted_ppo_resumes_to_the_same_weights(tiny_policy, tiny_rm, tiny_bench, tmp_path, monkeypatch, kill_at_step):
    straight = tmp_path / "straight"
    ppo.run(ppo_cfg(tiny_policy, tiny_rm, tiny_bench, straight))
    resumed = tmp_path / "resumed"
    cfg = ppo_cfg(tiny_policy, tiny_rm, tiny_bench, resumed)
    kill_at_step(10)  # 4 optimizer steps per rollout (2 epochs x 2 steps): the 2nd of rollout 3
    with pytest.raises(KeyboardInterrupt):
        ppo.run(cfg)
    monkeypatch.undo()
    assert [p.name for p in (resumed / "checkpoints").iterdir()] == ["step-2"] and not (resumed / "final").exists()
    ppo.run(cfg)  # the same command again
    a = load_file(straight / "final" / "llm" / "model.safetensors")
    b = load_file(resumed / "final" / "llm" / "model.safetensors")
    for name in a:
        torch.testing.assert_close(a[name], b[name], rtol=0, atol=1e-6)
    assert [m["step"] for m in _metrics(resumed)] == [1, 2, 3]  # rollout 3 is logged once, when it finished


def test_ppo_config_errors_name_the_key(tiny_policy, tiny_rm, tiny_bench, tmp_path, capsys):
    for key, value, needle in [("reward_model", "''", "reward_model"), ("model.init_from", "null", "model.init_from"),
                               ("ppo.micro_batch", "0", "ppo.micro_batch"), ("data.train", "[]", "data.train"),
                               ("ppo.kl_target", "-1", "ppo.kl_target")]:
        with pytest.raises(ConfigError, match=needle):
            ppo.run(ppo_cfg(tiny_policy, tiny_rm, tiny_bench, tmp_path / "a", **{key: value}))
    with pytest.raises(ConfigError, match="did you mean 'ppo.kl_coef'"):
        ppo_cfg(tiny_policy, tiny_rm, tiny_bench, tmp_path / "b", **{"ppo.kl_cof": "0.2"})
    with pytest.raises(ConfigError, match="not a reward model directory"):
        ppo.run(ppo_cfg(tiny_policy, tiny_policy, tiny_bench, tmp_path / "c"))
    assert main(["ppo", "--config", TINY_PPO, "--set", "reward_model=", "--set", f"run.dir={tmp_path / 'd'}"]) == 2
    assert "error: reward_model" in capsys.readouterr().err


def test_ppo_on_a_judges_scores_needs_no_reward_model(tiny_policy, tiny_bench, tmp_path, monkeypatch):
    """reward: judge: the oracle scores every sampled answer 1-5, and `reward` logs their mean; the
    value model is the policy with a new head (no reward model given), which starts at the first
    rollout's mean return instead of 0."""
    oracle = Oracle.from_dir(tiny_bench)
    seen = []

    def recorded(judge, answers, acc):
        scores, judged = ppo_judge_scores(judge, answers, acc)
        seen.append(([oracle.score(q.video, q.question, s.text) for q, s in answers], scores.tolist(), judged.tolist()))
        return scores, judged

    ppo_judge_scores = ppo.judge_scores
    monkeypatch.setattr(ppo, "judge_scores", recorded)
    run_dir = tmp_path / "ppo"
    final = ppo.run(ppo_cfg(tiny_policy, "", tiny_bench, run_dir, **{"reward": "judge", "judge.bench": str(tiny_bench)}))
    metrics = _metrics(run_dir)
    assert [m["step"] for m in metrics] == [1, 2, 3] and len(seen) == 3
    for m, (truth, scores, judged) in zip(metrics, seen):
        assert scores == truth and all(judged) and len(scores) == 8  # 4 questions x 2 answers
        assert m["reward"] == pytest.approx(sum(truth) / 8) and m["judged_fraction"] == 1.0
    assert abs(metrics[0]["return_mean"]) > 5 and metrics[0]["value_mean"] == pytest.approx(metrics[0]["return_mean"], abs=1e-4)
    before = load_file(tiny_policy / "llm" / "model.safetensors")
    after = load_file(final / "llm" / "model.safetensors")
    assert any(not torch.equal(before[k], after[k]) for k in before)


def test_ppo_leaves_answers_the_judge_could_not_score_out_of_the_update(tiny_policy, tiny_bench, tmp_path, monkeypatch):
    """A failed or unreadable judgment gives an answer no reward and no advantage: with every
    judgment failed nothing trains, and the run says so in judged_fraction."""
    monkeypatch.setattr(ppo, "judge_scores", lambda judge, answers, acc: (torch.zeros(len(answers)),
                                                                          torch.zeros(len(answers), dtype=torch.bool)))
    run_dir = tmp_path / "ppo"
    final = ppo.run(ppo_cfg(tiny_policy, "", tiny_bench, run_dir, **{"reward": "judge", "judge.bench": str(tiny_bench)}))
    assert all(m["judged_fraction"] == 0.0 and m["policy_loss"] == 0.0 for m in _metrics(run_dir))
    before = load_file(tiny_policy / "llm" / "model.safetensors")
    after = load_file(final / "llm" / "model.safetensors")
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_ppo_on_a_judge_names_what_the_judge_lacks(tiny_policy, tiny_bench, tmp_path):
    from vlmalign.errors import JudgeError

    with pytest.raises(ConfigError, match="reward_model: give a reward model .* or set reward: judge"):
        ppo.run(ppo_cfg(tiny_policy, "", tiny_bench, tmp_path / "a"))
    with pytest.raises(JudgeError, match="judge.bench"):
        ppo.run(ppo_cfg(tiny_policy, "", tiny_bench, tmp_path / "b", **{"reward": "judge", "judge.bench": "null"}))
    with pytest.raises(ConfigError, match="reward"):
        ppo_cfg(tiny_policy, "", tiny_bench, tmp_path / "c", **{"reward": "oracle"})


def test_judge_scores_mark_the_answers_left_unscored():
    from types import SimpleNamespace

    from vlmalign.feedback.judges import Judgment

    class HalfReadable:
        def score(self, requests):
            return [Judgment("score", 4, "ok", "Score: 4", "j", "p", None, False) if i % 2 == 0 else
                    Judgment("score", None, "parse_error", "four-ish", "j", "p", None, False) for i, _ in enumerate(requests)]

    question = SimpleNamespace(video="v.mp4", question="What colour is the square?")
    answers = [(question, SimpleNamespace(text=t)) for t in ("Red.", "Blue.", "Green.")]
    scores, judged = ppo.judge_scores(HalfReadable(), answers, SimpleNamespace(num_processes=1))
    assert scores.tolist() == [4.0, 0.0, 4.0] and judged.tolist() == [True, False, True]


def test_answer_tokens_left_align_each_answer():
    values = torch.tensor([[1.0, 2.0, 3.0, 4.0, 5.0], [6.0, 7.0, 8.0, 9.0, 10.0]])
    mask = torch.tensor([[False, True, True, True, False], [False, False, False, True, False]])
    aligned, valid = ppo.answer_tokens(values, mask)
    assert aligned.tolist() == [[2.0, 3.0, 4.0], [9.0, 0.0, 0.0]]
    assert valid.tolist() == [[True, True, True], [True, False, False]]


def test_adaptive_kl_coefficient_moves_towards_the_target():
    assert ppo.adapt_kl_coef(0.1, kl=12.0, target=6.0, horizon=100, num_answers=10) == pytest.approx(0.1 * (1 + 0.2 * 0.1))
    assert ppo.adapt_kl_coef(0.1, kl=3.0, target=6.0, horizon=100, num_answers=10) == pytest.approx(0.1 * (1 - 0.2 * 0.1))
    assert ppo.adapt_kl_coef(0.1, kl=6.0, target=6.0, horizon=100, num_answers=10) == pytest.approx(0.1)
