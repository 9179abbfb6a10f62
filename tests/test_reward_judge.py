"""The reward-model judge (`judge.backend: reward`): Oracle-RLAIF's oracle is a trained reward model."""

import json

import pytest
import torch

from tests.test_grpo_rank import _metrics, grpo_cfg
from vlmalign.config import JudgeConfig, PrefsConfig, load_config
from vlmalign.errors import ConfigError
from vlmalign.feedback.judges import JudgeRequest, build_judge
from vlmalign.feedback.preferences import read_questions


@pytest.fixture(scope="module")
def tiny_reward_model(tiny_policy, tmp_path_factory):
    """The tiny policy with a random scalar head, saved as `train-rm` saves one."""
    from vlmalign.config import ModelConfig
    from vlmalign.model.reward import build_reward_model

    torch.manual_seed(3)
    model = build_reward_model(ModelConfig(init_from=str(tiny_policy)), "Is the answer right?", "reward.evaluate@v1")
    torch.nn.init.normal_(model.head.weight, std=1.0)
    path = tmp_path_factory.mktemp("rm") / "final"
    model.save_pretrained(path)
    return path


def test_reward_judge_scores_compares_and_ranks_by_reward(tiny_reward_model, tiny_bench, tmp_path):
    from vlmalign.data.collate import Collator
    from vlmalign.data.features import VisualInputs
    from vlmalign.model.reward import final_scores, load_reward_model

    cfg = JudgeConfig(backend="reward", model=str(tiny_reward_model), batch_size=3, max_length=512)
    judge = build_judge(cfg, tmp_path / "cache.sqlite", progress=False)
    questions = read_questions([str(tiny_bench / "sft_easy.json")], None)[:4]
    answers = ("Red.", "Blue.", "It moves left.")
    ranked = judge.rank([JudgeRequest(q.video, q.question, answers) for q in questions])
    scored = judge.score([JudgeRequest(q.video, q.question, (a,)) for q in questions for a in answers])
    compared = judge.compare([JudgeRequest(q.video, q.question, answers[:2]) for q in questions])

    # each reward on its own, one unpadded forward pass per answer: what the batched judge must give
    rm = load_reward_model(tiny_reward_model)
    collate = Collator(rm.backbone, rm.backbone.visual_inputs(None))
    with torch.no_grad():
        def reward(q, a):
            batch = collate([rm.encode(q.question, a, q.video, 512, "one")])
            ids, mask = batch["input_ids"], batch["attention_mask"]
            return float(final_scores(rm(input_ids=ids, attention_mask=mask, features=batch["features"]), mask)[0])
        expected = [[reward(q, a) for a in answers] for q in questions]

    assert all(j.status == "ok" for j in ranked + scored + compared)
    assert [j.value for j in scored] == pytest.approx([r for row in expected for r in row], abs=1e-5)
    for row, rank, comp in zip(expected, ranked, compared):
        # each answer's rank: how many answers have a higher reward (0 = best)
        assert rank.value == [sorted(row, reverse=True).index(r) for r in row] and rank.raw.startswith("rewards: ")
        assert comp.value == (0 if row[0] >= row[1] else 1)
    assert len({tuple(round(r, 4) for r in row) for row in expected}) > 1  # the video changes the rewards
    # cached: asked again, nothing is computed
    again = build_judge(cfg, tmp_path / "cache.sqlite", progress=False)
    assert [j.value for j in again.rank([JudgeRequest(q.video, q.question, answers) for q in questions])] == \
        [j.value for j in ranked]
    assert again.stats()["calls"] == 0 and again.stats()["cache_hits"] == 4


def test_grpo_and_make_prefs_take_the_reward_judge(tiny_policy, tiny_reward_model, tiny_bench, tmp_path):
    from vlmalign.train import grpo_rank

    for advantage in ("grpo_rank", "grpo"):
        run_dir = tmp_path / advantage
        grpo_rank.run(grpo_cfg(tiny_policy, tiny_bench, run_dir, **{
            "judge.backend": "reward", "judge.model": str(tiny_reward_model), "judge.max_length": "512",
            "grpo.advantage": advantage, "train.max_steps": "1"}))
        (m,) = _metrics(run_dir)
        assert m["groups_skipped"] == 0 and m["advantage_abs_mean"] > 0
    prefs = {"run.dir": str(tmp_path / "prefs"), "policy": str(tiny_policy), "data.train": f"[{tiny_bench}/sft_easy.json]",
             "data.feature_cache": str(tmp_path / "features"), "judge.backend": "reward",
             "judge.model": str(tiny_reward_model), "judge.max_length": "512", "preferences.limit": "4",
             "preferences.method": "ranked", "run.progress": "false", "context.kind": "none",
             "preferences.oracle": str(tiny_bench)}
    from vlmalign.feedback import preferences

    path = preferences.run(load_config(PrefsConfig, "configs/tiny/prefs.yaml", [f"{k}={v}" for k, v in prefs.items()]))
    stats = json.loads((path.parent / "stats.json").read_text())
    assert stats["judge"].startswith("reward:") and stats["by_status"] == {"ok": 4}
    # how often the reward model ranks as the oracle does, over the questions the oracle orders at all
    from vlmalign.feedback.oracle import Oracle

    oracle = Oracle.from_dir(tiny_bench)
    questions = {q.id: q for q in preferences.read_questions([f"{tiny_bench}/sft_easy.json"], None, None)}
    samples = [json.loads(line) for line in (path.parent / "samples.jsonl").read_text().splitlines()]
    ordered = sum(len(set(oracle.rank(questions[r["id"]].video, questions[r["id"]].question, [a["text"] for a in r["answers"]]))) > 1
                  for r in samples)
    assert len(samples) == 4 and stats["oracle_agreement"]["n"] == ordered
    # every pair: the answer with the highest reward against the one with the lowest
    for record in map(json.loads, path.read_text().splitlines()):
        rewards = [float(x) for x in record["judge_replies"][0].split(":")[1].split(",")]
        reward = dict(zip(record["answers"], rewards))
        assert reward[record["chosen"]] == max(rewards) and reward[record["rejected"]] == min(rewards)
    prefs.update({"preferences.method": "score_threshold", "run.dir": str(tmp_path / "bad")})
    with pytest.raises(ConfigError, match="use pairwise or ranked"):
        preferences.run(load_config(PrefsConfig, "configs/tiny/prefs.yaml", [f"{k}={v}" for k, v in prefs.items()]))


def test_a_scoring_judge_ranks_each_answer_by_how_many_score_higher():
    """A ranking is each answer's rank (0 = best), the convention of Oracle.rank, parse_ranking,
    GRPO_rank and make-prefs, not the answers listed best first: the two differ whenever the order is
    not its own inverse, as here."""
    from vlmalign.feedback.judges import _scored_judgment, _Task

    task = _Task("rank", "reward.rank", "", None, "key", 4)
    # answer 2 scores highest and answer 0 lowest: best first [2, 3, 1, 0], ranks [3, 2, 0, 1]
    assert _scored_judgment("judge", task, [-1.0, 0.5, 2.0, 1.0], "rewards", "rm").value == [3, 2, 0, 1]
    assert _scored_judgment("judge", task, [1.0, 1.0, 3.0, 0.0], "rewards", "rm").value == [1, 1, 0, 3]  # a tie shares
