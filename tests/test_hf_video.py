"""HF video models (Qwen2-VL, Qwen2.5-VL) behind the policy interface: tiny random checkpoints saved
to disk and loaded through `from_pretrained`, as a hub checkpoint would be."""

import json
import math
import shutil

import numpy as np
import pytest
import torch

from vlmalign.config import DPOConfig, GRPOConfig, LoraConfig, ModelConfig, SFTConfig, load_config
from vlmalign.data.collate import Collator, EncodedSample
from vlmalign.data.formats import Turn, read_instructions, write_jsonl
from vlmalign.data.template import IGNORE_INDEX
from vlmalign.errors import ConfigError, DataError
from vlmalign.losses import token_logps
from vlmalign.model.generation import GenerationConfig, sample_answers
from vlmalign.model.hf_video import HFVideoLM, save_tiny_hf_video
from vlmalign.model.policy import build_model, load_model
from vlmalign.model.tokenizer import corpus_words

pytestmark = pytest.mark.usefixtures("one_thread")
ARCHITECTURES = ["Qwen2_5_VLForConditionalGeneration", "Qwen2VLForConditionalGeneration"]
FRAMES = ["model.num_frames=4", "model.frame_size=[56,56]", "model.train_projector=false", "data.max_length=512",
          "data.feature_cache=null", "run.progress=false"]


@pytest.fixture(scope="module", params=ARCHITECTURES)
def checkpoint(request, tiny_bench, tmp_path_factory):
    words = corpus_words([tiny_bench / "sft_mix.json", tiny_bench / "judge_train.json"])
    return save_tiny_hf_video(tmp_path_factory.mktemp("hf") / "ckpt", words, request.param)


@pytest.fixture(scope="module")
def qwen25(tiny_bench, tmp_path_factory):
    words = corpus_words([tiny_bench / "sft_mix.json", tiny_bench / "judge_train.json"])
    return save_tiny_hf_video(tmp_path_factory.mktemp("qwen25") / "ckpt", words)


def policy(path, **cfg) -> HFVideoLM:
    torch.manual_seed(0)
    return build_model(ModelConfig(**{"init_from": str(path), "num_frames": 4, "frame_size": [56, 56],
                                      "train_projector": False, **cfg}))


def test_frames_are_the_image_processors_patches(qwen25):
    """A video of two equal frames is one temporal patch of a still image: our patches and grid
    equal those of transformers' own Qwen2-VL image processor (its PIL backend) for that image."""
    from PIL import Image
    from transformers import Qwen2VLImageProcessorPil

    frame = np.random.default_rng(0).integers(0, 256, (56, 56, 3), dtype=np.uint8)
    model = policy(qwen25, num_frames=2)
    ours = model.frames(np.stack([frame, frame]))
    theirs = Qwen2VLImageProcessorPil()(images=[Image.fromarray(frame)], return_tensors="pt")
    assert ours["video_grid_thw"].tolist() == theirs["image_grid_thw"][0].tolist() == [1, 4, 4]
    torch.testing.assert_close(ours["pixel_values_videos"], theirs["pixel_values"].float(), rtol=0, atol=1e-5)
    assert model.num_visual_tokens == 4  # 1 x 4 x 4 patches, merged 2 x 2


