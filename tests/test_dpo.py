"""DPO trainer and the iterative (ISR-DPO) loop on the 12-video benchmark with a tiny model."""

import json
import math

import pytest
import torch
from safetensors.torch import load_file

from vlmalign.config import DPOConfig, QuantizationConfig, load_config
from vlmalign.data.formats import read_instructions, write_jsonl
from vlmalign.errors import ConfigError, DataError
from vlmalign.feedback.oracle import Oracle
from vlmalign.model.policy import load_model
from vlmalign.train import dpo

TINY_DPO = "configs/tiny/dpo.yaml"


@pytest.fixture(scope="module")
def oracle_pairs(tiny_bench, tmp_path_factory):
    """Chosen = the oracle's correct answer, rejected = the correct answer to another question."""
    oracle = Oracle.from_dir(tiny_bench)
    samples = read_instructions(tiny_bench / "sft_easy.json")[:48]
    rows = []
    for i, s in enumerate(samples):
        question = s.turns[0].text
        other = samples[(i + 7) % len(samples)]
        rows.append({"id": s.id, "video": s.video, "prompt": question,
                     "chosen": oracle.reference(s.video, question.replace("<video>", "").strip()),
                     "rejected": other.turns[1].text})
    path = tmp_path_factory.mktemp("prefs") / "pairs.jsonl"
    write_jsonl(path, rows)
    return path


def dpo_overrides(policy, pairs, run_dir, **extra):
    base = {
        "run.dir": str(run_dir), "run.progress": "false", "model.init_from": str(policy),
        "data.train": f"[{pairs}]", "data.feature_cache": str(run_dir.parent / "feature_cache"),
        "train.batch_size": "8", "train.epochs": "1", "train.log_every": "1", "train.lr": "1e-3",
    }
    base.update(extra)
    return [f"{k}={v}" for k, v in base.items()]


def _metrics(run_dir):
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def test_dpo_starts_at_log2_and_learns_the_preferences(tiny_policy, oracle_pairs, tmp_path):
    run_dir = tmp_path / "dpo"
    extra = {"train.epochs": "3", "dpo.beta": "1.0", "dpo.sft_weight": "0", "train.scheduler": "constant", "train.lr": "2e-3"}
    final = dpo.run(load_config(DPOConfig, TINY_DPO, dpo_overrides(tiny_policy, oracle_pairs, run_dir, **extra)))
    metrics = _metrics(run_dir)
    # the reference is the starting policy, so the first step's margin is 0 and the loss log 2
    assert metrics[0]["loss"] == pytest.approx(math.log(2), abs=1e-4)
    assert metrics[0]["reward_margin"] == pytest.approx(0.0, abs=1e-4)
    last_epoch = metrics[-6:]
    # (some rejected answers happen to be right too, so the loss cannot reach 0)
    assert sum(m["loss"] for m in last_epoch) / 6 < 0.75 * math.log(2)
    assert sum(m["accuracy"] for m in last_epoch) / 6 > 0.75 and all(m["reward_margin"] > 0 for m in last_epoch)
    ref = load_file(run_dir / "reference_logps.safetensors")["logps"]
    assert ref.shape == (48, 2) and bool((ref < 0).all())
    assert (final / "model.json").is_file()


