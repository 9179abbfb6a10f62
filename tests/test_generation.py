import pytest
import torch

from tests.conftest import tiny_model_overrides
from vlmalign.config import SFTConfig, load_config
from vlmalign.data.collate import pad_sequences
from vlmalign.losses import token_logps
from vlmalign.model.generation import GenerationConfig, _pick, sample_tokens
from vlmalign.model.policy import build_model

QUESTIONS = ["<video>\nwhat colour is the red square?", "<video>\nhow many objects?"]


@pytest.fixture
def model(word_corpus):
    torch.manual_seed(0)
    m = build_model(load_config(SFTConfig, "configs/tiny/sft.yaml", tiny_model_overrides(word_corpus)).model)
    return m.eval()


def _prompts(model, questions=QUESTIONS):
    ids = [model.encode_prompt(q) for q in questions]
    input_ids = pad_sequences(ids, model.tokenizer.pad_token_id, side="left")
    mask = pad_sequences([[1] * len(i) for i in ids], 0, side="left")
    feats = torch.randn(len(ids), 16, 64, 64, generator=torch.Generator().manual_seed(1))
    return input_ids, mask, feats


def test_greedy_decoding_matches_transformers_generate(model):
    input_ids, mask, feats = _prompts(model)
    assert (mask == 0).any()  # the batch is really left-padded
    ours, _, lengths = sample_tokens(model, input_ids, mask, {"features": feats}, GenerationConfig(max_new_tokens=10))
    theirs = model.generate(input_ids, mask, feats, max_new_tokens=10, do_sample=False)
    for row in range(len(QUESTIONS)):
        n = int(lengths[row])
        assert ours[row, :n].tolist() == theirs[row, :n].tolist()


@pytest.mark.parametrize("questions", [QUESTIONS, QUESTIONS[:1]], ids=["left-padded", "one length, decoded unmasked"])
def test_recorded_logps_are_the_policy_logps_of_the_sampled_tokens(model, questions):
    """What PPO/GRPO use as old log-probs must equal a teacher-forced forward pass."""
    input_ids, mask, feats = _prompts(model, questions)
    assert bool((mask == 0).any()) == (len(questions) > 1)
    g = 3
    gen = GenerationConfig(max_new_tokens=8, do_sample=True, temperature=0.7, top_p=0.9, num_return_sequences=g)
    tokens, logps, lengths = sample_tokens(model, input_ids, mask, {"features": feats}, gen, torch.Generator().manual_seed(0))
    assert tokens.shape[0] == len(questions) * g
    # sampling keeps no autograd graph, though the model trains (a graph per decoding step would
    # cost a 7B rollout its memory)
    assert any(p.requires_grad for p in model.parameters()) and not logps.requires_grad
    full = torch.cat([input_ids.repeat_interleave(g, 0), tokens], 1)
    new_mask = torch.arange(tokens.shape[1])[None] < lengths[:, None]
    full_mask = torch.cat([mask.repeat_interleave(g, 0), new_mask.long()], 1)
    labels = full.masked_fill(full_mask == 0, -100)
    labels[:, : input_ids.shape[1]] = -100
    positions = (full_mask.cumsum(-1) - 1).clamp(min=0)
    with torch.no_grad():
        logits = model.llm(
            inputs_embeds=model.embed(full, feats.repeat_interleave(g, 0)), attention_mask=full_mask, position_ids=positions
        ).logits
    forward, counted = token_logps(logits, labels)
    forward = forward[:, input_ids.shape[1] - 1 :]
    torch.testing.assert_close(forward * new_mask, logps * new_mask, rtol=0, atol=1e-4)
    assert int(counted.sum()) == int(lengths.sum())


def test_the_video_prompt_is_run_once_and_shared_by_its_samples(model):
    input_ids, mask, feats = _prompts(model)
    prefill_rows = []

    def record(_module, args, kwargs):
        if kwargs.get("inputs_embeds") is not None:
            prefill_rows.append(kwargs["inputs_embeds"].shape[0])

    handle = model.llm.register_forward_pre_hook(record, with_kwargs=True)
    try:
        gen = GenerationConfig(max_new_tokens=4, do_sample=True, num_return_sequences=5)
        tokens, _, _ = sample_tokens(model, input_ids, mask, {"features": feats}, gen, torch.Generator().manual_seed(0))
    finally:
        handle.remove()
    assert prefill_rows == [2]  # one prefill of the 2 prompts, not of 10 copies
    assert tokens.shape[0] == 10


def test_sampling_is_reproducible_for_a_seed_and_samples_differ(model):
    input_ids, mask, feats = _prompts(model)
    gen = GenerationConfig(max_new_tokens=8, do_sample=True, temperature=1.5, num_return_sequences=4)
    a = sample_tokens(model, input_ids, mask, {"features": feats}, gen, torch.Generator().manual_seed(3))[0]
    b = sample_tokens(model, input_ids, mask, {"features": feats}, gen, torch.Generator().manual_seed(3))[0]
    assert torch.equal(a, b)
    assert len({tuple(row.tolist()) for row in a[:4]}) > 1


def test_top_p_keeps_the_smallest_set_reaching_p():
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]]))
    gen = GenerationConfig(do_sample=True, top_p=0.75)
    draws = {int(_pick(logits, gen, torch.Generator().manual_seed(s))) for s in range(200)}
    assert draws == {0, 1}  # 0.5 < 0.75 so token 1 is needed; 0.8 >= 0.75 so token 2 is not
    gen.top_p = 0.01
    assert {int(_pick(logits, gen, torch.Generator().manual_seed(s))) for s in range(20)} == {0}


def test_generate_command_seed_repeats_samples_and_prints_no_warnings(tiny_policy, tiny_bench):
    """`vlmalign generate --sample --seed N` gives the same answers on every run, another seed others;
    the command prints no library warnings (DeepSpeed's CPU notice, transformers' cache rename)."""
    import json
    import subprocess
    import sys

    video = tiny_bench / json.loads((tiny_bench / "qa_test.json").read_text())[0]["video_name"]

    def answers(seed):
        res = subprocess.run([sys.executable, "-m", "vlmalign.cli", "generate", "--model", str(tiny_policy), "--video",
                              str(video), "--question", "What colour is the square?", "--sample", "--max-new-tokens", "8",
                              "--num-return-sequences", "6", "--seed", str(seed)], capture_output=True, text=True, timeout=300)
        assert res.returncode == 0, res.stderr
        assert "warn" not in res.stderr.lower(), res.stderr
        return json.loads(res.stdout)["answers"]

    first = answers(1)
    assert answers(1) == first and answers(2) != first