def test_ids_are_the_chat_templates_and_labels_cover_the_answers(qwen25):
    model = policy(qwen25)
    turns = [Turn("user", "<video>\nwhat colour is the square?"), Turn("assistant", "red"),
             Turn("user", "and the circle?"), Turn("assistant", "blue")]
    enc = model.encode_conversation(turns, 512)
    template = model.tokenizer.apply_chat_template(model._messages(turns), tokenize=True, return_dict=False)
    pad = model.visual_slot_id
    assert template.count(pad) == 1
    assert enc.input_ids == [i for t in template for i in ([t] * model.num_visual_tokens if t == pad else [t])]
    learnt = [model.tokenizer.convert_ids_to_tokens(i) for i, label in zip(enc.input_ids, enc.labels) if label != IGNORE_INDEX]
    assert learnt == ["red", "<|im_end|>", "blue", "<|im_end|>"]
    prompt = model.encode_prompt("<video>\nwhat colour is the square?")
    assert prompt == enc.input_ids[: len(prompt)]  # the generation prompt is the conversation's start
    with pytest.raises(DataError, match="data.max_length is 20"):
        model.encode_conversation(turns, 20, sample_id="s1")
    late_video = [Turn("user", "what colour?"), Turn("assistant", "red"), Turn("user", "<video>\nand now?"),
                  Turn("assistant", "blue")]
    with pytest.raises(DataError, match="a video after token 24 .* would be cut"):
        model.encode_conversation(late_video, 24, sample_id="s2")
    model.tokenizer.eos_token = "<|image_pad|>"  # a checkpoint whose eos never ends a turn
    with pytest.raises(DataError, match="ends an answer without the tokenizer's eos token"):
        model.encode_conversation(turns, 512, sample_id="s3")


def test_checkpoints_pick_their_family_or_fail_in_one_line(qwen25, tmp_path):
    assert isinstance(load_model(qwen25), HFVideoLM)
    for arch, message in [("LlavaNextForConditionalGeneration", "not a video model vlmalign knows"),
                          ("Qwen3VLForConditionalGeneration", "does not train yet"),
                          ("SomethingNewForConditionalGeneration", "not a video model vlmalign knows")]:
        folder = tmp_path / arch
        folder.mkdir()
        (folder / "config.json").write_text(json.dumps({"architectures": [arch]}))
        with pytest.raises(ConfigError, match=f"{arch} .*{message}.*supported: Qwen2VLForConditionalGeneration"):
            build_model(ModelConfig(init_from=str(folder)))
    mismatched = tmp_path / "no-template"
    shutil.copytree(qwen25, mismatched)
    config = json.loads((mismatched / "tokenizer_config.json").read_text())
    config.pop("chat_template", None)
    (mismatched / "tokenizer_config.json").write_text(json.dumps(config))
    (mismatched / "chat_template.jinja").unlink(missing_ok=True)
    with pytest.raises(ConfigError, match="tokenizer does not match the model"):
        policy(mismatched)
    with pytest.raises(ConfigError, match=r"model.frame_size: \[50, 56\] must be multiples of 28"):
        build_model(ModelConfig(init_from=str(qwen25), num_frames=4, frame_size=[50, 56]))


def test_sampled_logprobs_equal_a_teacher_forced_pass(checkpoint, tiny_bench):
    """Shared-prefix sampling (one prefill with the video, its cache copied to the G samples, 3D
    positions continued by hand) records the log-probs a training forward pass gives."""
    model = policy(checkpoint).eval()
    visual = model.visual_inputs(None)
    samples = read_instructions(tiny_bench / "sft_easy.json")[:2]
    requests = [(s.video, s.turns[0].text + (" and say it twice" if i else "")) for i, s in enumerate(samples)]
    gen = GenerationConfig(max_new_tokens=6, do_sample=True, num_return_sequences=3)
    groups = sample_answers(model, visual, requests, gen, generator=torch.Generator().manual_seed(0))
    rows = [EncodedSample("", model.encode_prompt(q) + s.token_ids, [IGNORE_INDEX] * len(model.encode_prompt(q)) + s.token_ids, v)
            for (v, q), group in zip(requests, groups) for s in group]
    batch = Collator(model, visual)(rows)
    with torch.no_grad():
        logps, mask = token_logps(model(**model.model_inputs(batch, "cpu")).logits, batch["labels"])
    recorded = [s.token_logps for group in groups for s in group]
    for row, expected in enumerate(recorded):
        torch.testing.assert_close(logps[row][mask[row]], torch.tensor(expected), rtol=0, atol=2e-4)