def test_qlora_dpo_trains_an_adapter_on_a_4bit_base(tiny_policy, oracle_pairs, tmp_path):
    """The QLoRA recipe (nf4 base + LoRA, as configs/vlm_rlaif/ppo_7b.yaml) through a real stage, on CPU."""
    bnb = pytest.importorskip("bitsandbytes", reason="QLoRA needs the optional bitsandbytes extra (pip install -e '.[qlora]')")
    run_dir = tmp_path / "qlora"
    extra = {"train.epochs": "3", "dpo.beta": "1.0", "dpo.sft_weight": "0", "train.scheduler": "constant", "train.lr": "1e-2",
             "model.lora.enabled": "true", "model.lora.r": "8", "model.quantization.load_in_4bit": "true",
             "model.quantization.compute_dtype": "float32"}
    final = dpo.run(load_config(DPOConfig, TINY_DPO, dpo_overrides(tiny_policy, oracle_pairs, run_dir, **extra)))
    metrics = _metrics(run_dir)
    # the reference is the quantised start (the adapter begins at zero), so the first loss is log 2
    assert metrics[0]["loss"] == pytest.approx(math.log(2), abs=1e-4)
    assert sum(m["loss"] for m in metrics[-6:]) / 6 < 0.9 * math.log(2)
    assert (final / "adapter").is_dir() and not (final / "llm").exists()  # the base is referenced, not copied
    loaded = load_model(final, quantization=QuantizationConfig(load_in_4bit=True, compute_dtype="float32"))
    assert any(isinstance(m, bnb.nn.Linear4bit) for m in loaded.llm.modules())


def test_dpo_sft_term_and_loss_types_run(tiny_policy, oracle_pairs, tmp_path):
    for loss_type in ("ipo", "hinge"):
        run_dir = tmp_path / loss_type
        cfg = load_config(DPOConfig, TINY_DPO, dpo_overrides(
            tiny_policy, oracle_pairs, run_dir, **{"dpo.loss_type": loss_type, "dpo.sft_weight": "0.5", "train.max_steps": "2"}))
        dpo.run(cfg)
        first = _metrics(run_dir)[0]["loss"]
        # at step 0 the margin is 0: ipo = (1/(2 beta))^2 = 25, hinge = 1, plus the SFT term (> 0)
        assert first > {"ipo": 25.0, "hinge": 1.0}[loss_type]


def test_interrupted_dpo_resumes_to_the_same_weights(tiny_policy, oracle_pairs, tmp_path, monkeypatch, kill_at_step):
    extra = {"train.save_every": "2", "train.max_steps": "5"}
    straight = tmp_path / "straight"
    dpo.run(load_config(DPOConfig, TINY_DPO, dpo_overrides(tiny_policy, oracle_pairs, straight, **extra)))

    resumed = tmp_path / "resumed"
    cfg = load_config(DPOConfig, TINY_DPO, dpo_overrides(tiny_policy, oracle_pairs, resumed, **extra))
    kill_at_step(4)
    with pytest.raises(KeyboardInterrupt):
        dpo.run(cfg)
    monkeypatch.undo()
    assert not (resumed / "final").exists()
    dpo.run(cfg)
    a = load_file(straight / "final" / "llm" / "model.safetensors")
    b = load_file(resumed / "final" / "llm" / "model.safetensors")
    for name in a:
        assert torch.equal(a[name], b[name]), name


def test_dpo_input_errors(tiny_policy, oracle_pairs, tmp_path):
    with pytest.raises(ConfigError, match="model.init_from"):
        dpo.run(load_config(DPOConfig, TINY_DPO, dpo_overrides(tiny_policy, oracle_pairs, tmp_path / "a", **{"model.init_from": "null"})))
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    with pytest.raises(DataError, match="no preference pairs"):
        dpo.run(load_config(DPOConfig, TINY_DPO, dpo_overrides(tiny_policy, empty, tmp_path / "b")))


def isr_overrides(policy, bench, run_dir, **extra):
    base = {
        "run.dir": str(run_dir), "run.progress": "false", "model.init_from": str(policy),
        "data.feature_cache": str(run_dir.parent / "feature_cache"),
        "loop.iterations": "3", "loop.questions": f"[{bench}/sft_easy.json]", "loop.limit": "16",
        "loop.sampling.max_new_tokens": "6", "loop.sampling.batch_size": "16",
        "loop.judge.backend": "oracle", "loop.judge.bench": str(bench),
        "loop.preferences.oracle": str(bench), "loop.context_mode": "retrospective",
        "loop.eval_qa": str(bench / "qa_test.json"), "loop.eval_limit": "8",
        "train.batch_size": "8", "train.log_every": "1", "train.lr": "1e-3",
    }
    base.update(extra)
    return [f"{k}={v}" for k, v in base.items()]


