"""Reward model and its trainer on the 12-video benchmark with a tiny model."""

import json

import pytest
import torch

from vlmalign.cli import main
from vlmalign.config import RMConfig, load_config
from vlmalign.data.collate import Collator
from vlmalign.data.features import VisualInputs
from vlmalign.errors import ConfigError
from vlmalign.feedback.oracle import Oracle
from vlmalign.model.reward import build_reward_model, load_reward_model, score_samples
from vlmalign.prompts import load_prompt
from vlmalign.train import rm

pytestmark = pytest.mark.usefixtures("one_thread")

TINY_RM = "configs/tiny/rm.yaml"


@pytest.fixture(scope="module")
def rlaif_pairs(tiny_bench, tmp_path_factory):
    """VLM-RLAIF pair records: the oracle's correct answer against the answer to the next question of
    another type (a count for a colour question, ...), in a random output_1 / output_2 order."""
    oracle = Oracle.from_dir(tiny_bench)
    records = json.loads((tiny_bench / "sft_easy.json").read_text())
    gen = torch.Generator().manual_seed(0)
    rows = []
    for i, r in enumerate(records):
        question = r["conversations"][0]["value"]
        good = oracle.reference(str(tiny_bench / r["video"]), question.replace("<video>", "").strip())
        other = next(o for o in records[i + 1 :] + records[:i] if o["question_type"] != r["question_type"])
        first = int(torch.randint(2, (1,), generator=gen))
        outputs = (good, other["conversations"][1]["value"])[:: 1 if first == 0 else -1]
        rows.append({"id": r["id"], "video": str(tiny_bench / r["video"]), "conversations": r["conversations"][:1],
                     "output_1": {"value": outputs[0]}, "output_2": {"value": outputs[1]}, "preference": first + 1})
    path = tmp_path_factory.mktemp("pairs") / "rm_pairs.json"
    path.write_text(json.dumps(rows))
    return path


def rm_overrides(policy, pairs, run_dir, **extra):
    base = {
        "run.dir": str(run_dir), "run.progress": "false", "model.init_from": str(policy),
        "data.train": f"[{pairs}]", "data.feature_cache": str(run_dir.parent / "feature_cache"),
        "rm.eval_fraction": "0.25", "rm.eval_every": "5", "train.batch_size": "8", "train.epochs": "1",
        "train.log_every": "1", "train.lr": "3e-4", "train.warmup_ratio": "0.0", "train.scheduler": "constant",
    }
    base.update(extra)
    return [f"{k}={v}" for k, v in base.items()]


def _metrics(run_dir):
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def test_reward_model_learns_oracle_preferences(tiny_policy, rlaif_pairs, tmp_path):
    run_dir = tmp_path / "rm"
    final = rm.run(load_config(RMConfig, TINY_RM, rm_overrides(tiny_policy, rlaif_pairs, run_dir, **{"train.epochs": "6"})))
    metrics = _metrics(run_dir)
    train = [m for m in metrics if "loss" in m]
    evals = [m for m in metrics if "eval_accuracy" in m]
    # 39 train pairs in batches of 8 for 6 epochs; held-out evaluations at steps 0, 5, ..., 30
    assert [m["step"] for m in evals] == list(range(0, 31, 5)) and train[-1]["step"] == 30
    assert evals[0]["eval_pairs"] == 13

    def mean(rows, key):
        return sum(m[key] for m in rows) / len(rows)

    first, last = train[:5], train[-10:]
    assert mean(last, "loss") < 0.8 * mean(first, "loss")
    assert mean(last, "accuracy") > max(0.8, mean(first, "accuracy") + 0.1)
    # On 13 held-out pairs the accuracy moves in steps of 1/13; the held-out loss is the steadier sign.
    assert evals[0]["eval_loss"] == pytest.approx(0.693, abs=0.01)  # zero-bias head: rewards start nearly equal
    assert evals[-1]["eval_loss"] < 0.9 * evals[0]["eval_loss"] and evals[-1]["eval_margin"] > 0
    assert json.loads((run_dir / "eval.json").read_text())["eval_accuracy"] == evals[-1]["eval_accuracy"]
    assert (final / "value_head.safetensors").is_file() and (final / "model.json").is_file()
    # the evaluation prompt travels with the model
    assert load_reward_model(final).evaluation_prompt == load_prompt("reward.evaluate").render()