@pytest.mark.parametrize("lora", [False, True])
def test_save_and_load_keep_the_logits(qwen25, tiny_bench, tmp_path, lora):
    model = policy(qwen25, lora=LoraConfig(enabled=lora, r=4, alpha=8, dropout=0.0))
    if lora:  # a trained adapter: move it off its zero start
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.data.normal_(0, 0.1)
    visual = model.visual_inputs(None)
    sample = read_instructions(tiny_bench / "sft_easy.json")[0]
    enc = model.encode_conversation(sample.turns, 512)
    batch = Collator(model, visual)([EncodedSample("s", enc.input_ids, enc.labels, sample.video)])
    model.eval()
    with torch.no_grad():
        before = model(**model.model_inputs(batch, "cpu")).logits
    model.save_pretrained(tmp_path / "saved")
    assert (tmp_path / "saved" / ("adapter" if lora else "hf")).is_dir()
    loaded = load_model(tmp_path / "saved")
    with torch.no_grad():
        after = loaded(**loaded.model_inputs(batch, "cpu")).logits
    torch.testing.assert_close(before, after, rtol=0, atol=1e-5)
    if lora:
        with torch.no_grad(), loaded.reference():
            start = loaded(**loaded.model_inputs(batch, "cpu")).logits
        assert not torch.allclose(start, after)  # the adapter off is the starting model


@pytest.mark.e2e
def test_every_stage_runs_and_lora_dpo_learns_on_a_tiny_qwen(qwen25, tiny_bench, tmp_path):
    """SFT, then LoRA DPO on oracle pairs (loss falls from log 2, margin rises), GRPO_rank and the
    synthetic evaluation, each through the same stage code as the VideoLM."""
    from vlmalign.eval.synthetic import evaluate_synthetic
    from vlmalign.feedback.oracle import Oracle
    from vlmalign.train import dpo, grpo_rank, sft

    sft_final = sft.run(load_config(SFTConfig, "configs/tiny/sft.yaml", FRAMES + [
        f"model.init_from={qwen25}", f"run.dir={tmp_path / 'sft'}", f"data.train=[{tiny_bench}/sft_easy.json]",
        "curriculum.criterion=none", "train.max_steps=2", "train.batch_size=4"]))
    assert isinstance(load_model(sft_final), HFVideoLM)

    oracle = Oracle.from_dir(tiny_bench)
    samples = read_instructions(tiny_bench / "sft_easy.json")[:16]
    rows = [{"id": s.id, "video": s.video, "prompt": s.turns[0].text,
             "chosen": oracle.reference(s.video, s.turns[0].text.replace("<video>", "").strip()),
             "rejected": samples[(i + 7) % len(samples)].turns[1].text} for i, s in enumerate(samples)]
    write_jsonl(tmp_path / "pairs.jsonl", rows)
    dpo_dir = tmp_path / "dpo"
    dpo_final = dpo.run(load_config(DPOConfig, "configs/tiny/dpo.yaml", FRAMES + [
        f"model.init_from={sft_final}", "model.lora.enabled=true", "model.lora.r=8", "model.lora.alpha=16",
        f"run.dir={dpo_dir}", f"data.train=[{tmp_path / 'pairs.jsonl'}]", "train.batch_size=4", "train.epochs=3",
        "train.lr=5e-3", "train.scheduler=constant", "dpo.sft_weight=0", "dpo.beta=1.0", "train.log_every=1"]))
    metrics = [json.loads(line) for line in (dpo_dir / "metrics.jsonl").read_text().splitlines()]
    assert metrics[0]["loss"] == pytest.approx(math.log(2), abs=1e-4)
    last = metrics[-4:]
    assert sum(m["loss"] for m in last) / 4 < 0.6 and sum(m["reward_margin"] for m in last) / 4 > 0.3

    for lora in ("true", "false"):  # the reference: the adapter switched off, or a frozen copy of the start
        grpo_dir = tmp_path / f"grpo-lora-{lora}"
        grpo_rank.run(load_config(GRPOConfig, "configs/tiny/grpo_rank.yaml", FRAMES + [
            f"model.init_from={dpo_final}", f"model.lora.enabled={lora}", "model.lora.r=4", f"run.dir={grpo_dir}",
            f"data.train=[{tiny_bench}/sft_easy.json]", f"judge.bench={tiny_bench}", "sampling.max_new_tokens=5",
            "grpo.rollout_batch=4", "grpo.mini_batch=10", "train.max_steps=1", "eval_qa=null"]))
        rollout = json.loads((grpo_dir / "metrics.jsonl").read_text().splitlines()[-1])
        assert -1 <= rollout["kendall_tau"] <= 1 and rollout["kl"] >= 0

    report = evaluate_synthetic(grpo_dir / "final", tiny_bench, tmp_path / "eval", limit=6, feature_cache=None, progress=False)
    assert report["results"]["all"]["n"] == 6