def test_interrupted_iterative_dpo_redoes_no_finished_iteration(tiny_policy, tiny_bench, tmp_path, monkeypatch):
    run_dir = tmp_path / "isr"
    cfg = load_config(DPOConfig, "configs/tiny/isr_dpo.yaml", isr_overrides(tiny_policy, tiny_bench, run_dir))
    real_train = dpo.train
    trained = []

    def crash_in_iteration_two(it_cfg, pairs):
        trained.append(it_cfg.run.dir)
        if it_cfg.run.dir.endswith("iter-02"):
            raise KeyboardInterrupt  # killed while training iteration 2
        return real_train(it_cfg, pairs)

    monkeypatch.setattr(dpo, "train", crash_in_iteration_two)
    with pytest.raises(KeyboardInterrupt):
        dpo.run(cfg)
    first_samples = (run_dir / "iter-01" / "samples.jsonl").read_text()
    second_samples = (run_dir / "iter-02" / "samples.jsonl").read_text()
    monkeypatch.setattr(dpo, "train", lambda it_cfg, pairs: trained.append(it_cfg.run.dir) or real_train(it_cfg, pairs))
    dpo.run(cfg)  # the same command again
    assert [p.rsplit("/", 1)[1] for p in trained] == ["iter-01", "iter-02", "iter-02", "iter-03"]
    assert (run_dir / "iter-01" / "samples.jsonl").read_text() == first_samples
    assert (run_dir / "iter-02" / "samples.jsonl").read_text() == second_samples  # reused, not resampled
    summary = json.loads((run_dir / "summary.json").read_text())
    assert [s["iteration"] for s in summary] == [1, 2, 3]
    for s in summary:
        assert s["pairs"] > 0 and s["length_ratio"] > 0 and "oracle_agreement" in s and 0 <= s["eval"]["all"] <= 1
        assert s["context"] == cfg.loop.context_mode == "retrospective"  # the mode that wrote the contexts
    # iteration t+1 starts from iteration t's policy
    assert summary[1]["policy_in"] == summary[0]["policy_out"]
    # retrospective contexts: one per video, rewritten from the previous iteration's
    first_ctx = json.loads((run_dir / "iter-01" / "contexts.json").read_text())["contexts"]
    second_ctx = json.loads((run_dir / "iter-02" / "contexts.json").read_text())["contexts"]
    assert first_ctx.keys() == second_ctx.keys() and len(first_ctx) > 1


def test_an_iteration_without_pairs_keeps_its_policy(tiny_policy, tiny_bench, tmp_path, monkeypatch):
    """A judge that prefers no answer of any pair (the oracle on equally scored answers) leaves an
    iteration nothing to learn: the policy goes on unchanged instead of the loop dying there."""
    run_dir = tmp_path / "isr"
    cfg = load_config(DPOConfig, "configs/tiny/isr_dpo.yaml",
                      isr_overrides(tiny_policy, tiny_bench, run_dir, **{"loop.iterations": "2", "loop.eval_qa": "null"}))
    from vlmalign.feedback import preferences

    real = preferences.make_preferences

    def no_pairs_in_iteration_one(prefs_cfg, *args, **kwargs):
        path, stats = real(prefs_cfg, *args, **kwargs)
        if path.parent.name == "iter-01":
            path.write_text("")
            stats = {**stats, "pairs": 0, "dropped": {"tie": stats["questions"]}}
        return path, stats

    monkeypatch.setattr(preferences, "make_preferences", no_pairs_in_iteration_one)
    final = dpo.run(cfg)
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary[0]["pairs"] == 0 and summary[0]["policy_out"] == str(tiny_policy)
    assert summary[1]["policy_in"] == str(tiny_policy) and summary[1]["pairs"] > 0
    assert final == run_dir / "iter-02" / "final" and not (run_dir / "iter-01" / "final").exists()
    assert dpo.run(cfg) == final  # a re-run finds both iterations done
