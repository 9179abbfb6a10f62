"""The demo / replication pipeline end to end on a 12-video benchmark (slow: marked e2e)."""

import json

import pytest

from vlmalign.pipeline import STAGES, Budget, run_pipeline


@pytest.mark.e2e
def test_every_stage_runs_from_one_sft_start_and_reports(tmp_path):
    budget = Budget(videos=12, sft_epochs=2, judge_data=False, self_judge=False, judge_questions=6, rm_questions=16,
                    ppo_rollouts=2, dpo_questions=16, isr_iterations=1, isr_questions=8, grpo_rollouts=2, eval_limit=8)
    results = run_pipeline(tmp_path / "out", budget, stages=STAGES, with_init=True)
    table = (tmp_path / "out" / "results.md").read_text()
    assert "SFT (start of every method)" in table and "untrained" in table
    for stage in STAGES:  # each stage either reports or says why it could not
        assert stage in results or stage in results.get("failed", {})
    for name in ("ppo", "grpo"):
        assert name in results, results.get("failed")
    assert set(results["grpo"]) == {"grpo_rank", "grpo"}
    assert json.loads((tmp_path / "out" / "results.json").read_text())["budget"]["videos"] == 12
    # a second run reuses everything: no stage trains again
    again = run_pipeline(tmp_path / "out", budget, stages=STAGES, with_init=True)
    assert again["sft_eval"] == results["sft_eval"] and again["grpo"] == results["grpo"]