def test_sampling_never_picks_a_vision_marker(qwen25, tiny_bench):
    """A sampled answer holding <|video_pad|> would read as a second video in the training pass:
    even where the model favours it, sampling picks another token (its log-prob stays the model's)."""
    model = policy(qwen25).eval()
    with torch.no_grad():
        model.core.lm_head.weight[model.visual_slot_id] = model.core.lm_head.weight.abs().max() * 50
    sample = read_instructions(tiny_bench / "sft_easy.json")[0]
    groups = sample_answers(model, model.visual_inputs(None), [(sample.video, sample.turns[0].text)],
                            GenerationConfig(max_new_tokens=4, do_sample=True, num_return_sequences=2),
                            generator=torch.Generator().manual_seed(0))
    tokens = [t for s in groups[0] for t in s.token_ids]
    assert tokens and not set(tokens) & set(model.unsampled_token_ids)
    assert all(lp < -5 for s in groups[0] for lp in s.token_logps)  # the marker held almost all the mass


@pytest.mark.e2e
def test_the_gym_runs_on_a_tiny_qwen(tmp_path):
    """`vlmalign demo --family qwen2_5_vl` at a toy budget: every gym stage, the same code as the VideoLM's."""
    from vlmalign.gym import GymBudget, run_gym

    budget = GymBudget(videos=16, splits=(0.6, 0.1, 0.3), max_objects=1, sft_epochs=1, sft_batch_size=8, dpo_questions=8,
                       dpo_epochs=1, grpo_rollouts=1, eval_limit=4, methods=("dpo",), family="qwen2_5_vl")
    runs = run_gym(tmp_path / "gym", budget, [0], command="vlmalign demo --family qwen2_5_vl")
    assert set(runs[0]) >= {"ceiling", "start", "dpo", "dpo-control"} and "failed" not in runs[0]["dpo"]
    manifest = json.loads((tmp_path / "gym" / "seed-0" / "dpo" / "train" / "final" / "model.json").read_text())
    assert manifest["architecture"] == "Qwen2_5_VLForConditionalGeneration"


def test_narratives_and_retrospective_contexts_read_clips_of_the_video(qwen25, tiny_bench):
    """VLM-RLAIF's clip narratives and ISR-DPO's contexts on an HF policy: each clip is cut from the
    decoded frames and stretched back to num_frames, so it has the whole video's token count."""
    from vlmalign.feedback.context import narratives, retrospective_contexts

    model = policy(qwen25).eval()
    visual = model.visual_inputs(None)
    video = read_instructions(tiny_bench / "sft_easy.json")[0].video
    pieces = visual.clips(video, clips=3, max_clip_len=20)
    assert len(pieces) == 3 and all(p["video_grid_thw"].tolist() == [2, 4, 4] for p in pieces)
    assert not torch.equal(pieces[0]["pixel_values_videos"], pieces[2]["pixel_values_videos"])
    assert set(narratives(model, visual, [video], clips=3, max_new_tokens=3)) == {video}
    assert set(retrospective_contexts(model, visual, [video], {video: "a red square"}, max_new_tokens=3)) == {video}