@pytest.mark.parametrize("lora", [False, True])
def test_saved_reward_model_gives_identical_rewards(tiny_policy, rlaif_pairs, tiny_bench, tmp_path, lora):
    cfg = load_config(RMConfig, TINY_RM, rm_overrides(tiny_policy, rlaif_pairs, tmp_path / "unused",
                                                      **{"model.lora.enabled": str(lora).lower(), "model.lora.r": "4"}))
    torch.manual_seed(1)
    model = build_reward_model(cfg.model, "Is this answer right?", "test@v0").eval()
    with torch.no_grad():
        model.head.bias.fill_(0.5)  # a non-zero bias must survive the round trip too
    pairs = rm.read_pairs([str(rlaif_pairs)], None)[:6]
    samples = [s for pair in rm.encode_pairs(model, pairs, 384) for s in pair]
    collate = Collator(model.backbone, model.backbone.visual_inputs(str(tmp_path / "cache")))
    before = score_samples(model, collate, samples, batch_size=4)
    model.save_pretrained(tmp_path / "saved")
    assert (tmp_path / "saved" / ("adapter" if lora else "llm")).is_dir()
    loaded = load_reward_model(tmp_path / "saved")
    assert loaded.evaluation_prompt == "Is this answer right?" and loaded.prompt_id == "test@v0"
    assert not any(p.requires_grad for p in loaded.parameters())
    torch.testing.assert_close(score_samples(loaded, collate, samples, batch_size=3), before, rtol=0, atol=1e-5)
    trainable = load_reward_model(tmp_path / "saved", trainable=True)
    assert trainable.head.weight.requires_grad and trainable.training
    torch.testing.assert_close(score_samples(trainable, collate, samples, batch_size=6), before, rtol=0, atol=1e-5)


def test_held_out_pairs_never_share_a_question_with_trained_ones():
    """Several pairs per question (every good answer against every poor one): the split draws
    questions, so a held-out pair's question is never trained on; one pair per question splits as
    a draw of pairs."""
    from vlmalign.data.formats import PreferencePair

    pairs = [PreferencePair(f"q{q}", None, "what?", f"good {k}", "poor") for q in range(20) for k in range(q % 4 + 1)]
    train, held = rm.split_pairs(pairs, 0.25, seed=3)
    assert len(train) + len(held) == len(pairs) and {p.id for p in train}.isdisjoint({p.id for p in held})
    assert len({p.id for p in held}) == 5  # a quarter of the 20 questions, with all their pairs
    assert all(sum(p.id == h.id for p in held) == int(h.id[1:]) % 4 + 1 for h in held)
    single = [PreferencePair(f"q{q}", None, "what?", "good", "poor") for q in range(40)]
    order = torch.randperm(40, generator=torch.Generator().manual_seed(3)).tolist()[:10]
    assert [p.id for p in rm.split_pairs(single, 0.25, seed=3)[1]] == [f"q{i}" for i in sorted(order)]


def test_reward_model_input_ends_with_the_evaluation_turn(tiny_policy, tmp_path):
    cfg = load_config(RMConfig, TINY_RM, [f"model.init_from={tiny_policy}"])
    model = build_reward_model(cfg.model, "Judge the answer .", "test@v0")
    tok = model.tokenizer
    enc = model.encode("What colour is the square?", "It is red.", "clip.mp4", 384)
    tail = tok("USER: Judge the answer . ASSISTANT:", add_special_tokens=False).input_ids
    assert enc.input_ids[-len(tail):] == tail
    assert enc.input_ids.index(tok.eos_token_id) == len(enc.input_ids) - len(tail) - 1  # the answer's EOS, then the turn
    assert all(label == -100 for label in enc.labels)
    # a long answer is cut, never the evaluation turn
    cut = model.encode("What colour is the square?", " ".join(["red"] * 500), "clip.mp4", 200)
    assert len(cut.input_ids) == 200 and cut.input_ids[-len(tail):] == tail


def test_reward_model_input_errors(tiny_policy, rlaif_pairs, tmp_path, capsys):
    with pytest.raises(ConfigError, match="model.init_from"):
        rm.run(load_config(RMConfig, TINY_RM, rm_overrides(tiny_policy, rlaif_pairs, tmp_path / "a", **{"model.init_from": "null"})))
    with pytest.raises(ConfigError, match="rm.eval_fraction"):
        rm.run(load_config(RMConfig, TINY_RM, rm_overrides(tiny_policy, rlaif_pairs, tmp_path / "b", **{"rm.eval_fraction": "1.5"})))
    with pytest.raises(ConfigError, match="rm.center_coef"):
        load_config(RMConfig, TINY_RM, ["rm.centre_coef=0.1"])
    with pytest.raises(ConfigError, match="not a reward model directory"):
        load_reward_model(tiny_policy)
    assert main(["train-rm", "--config", TINY_RM, "--set", "data.train=[]", "--set", f"run.dir={tmp_path / 'c'}"]) == 2
    assert "error: data.train" in capsys.readouterr().err