def test_qlora_quantises_the_language_model_alone_and_its_adapter_learns(qwen25, tiny_bench, tmp_path):
    bnb = pytest.importorskip("bitsandbytes", reason="QLoRA needs the optional bitsandbytes extra (pip install -e '.[qlora]')")
    from vlmalign.config import QuantizationConfig

    quantization = QuantizationConfig(load_in_4bit=True, compute_dtype="float32")
    model = policy(qwen25, lora=LoraConfig(enabled=True, r=4, alpha=8, dropout=0.0), quantization=quantization)
    four_bit = [n for n, m in model.named_modules() if isinstance(m, bnb.nn.Linear4bit)]
    assert len(four_bit) == 2 * 7 and all("language_model" in n for n in four_bit)  # q k v o gate up down x 2 layers
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n for n in trainable)

    visual = model.visual_inputs(None)
    sample = read_instructions(tiny_bench / "sft_easy.json")[0]
    enc = model.encode_conversation(sample.turns, 512)
    batch = Collator(model, visual)([EncodedSample("s", enc.input_ids, enc.labels, sample.video)])
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    losses = []
    for _ in range(8):
        logps, mask = token_logps(model(**model.model_inputs(batch, "cpu")).logits, batch["labels"])
        loss = -(logps * mask).sum() / mask.sum()
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    assert losses[-1] < 0.8 * losses[0]

    model.eval()
    with torch.no_grad():
        before = model(**model.model_inputs(batch, "cpu")).logits
    model.save_pretrained(tmp_path / "qlora")
    loaded = load_model(tmp_path / "qlora", quantization=quantization)
    with torch.no_grad():
        after = loaded(**loaded.model_inputs(batch, "cpu")).logits
    torch.testing.assert_close(before, after, rtol=0, atol=1e-4)


def test_a_batch_may_hold_more_videos_than_a_row_has_tokens(checkpoint, tiny_bench):
    """The DPO stage of `vlmalign demo --family qwen2_5_vl` stacks 32 videos on rows of ~40 tokens:
    every row gets the positions (and logits) it gets alone."""
    model = policy(checkpoint).eval()
    visual = model.visual_inputs(None)
    sample = read_instructions(tiny_bench / "sft_easy.json")[0]
    enc = model.encode_conversation(sample.turns, 512)
    row = EncodedSample("s", enc.input_ids, enc.labels, sample.video)
    many = len(enc.input_ids) + 4
    with torch.no_grad():
        alone = model(**model.model_inputs(Collator(model, visual)([row]), "cpu")).logits
        stacked = model(**model.model_inputs(Collator(model, visual)([row] * many), "cpu")).logits
    torch.testing.assert_close(stacked[-1], alone[0], rtol=0, atol=1e-4)


def test_reward_model_reads_the_chat_template_and_keeps_its_scores(qwen25, tiny_bench, tmp_path):
    """A reward model on an HF policy: its input is the chat template's rendering of the question,
    the answer and the evaluation prompt as one more user turn, ready for the assistant's reply; a
    long answer is cut, never that turn; scores do not depend on the batch's padding and survive
    save and load."""
    from vlmalign.model.reward import build_reward_model, load_reward_model, score_samples

    torch.manual_seed(0)
    model = build_reward_model(ModelConfig(init_from=str(qwen25), num_frames=4, frame_size=[56, 56]),
                               "Is the answer right?", "test@v0").eval()
    with torch.no_grad():
        model.head.weight.normal_(0, 1.0)
        model.head.bias.fill_(0.5)
    backbone, tok = model.backbone, model.tokenizer
    sample = read_instructions(tiny_bench / "sft_easy.json")[0]
    question, answer = sample.turns[0].text, sample.turns[1].text
    enc = model.encode(question, answer, sample.video, 512)
    messages = [{"role": "user", "content": [{"type": "video"}, {"type": "text", "text": question.replace("<video>", "").strip()}]},
                {"role": "assistant", "content": [{"type": "text", "text": answer}]},
                {"role": "user", "content": [{"type": "text", "text": "Is the answer right?"}]}]

    def template_ids(messages, generation_prompt):
        ids = tok.apply_chat_template(messages, tokenize=True, add_generation_prompt=generation_prompt, return_dict=True)
        return [i for t in ids["input_ids"] for i in ([t] * backbone.num_visual_tokens if t == backbone.visual_slot_id else [t])]

    expected = template_ids(messages, True)
    assert enc.input_ids == expected and set(enc.labels) == {IGNORE_INDEX}
    long = model.encode(question, " ".join(["red"] * 400), sample.video, 120)
    tail = expected[len(template_ids(messages[:2], False)):]  # the evaluation turn and the assistant's header
    assert tok.decode(tail).count("is the answer right?") == 1  # (the tiny word tokenizer lowercases)
    assert len(long.input_ids) == 120 and long.input_ids[-len(tail):] == tail

    samples = read_instructions(tiny_bench / "sft_easy.json")[:4]
    rows = [model.encode(s.turns[0].text, s.turns[1].text * (1 + i), s.video, 512, f"s{i}") for i, s in enumerate(samples)]
    collate = Collator(backbone, backbone.visual_inputs(None))
    batched = score_samples(model, collate, rows, batch_size=4)
    alone = torch.cat([score_samples(model, collate, [row], batch_size=1) for row in rows])
    torch.testing.assert_close(batched, alone, rtol=0, atol=1e-4)
    assert batched.std() > 0
    model.save_pretrained(tmp_path / "rm")
    torch.testing.assert_close(score_samples(load_reward_model(tmp_path / "rm"), collate, rows, batch_size=3), batched,
                               rtol=0, atol=1e-5)


@pytest.mark.e2e
def test_reward_model_and_ppo_train_a_tiny_qwen(qwen25, tiny_bench, tmp_path):
    """VLM-RLAIF's RM + PPO on an HF policy through the VideoLM's stage code: the reward model learns
    oracle pairs (loss falls from log 2), PPO's value model starts as its copy, and the policy moves."""
    from safetensors.torch import load_file

    from vlmalign.config import PPOConfig, RMConfig
    from vlmalign.feedback.oracle import Oracle
    from vlmalign.train import ppo, rm

    oracle = Oracle.from_dir(tiny_bench)
    samples = read_instructions(tiny_bench / "sft_easy.json")[:16]
    rows = [{"id": s.id, "video": s.video, "prompt": s.turns[0].text,
             "chosen": oracle.reference(s.video, s.turns[0].text.replace("<video>", "").strip()),
             "rejected": samples[(i + 7) % len(samples)].turns[1].text} for i, s in enumerate(samples)]
    write_jsonl(tmp_path / "pairs.jsonl", rows)
    rm_dir = tmp_path / "rm"
    rm_final = rm.run(load_config(RMConfig, "configs/tiny/rm.yaml", FRAMES + [
        f"model.init_from={qwen25}", f"run.dir={rm_dir}", f"data.train=[{tmp_path / 'pairs.jsonl'}]", "rm.eval_fraction=0.0",
        "train.batch_size=8", "train.epochs=10", "train.lr=1e-3", "train.log_every=1", "train.scheduler=constant"]))
    metrics = [json.loads(line) for line in (rm_dir / "metrics.jsonl").read_text().splitlines() if "loss" in line]
    assert metrics[0]["loss"] == pytest.approx(math.log(2), abs=0.05)
    assert sum(m["loss"] for m in metrics[-4:]) / 4 < 0.8 * metrics[0]["loss"]

    ppo_dir = tmp_path / "ppo"
    final = ppo.run(load_config(PPOConfig, "configs/tiny/ppo.yaml", FRAMES + [
        f"model.init_from={qwen25}", f"reward_model={rm_final}", f"run.dir={ppo_dir}",
        f"data.train=[{tiny_bench}/sft_easy.json]", "sampling.num_samples=2", "sampling.max_new_tokens=5",
        "ppo.rollout_batch=4", "ppo.step_batch=4", "ppo.micro_batch=2", "train.lr=1e-3", "train.max_steps=2",
        "train.log_every=1", "eval_qa=null"]))
    rollouts = [json.loads(line) for line in (ppo_dir / "metrics.jsonl").read_text().splitlines()]
    assert len(rollouts) == 2 and rollouts[0]["kl"] == pytest.approx(0.0, abs=1e-5)
    assert all(math.isfinite(r["value_loss"]) and math.isfinite(r["reward"]) for r in rollouts)
    assert isinstance(load_model(final), HFVideoLM)
    before, after = load_file(qwen25 / "model.safetensors"), load_file(final / "hf" / "model.safetensors")
    assert any(not torch.equal(before[k], after[k]) for k in after if k in before)
