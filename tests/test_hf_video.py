"""HF video models (Qwen2-VL, Qwen2.5-VL, Qwen3-VL, LLaVA-OneVision, LLaVA-NeXT-Video, Video-LLaVA) behind the
policy interface: tiny
random checkpoints saved to disk and loaded through `from_pretrained`, as a hub checkpoint would be."""

import json
import math
import shutil
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from tests.conftest import check_shared_prompt_forward
from vlmalign.config import DPOConfig, GRPOConfig, LoraConfig, ModelConfig, SFTConfig, load_config
from vlmalign.data.collate import Collator, EncodedSample
from vlmalign.data.formats import Turn, read_instructions, write_jsonl
from vlmalign.data.template import IGNORE_INDEX
from vlmalign.errors import ConfigError, DataError
from vlmalign.losses import token_logps
from vlmalign.model.generation import GenerationConfig, sample_answers
from vlmalign.model.hf_video import HFVideoLM, save_tiny_hf_video
from vlmalign.model.policy import build_model, labelled_logits, load_model
from vlmalign.model.tokenizer import corpus_words

pytestmark = pytest.mark.usefixtures("one_thread")
QWEN3, ONEVISION = "Qwen3VLForConditionalGeneration", "LlavaOnevisionForConditionalGeneration"
NEXT_VIDEO, VIDEO_LLAVA = "LlavaNextVideoForConditionalGeneration", "VideoLlavaForConditionalGeneration"
QWEN = ["Qwen2_5_VLForConditionalGeneration", "Qwen2VLForConditionalGeneration", QWEN3]
LLAVA = [ONEVISION, NEXT_VIDEO, VIDEO_LLAVA]
ARCHITECTURES = QWEN + LLAVA
# visual tokens of a 4-frame video: Qwen 2 temporal patches of 4; LLaVA-OneVision 4 a frame and a
# newline; LLaVA-NeXT-Video 4 a frame (4 x 4 patches pooled 2 x 2); Video-LLaVA 16 patches and the class token a frame
VIDEO_TOKENS = {ONEVISION: 4 * 4 + 1, NEXT_VIDEO: 4 * 4, VIDEO_LLAVA: 4 * 17}
FRAMES = ["model.num_frames=4", "model.train_projector=false", "data.max_length=512", "data.feature_cache=null",
          "run.progress=false"]


def frame_size(checkpoint) -> list[int]:
    """Two merged patches a side: 56 pixels at Qwen2's 14-pixel patches, 64 at Qwen3-VL's 16."""
    return [64, 64] if json.loads((checkpoint / "config.json").read_text())["architectures"][0] == QWEN3 else [56, 56]


def save_tiny(tiny_bench, folder, architecture):
    words = corpus_words([tiny_bench / "sft_mix.json", tiny_bench / "judge_train.json"])
    return save_tiny_hf_video(folder / "ckpt", words, architecture)


@pytest.fixture(scope="module", params=ARCHITECTURES)
def checkpoint(request, tiny_bench, tmp_path_factory):
    return save_tiny(tiny_bench, tmp_path_factory.mktemp("hf"), request.param)


@pytest.fixture(scope="module", params=QWEN)
def qwen_checkpoint(request, tiny_bench, tmp_path_factory):
    return save_tiny(tiny_bench, tmp_path_factory.mktemp("qwen"), request.param)


@pytest.fixture(scope="module")
def qwen25(tiny_bench, tmp_path_factory):
    return save_tiny(tiny_bench, tmp_path_factory.mktemp("qwen25"), "Qwen2_5_VLForConditionalGeneration")


def write_oracle_pairs(tiny_bench, path) -> None:
    """16 preference pairs: the oracle's reference answer against another question's answer."""
    from vlmalign.feedback.oracle import Oracle

    oracle = Oracle.from_dir(tiny_bench)
    samples = read_instructions(tiny_bench / "sft_easy.json")[:16]
    write_jsonl(path, [{"id": s.id, "video": s.video, "prompt": s.turns[0].text,
                        "chosen": oracle.reference(s.video, s.turns[0].text.replace("<video>", "").strip()),
                        "rejected": samples[(i + 7) % len(samples)].turns[1].text} for i, s in enumerate(samples)])


def policy(path, **cfg) -> HFVideoLM:
    torch.manual_seed(0)
    return build_model(ModelConfig(**{"init_from": str(path), "num_frames": 4, "frame_size": frame_size(path),
                                      "train_projector": False, **cfg}))


def test_frames_are_the_image_processors_patches(qwen_checkpoint):
    """A video of two equal frames is one temporal patch of a still image: our patches and grid
    equal those of transformers' own Qwen2-VL image processor (its PIL backend, which Qwen3-VL
    uses too) for that image, at the checkpoint's patch size and normalisation."""
    from PIL import Image
    from transformers import Qwen2VLImageProcessorPil

    model = policy(qwen_checkpoint, num_frames=2)
    size = model.cfg.frame_size[0]
    frame = np.random.default_rng(0).integers(0, 256, (size, size, 3), dtype=np.uint8)
    ours = model.frames(np.stack([frame, frame]))
    stats = json.loads((qwen_checkpoint / "preprocessor_config.json").read_text())
    processor = Qwen2VLImageProcessorPil(patch_size=model.frames.patch, image_mean=stats["image_mean"],
                                         image_std=stats["image_std"])
    theirs = processor(images=[Image.fromarray(frame)], return_tensors="pt")
    assert ours["video_grid_thw"].tolist() == theirs["image_grid_thw"][0].tolist() == [1, 4, 4]
    torch.testing.assert_close(ours["pixel_values_videos"], theirs["pixel_values"].float(), rtol=0, atol=1e-5)
    assert model.num_visual_tokens == 4  # 1 x 4 x 4 patches, merged 2 x 2


@pytest.mark.parametrize("architecture", LLAVA)
def test_llava_frames_are_the_image_processors(architecture, tiny_bench, tmp_path):
    """The LLaVA video processors take each frame through an image processor's steps: LLaVA-OneVision's
    resizes it to the tower's size (SigLIP's), LLaVA-NeXT-Video's and Video-LLaVA's resize its short
    side and cut the centre (CLIP's); our frames, from frames of another size, equal transformers'
    own image processor's (PIL backend). Any other frame_size is a one-line error."""
    from PIL import Image
    from transformers import CLIPImageProcessorPil, SiglipImageProcessorPil

    checkpoint = save_tiny(tiny_bench, tmp_path, architecture)
    model = policy(checkpoint)
    stats = json.loads((checkpoint / "preprocessor_config.json").read_text())
    if architecture == ONEVISION:
        processor = SiglipImageProcessorPil(size={"height": 56, "width": 56}, image_mean=stats["image_mean"],
                                            image_std=stats["image_std"])
    else:
        processor = CLIPImageProcessorPil(size={"shortest_edge": 56}, crop_size={"height": 56, "width": 56},
                                          image_mean=stats["image_mean"], image_std=stats["image_std"])
    for shape in ((3, 40, 72, 3), (2, 90, 61, 3)):  # wide and tall
        frames = np.random.default_rng(0).integers(0, 256, shape, dtype=np.uint8)
        ours = model.frames(frames)["pixel_values_videos"]
        theirs = processor(images=[Image.fromarray(f) for f in frames], return_tensors="pt")["pixel_values"]
        torch.testing.assert_close(ours, theirs.float(), rtol=0, atol=1e-5)
    assert model.num_visual_tokens == VIDEO_TOKENS[architecture]
    refused = rf"model.frame_size: \[64, 64\], but the vision tower of this {architecture} checkpoint reads 56 x 56 frames"
    with pytest.raises(ConfigError, match=refused + r"; set model.frame_size: \[56, 56\]$"):
        policy(checkpoint, frame_size=[64, 64])
    with pytest.raises(ConfigError, match=rf"^model.max_video_pixels: {architecture} reads every frame at its vision "
                                          r"tower's 56 x 56 pixels; the pixel budget is for the Qwen families, set it to null$"):
        policy(checkpoint, max_video_pixels=10**6)
    assert load_model(checkpoint).cfg.frame_size == [56, 56]  # as it ships (a reference, a judge): the tower's size


def processor_text(model, text: str, layout) -> str:
    """`text` with its video pad expanded by transformers' own processor class for the family
    (its replace_video_token and get_text_with_replacements, given the video's grid and metadata).
    Its video processor needs torchvision, which this CPU torch cannot load: the instance is made
    without one and given the sizes the expansion reads."""
    import transformers
    from transformers.video_utils import VideoMetadata

    cls = getattr(transformers, model.architecture.replace("ForConditionalGeneration", "Processor"))
    processor = cls.__new__(cls)
    processor.image_token, processor.video_token = model.tokenizer.convert_ids_to_tokens(
        [model.core.config.image_token_id, model.core.config.video_token_id])
    if model.architecture in LLAVA:  # their expansion reads the frames' count and size and the tower's patches
        processor.num_image_tokens = (model.frames.side // model.frames.patch) ** 2  # LLaVA-OneVision's
        processor.patch_size, processor.num_additional_image_tokens = model.frames.patch, 1  # the others' (1: CLIP's class token)
        videos = {"pixel_values_videos": [torch.zeros(len(layout.indices), 3, model.frames.side, model.frames.side)]}
    else:
        processor.video_processor = SimpleNamespace(merge_size=model.frames.merge, temporal_patch_size=model.frames.temporal)
        processor.vision_start_token, processor.vision_end_token = "<|vision_start|>", "<|vision_end|>"
        videos = {"video_grid_thw": torch.tensor([model.frames.grid(len(layout.indices))]),
                  "video_metadata": [VideoMetadata(total_num_frames=layout.total, fps=layout.fps,
                                                   frames_indices=list(layout.indices))]}
    expanded, _ = processor.get_text_with_replacements([text], [], [processor.replace_video_token(videos, 0)], [])
    return expanded[0]


def processor_ids(tokenizer, text: str) -> list[int]:
    """Ids of a rendered, expanded chat as transformers' processor tokenizes it (its apply_chat_template):
    with the tokenizer's special tokens unless the text starts with the BOS already."""
    bos = tokenizer.bos_token
    return tokenizer(text, add_special_tokens=not (bos and text.startswith(bos))).input_ids


def test_ids_are_the_processors_and_labels_cover_the_answers(checkpoint, tiny_bench):
    """Our ids of a conversation about a real video equal those of transformers' processor over the
    chat template's text (Qwen3-VL: each temporal patch's time written before it; the Vicuna templates
    of LLaVA-NeXT-Video and Video-LLaVA given each answer ending in the eos, which they leave out)."""
    model = policy(checkpoint)
    video = read_instructions(tiny_bench / "sft_easy.json")[0].video
    layout = model.video_layout(video)
    turns = [Turn("user", "<video>\nwhat colour is the square?"), Turn("assistant", "red"),
             Turn("user", "and the circle?"), Turn("assistant", "blue")]
    enc = model.encode_conversation(turns, 512, layout=layout)
    eos = model.tokenizer.eos_token
    ended = [Turn(t.role, t.text + eos) if t.role == "assistant" and model.adds_eos_after_answers else t for t in turns]
    template = model.tokenizer.apply_chat_template(model._messages(ended), tokenize=False)
    assert template.count(model.video_pad) == 1
    expanded = processor_text(model, template, layout)
    assert enc.input_ids == processor_ids(model.tokenizer, expanded)
    assert (enc.input_ids[0] == model.tokenizer.bos_token_id) == (model.architecture in (NEXT_VIDEO, VIDEO_LLAVA))  # LLaMA's BOS
    assert enc.input_ids.count(model.visual_slot_id) == model.visual_tokens(layout) == VIDEO_TOKENS.get(model.architecture, 8)
    assert layout.indices == (0, 5, 10, 15) and layout.fps == 8  # 4 of the 16 frames of a 2-second video
    if model.architecture == QWEN3:  # each patch's time (frames 0 and 5: 0.3 s) and markers, in place of the template's
        assert "user\n<0.3 seconds><|vision_start|><|video_pad|>" in expanded and "<1.6 seconds>" in expanded
        assert expanded.count("<|vision_start|>") == expanded.count("<|vision_end|>") == 2  # one pair per patch
        assert "<|vision_end|><|vision_end|>" not in expanded
    learnt = [model.tokenizer.convert_ids_to_tokens(i) for i, label in zip(enc.input_ids, enc.labels) if label != IGNORE_INDEX]
    assert learnt == ["red", eos, "blue", eos]
    prompt = model.encode_prompt("<video>\nwhat colour is the square?", layout)
    template = model.tokenizer.apply_chat_template(model._messages(turns[:1]), tokenize=False, add_generation_prompt=True)
    assert prompt == processor_ids(model.tokenizer, processor_text(model, template, layout))
    with pytest.raises(DataError, match="data.max_length is 20"):
        model.encode_conversation(turns, 20, sample_id="s1", layout=layout)
    late_video = [Turn("user", "what colour?"), Turn("assistant", "red"), Turn("user", "<video>\nand now?"),
                  Turn("assistant", "blue")]
    at = model.encode_conversation(late_video, 512, layout=layout).input_ids.index(model.visual_slot_id)
    with pytest.raises(DataError, match=f"a video after token {at} .* would be cut"):
        model.encode_conversation(late_video, at, sample_id="s2", layout=layout)
    # an answer that also occurs inside the end-of-turn marker ("<|im_end|>") is still found where it is
    for short in ("end", "m"):
        enc = model.encode_conversation([turns[0], Turn("assistant", short)], 512, layout=layout)
        answer = [t for t, label in zip(enc.input_ids, enc.labels) if label != IGNORE_INDEX]
        assert answer[0] == model.tokenizer(short, add_special_tokens=False).input_ids[0]
        assert answer[-1] == model.tokenizer.eos_token_id
    with pytest.raises(DataError, match="sample 's4': answer 1 is empty"):
        model.encode_conversation([turns[0], Turn("assistant", " ")], 512, sample_id="s4", layout=layout)
    if not model.adds_eos_after_answers:
        model.tokenizer.eos_token = "<|image_pad|>"  # a checkpoint whose eos never ends a turn
        with pytest.raises(DataError, match="ends an answer without the tokenizer's eos token"):
            model.encode_conversation(turns, 512, sample_id="s3", layout=layout)


def test_checkpoints_pick_their_family_or_fail_in_one_line(qwen25, tmp_path):
    assert isinstance(load_model(qwen25), HFVideoLM)
    for arch in ("LlavaNextForConditionalGeneration", "SomethingNewForConditionalGeneration"):  # image-only; unknown
        folder = tmp_path / arch
        folder.mkdir()
        (folder / "config.json").write_text(json.dumps({"architectures": [arch]}))
        supported = "supported: Qwen2VLForConditionalGeneration.*VideoLlavaForConditionalGeneration"
        with pytest.raises(ConfigError, match=f"{arch} .*not a video model vlmalign knows.*{supported}"):
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
    for field in ("frame_grid", "visual_positions"):
        with pytest.raises(ConfigError, match=f"model.{field}: HF video models pool and place each frame as their checkpoint"):
            build_model(ModelConfig(init_from=str(qwen25), num_frames=4, **{field: 2 if field == "frame_grid" else True}))


def test_every_family_loads_as_it_ships_and_reads_a_video(checkpoint, tiny_bench):
    """A checkpoint folder loaded as it is (a reference, a judge, the base of make-prefs or eval) gets
    a frame size its vision tower accepts, and turns a video into as many inputs as its ids hold."""
    model = load_model(checkpoint).eval()
    sample = read_instructions(tiny_bench / "sft_easy.json")[0]
    enc = model.encode_conversation(sample.turns, 4096, layout=model.video_layout(sample.video))
    batch = Collator(model, model.visual_inputs(None))([EncodedSample("s", enc.input_ids, enc.labels, sample.video)])
    with torch.no_grad():
        assert torch.isfinite(model(**model.model_inputs(batch, "cpu")).logits).all()


@pytest.mark.parametrize("prompts", [2, 1], ids=["left-padded", "one prompt, decoded unmasked"])
def test_sampled_logprobs_equal_a_teacher_forced_pass(checkpoint, tiny_bench, prompts):
    """Shared-prefix sampling (one prefill with the video, its cache copied to the G samples, 3D
    positions continued by hand) records the log-probs a training forward pass gives."""
    model = policy(checkpoint).eval()
    visual = model.visual_inputs(None)
    samples = read_instructions(tiny_bench / "sft_easy.json")[:prompts]
    requests = [(s.video, s.turns[0].text + (" and say it twice" if i else "")) for i, s in enumerate(samples)]
    gen = GenerationConfig(max_new_tokens=6, do_sample=True, num_return_sequences=3)
    groups = sample_answers(model, visual, requests, gen, generator=torch.Generator().manual_seed(0))
    prompts = [model.encode_prompt(q, model.video_layout(v)) for v, q in requests]
    rows = [EncodedSample("", p + s.token_ids, [IGNORE_INDEX] * len(p) + s.token_ids, v)
            for p, (v, _), group in zip(prompts, requests, groups) for s in group]
    batch = Collator(model, visual)(rows)
    with torch.no_grad():
        logps, mask = token_logps(model(**model.model_inputs(batch, "cpu")).logits, batch["labels"])
        answer_logps, answer_mask = token_logps(*labelled_logits(model, batch, "cpu"))  # the LM head on the answers alone
    recorded = [s.token_logps for group in groups for s in group]
    for row, expected in enumerate(recorded):
        torch.testing.assert_close(logps[row][mask[row]], torch.tensor(expected), rtol=0, atol=2e-4)
        torch.testing.assert_close(answer_logps[row][answer_mask[row]], torch.tensor(expected), rtol=0, atol=2e-4)


def test_training_runs_each_prompt_once_for_its_answers(checkpoint, tiny_bench):
    model = policy(checkpoint)
    samples = read_instructions(tiny_bench / "sft_easy.json")[:2]
    check_shared_prompt_forward(model, model.visual_inputs(None), [(s.video, s.turns[0].text) for s in samples])


@pytest.mark.parametrize("lora", [False, True])
def test_save_and_load_keep_the_logits(checkpoint, tiny_bench, tmp_path, lora):
    model = policy(checkpoint, lora=LoraConfig(enabled=lora, r=4, alpha=8, dropout=0.0))
    if lora:  # a trained adapter: move it off its zero start
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.data.normal_(0, 0.1)
    visual = model.visual_inputs(None)
    sample = read_instructions(tiny_bench / "sft_easy.json")[0]
    enc = model.encode_conversation(sample.turns, 512, layout=model.video_layout(sample.video))
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
@pytest.mark.parametrize("architecture", ["Qwen2_5_VLForConditionalGeneration", QWEN3, ONEVISION, NEXT_VIDEO, VIDEO_LLAVA])
def test_every_stage_runs_and_lora_dpo_learns_on_each_tiny_family(architecture, tiny_bench, tmp_path):
    """SFT, then LoRA DPO on oracle pairs (loss falls from log 2, margin rises), GRPO_rank and the
    synthetic evaluation, each through the same stage code as the VideoLM."""
    from vlmalign.eval.synthetic import evaluate_synthetic
    from vlmalign.train import dpo, grpo_rank, sft

    start = save_tiny(tiny_bench, tmp_path, architecture)
    # every stage reads the pixels SFT stored in the cache (the frame settings stay the same)
    frames = FRAMES + ["model.frame_size=[{0},{0}]".format(frame_size(start)[0]), f"data.feature_cache={tmp_path / 'cache'}"]
    sft_final = sft.run(load_config(SFTConfig, "configs/tiny/sft.yaml", frames + [
        f"model.init_from={start}", f"run.dir={tmp_path / 'sft'}", f"data.train=[{tiny_bench}/sft_easy.json]",
        "curriculum.criterion=none", "train.max_steps=2", "train.batch_size=4"]))
    assert isinstance(load_model(sft_final), HFVideoLM)
    videos = {s.video for s in read_instructions(tiny_bench / "sft_easy.json")}
    assert len(list((tmp_path / "cache").rglob("*.safetensors"))) == len(videos)

    write_oracle_pairs(tiny_bench, tmp_path / "pairs.jsonl")
    dpo_dir = tmp_path / "dpo"
    dpo_final = dpo.run(load_config(DPOConfig, "configs/tiny/dpo.yaml", frames + [
        f"model.init_from={sft_final}", "model.lora.enabled=true", "model.lora.r=8", "model.lora.alpha=16",
        f"run.dir={dpo_dir}", f"data.train=[{tmp_path / 'pairs.jsonl'}]", "train.batch_size=4", "train.epochs=3",
        "train.lr=5e-3", "train.scheduler=constant", "dpo.sft_weight=0", "dpo.beta=1.0", "train.log_every=1"]))
    metrics = [json.loads(line) for line in (dpo_dir / "metrics.jsonl").read_text().splitlines()]
    assert metrics[0]["loss"] == pytest.approx(math.log(2), abs=1e-4)
    last = metrics[-4:]
    assert sum(m["loss"] for m in last) / 4 < 0.6 and sum(m["reward_margin"] for m in last) / 4 > 0.3

    for lora in ("true", "false"):  # the reference: the adapter switched off, or a frozen copy of the start
        grpo_dir = tmp_path / f"grpo-lora-{lora}"
        grpo_rank.run(load_config(GRPOConfig, "configs/tiny/grpo_rank.yaml", frames + [
            f"model.init_from={dpo_final}", f"model.lora.enabled={lora}", "model.lora.r=4", f"run.dir={grpo_dir}",
            f"data.train=[{tiny_bench}/sft_easy.json]", f"judge.bench={tiny_bench}", "sampling.max_new_tokens=5",
            "grpo.rollout_batch=4", "grpo.mini_batch=10", "train.max_steps=1", "eval_qa=null"]))
        rollout = json.loads((grpo_dir / "metrics.jsonl").read_text().splitlines()[-1])
        tau = rollout["kendall_tau"]  # None when the oracle ranked every group's answers alike
        assert (tau is None or -1 <= tau <= 1) and rollout["kl"] >= 0

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


def test_narratives_and_retrospective_contexts_read_clips_of_the_video(checkpoint, tiny_bench):
    """VLM-RLAIF's clip narratives and ISR-DPO's contexts on an HF policy: each clip is cut from the
    decoded frames and stretched back to num_frames, so it has the whole video's token count, and
    keeps the times of the frames it repeats (Qwen3-VL writes them into the prompt)."""
    from vlmalign.feedback.context import narratives, retrospective_contexts

    model = policy(checkpoint).eval()
    visual = model.visual_inputs(None)
    video = read_instructions(tiny_bench / "sft_easy.json")[0].video
    pieces = visual.clips(video, clips=3, max_clip_len=20)
    assert len(pieces) == 3 and all(model.visual_tokens(p["layout"]) == model.visual_tokens(model.video_layout(video))
                                    for p in pieces)
    assert visual.use_features and not torch.equal(pieces[0]["video_features"], pieces[2]["video_features"])
    assert [p["layout"].indices for p in pieces] == [(0, 0, 0, 5), (10, 10, 10, 10), (15, 15, 15, 15)]
    # a clip spans its share of the video (frames 0-5 of the 0-15 read): its patches, a third of the time
    whole = model.video_layout(video).seconds_per_patch(2)
    assert pieces[0]["layout"].seconds_per_patch(2) == pytest.approx(whole / 3)
    assert set(narratives(model, visual, [video], clips=3, max_new_tokens=3)) == {video}
    assert set(retrospective_contexts(model, visual, [video], {video: "a red square"}, max_new_tokens=3)) == {video}


def test_qlora_quantises_the_language_model_alone_and_its_adapter_learns(checkpoint, tiny_bench, tmp_path):
    bnb = pytest.importorskip("bitsandbytes", reason="QLoRA needs the optional bitsandbytes extra (pip install -e '.[qlora]')")
    from vlmalign.config import QuantizationConfig

    quantization = QuantizationConfig(load_in_4bit=True, compute_dtype="float32")
    model = policy(checkpoint, lora=LoraConfig(enabled=True, r=4, alpha=8, dropout=0.0), quantization=quantization)
    four_bit = [n for n, m in model.named_modules() if isinstance(m, bnb.nn.Linear4bit)]
    assert len(four_bit) == 2 * 7 and all("language_model" in n for n in four_bit)  # q k v o gate up down x 2 layers
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n for n in trainable)

    visual = model.visual_inputs(None)
    sample = read_instructions(tiny_bench / "sft_easy.json")[0]
    enc = model.encode_conversation(sample.turns, 512, layout=model.video_layout(sample.video))
    batch = Collator(model, visual)([EncodedSample("s", enc.input_ids, enc.labels, sample.video)])
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    losses = []
    for _ in range(16):
        logps, mask = token_logps(model(**model.model_inputs(batch, "cpu")).logits, batch["labels"])
        loss = -(logps * mask).sum() / mask.sum()
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    assert losses[-1] < 0.85 * losses[0]  # r4 adapters level off near 0.78 of the start on every family

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
    enc = model.encode_conversation(sample.turns, 512, layout=model.video_layout(sample.video))
    row = EncodedSample("s", enc.input_ids, enc.labels, sample.video)
    many = len(enc.input_ids) + 4
    with torch.no_grad():
        alone = model(**model.model_inputs(Collator(model, visual)([row]), "cpu")).logits
        stacked = model(**model.model_inputs(Collator(model, visual)([row] * many), "cpu")).logits
    torch.testing.assert_close(stacked[-1], alone[0], rtol=0, atol=1e-4)


@pytest.fixture(scope="module")
def qwen3(tiny_bench, tmp_path_factory):
    return save_tiny(tiny_bench, tmp_path_factory.mktemp("qwen3"), QWEN3)


def test_fps_sampling_picks_the_frames_each_familys_processor_picks(qwen25, qwen3, tmp_path):
    """2.5 s at 30 fps read at 2 per second: 5 frames. Qwen2.5-VL's processor rounds that down to
    whole temporal patches and steps from the first frame (arange(0, 75, 75 / 4)); Qwen3-VL's spreads
    all 5 from the first frame to the last (linspace(0, 74, 5), rounded). Worked by hand from
    transformers 5's sample_frames, whose classes need torchvision to import here."""
    from vlmalign.video import write_video

    video = str(tmp_path / "short.mp4")
    write_video(video, np.zeros((75, 16, 16, 3), dtype=np.uint8), fps=30.0)
    assert policy(qwen25, fps=2.0).video_layout(video).indices == (0, 18, 37, 56)
    assert policy(qwen3, fps=2.0).video_layout(video).indices == (0, 18, 37, 56, 74)


def test_a_visual_token_budget_caps_the_frames_of_each_video(qwen25, tmp_path):
    """model.max_visual_tokens: with fps sampling a long video reads fewer frames so that its tokens
    fit (each frame keeps its size); where even min_frames or a fixed num_frames would not fit, the
    video is an error naming it, never silently cut."""
    from vlmalign.video import write_video

    video = str(tmp_path / "ten_seconds.mp4")
    write_video(video, np.zeros((100, 16, 16, 3), dtype=np.uint8), fps=10.0)
    free = policy(qwen25, fps=2.0, max_frames=64)
    per_patch = free.frames.tokens(2)
    assert len(free.video_layout(video).indices) == 20  # 2 per second of 10 s
    capped = policy(qwen25, fps=2.0, max_frames=64, max_visual_tokens=6 * per_patch + 1)
    layout = capped.video_layout(video)
    assert len(layout.indices) == 12 and capped.visual_tokens(layout) == 6 * per_patch
    assert layout.indices == tuple(torch.arange(0, 100, 100 / 12).int().tolist())  # spread over the whole video
    with pytest.raises(DataError, match=r"ten_seconds.mp4: 4 frames give .* over model.max_visual_tokens"):
        policy(qwen25, num_frames=4, max_visual_tokens=per_patch).video_layout(video)
    with pytest.raises(DataError, match="at most 2 frames fit"):
        policy(qwen25, fps=2.0, min_frames=4, max_visual_tokens=per_patch).video_layout(video)
    with pytest.raises(ConfigError, match="model.max_visual_tokens: 0 must be at least 1"):
        policy(qwen25, max_visual_tokens=0)
    with pytest.raises(ConfigError, match="model.max_visual_tokens: vlmalign's VideoLM"):
        build_model(ModelConfig(max_visual_tokens=100))


@pytest.mark.parametrize("frames, budget, size, patch, expected", [
    (16, 16 * 336 * 448, (336, 448), 14, (336, 448)),  # within the budget: frame_size as it is
    (16, 1_000_000, (336, 448), 14, (196, 280)),  # scale sqrt(1e6 / (16 x 336 x 448)) = 0.644: 216.5 -> 196, 288.7 -> 280
    (32, 2_000_000, (448, 252), 14, (308, 168)),  # tall: 0.744 -> 333.3 -> 308, 187.5 -> 168
    (64, 4_000_000, (448, 448), 16, (224, 224)),  # Qwen3-VL's 32-pixel unit: 250 -> 224
    (8, 8 * 28 * 28, (56, 56), 14, (28, 28)),  # one unit a side, the budget met exactly
    (8, 8 * 28 * 28 - 1, (56, 56), 14, (28, 28)),  # never below one unit (the layout then refuses the video)
])
def test_a_pixel_budget_scales_each_frame_down_to_whole_merged_patches(frames, budget, size, patch, expected):
    """model.max_video_pixels: frames x h x w within the budget, frame_size's aspect kept as whole
    merged patches allow, each side rounded down (the expected sizes worked by hand)."""
    from vlmalign.model.hf_video import QwenFrames

    qwen = QwenFrames(size, patch, temporal=2, merge=2, mean=(0.5,) * 3, std=(0.5,) * 3, max_video_pixels=budget)
    assert qwen.frame_size(frames) == expected
    assert qwen.grid(frames) == (frames // 2, expected[0] // patch, expected[1] // patch)


def test_a_pixel_budget_reads_smaller_frames_with_the_processors_ids(qwen_checkpoint, tiny_bench):
    """Frames of twice the side under a budget of 4 frames at the side (the sample video reads 4):
    each frame is read at the side, so its patches are those of frame_size = the side, its grid is
    [2, 4, 4], and its ids are those transformers' processor writes for that grid. A budget that
    even one merged patch a frame overfills is a one-line error naming the video and the key."""
    side = frame_size(qwen_checkpoint)[0]
    video = read_instructions(tiny_bench / "sft_easy.json")[0].video
    model = policy(qwen_checkpoint, frame_size=[2 * side, 2 * side], max_video_pixels=4 * side * side)
    layout = model.video_layout(video)
    item = model.visual_inputs(None).get(video)
    assert len(layout.indices) == 4 and model.frames.frame_size(4) == (side, side)
    assert item["video_grid_thw"].tolist() == [2, 4, 4] and model.visual_tokens(layout) == 8
    assert policy(qwen_checkpoint, frame_size=[2 * side, 2 * side]).visual_tokens(layout) == 32  # without the budget
    unbudgeted = policy(qwen_checkpoint).visual_inputs(None).get(video)
    assert same_inputs(item, unbudgeted)
    template = model.tokenizer.apply_chat_template(model._messages([Turn("user", "<video>\nwhat moves?")]),
                                                   tokenize=False, add_generation_prompt=True)
    expanded = processor_text(model, template, layout)
    assert model.encode_prompt("<video>\nwhat moves?", layout) == processor_ids(model.tokenizer, expanded)
    assert expanded.count(model.video_pad) == 8

    unit = model.frames.unit
    with pytest.raises(DataError, match=rf"^video .*\.mp4: 4 frames of even {unit} x {unit} pixels \(one merged patch\) are "
                                        rf"{4 * unit * unit} pixels, over model.max_video_pixels {4 * unit * unit - 1}; read"):
        policy(qwen_checkpoint, max_video_pixels=4 * unit * unit - 1).video_layout(video)
    with pytest.raises(ConfigError, match="model.max_video_pixels: 0 must be at least 1"):
        policy(qwen_checkpoint, max_video_pixels=0)
    with pytest.raises(ConfigError, match="model.max_video_pixels: vlmalign's VideoLM"):
        build_model(ModelConfig(max_video_pixels=10**6))


def test_fps_sampling_reads_a_long_video_within_max_frames_at_its_real_times(qwen25, qwen3, tmp_path, capsys):
    """A 10-minute video at model.fps 2 with max_frames 64 gets 64 frames spread over all of it. The
    Qwen3-VL prompt holds their real times (ids equal to transformers' processor given the video's
    metadata; without it transformers assumes 24 fps and the last time would be 25 s, not ~594 s);
    Qwen2.5-VL's positions step by the real seconds per temporal patch, as its processor computes them."""
    from transformers.video_utils import VideoMetadata

    from vlmalign.video import write_video

    video = str(tmp_path / "ten_minutes.mp4")
    write_video(video, np.random.default_rng(0).integers(0, 256, (600, 16, 16, 3), dtype=np.uint8), fps=1.0)
    for checkpoint in (qwen25, qwen3):
        model = policy(checkpoint, fps=2.0, max_frames=64)
        layout = model.video_layout(video)
        last = 599 if model.architecture == QWEN3 else 590  # linspace to the last frame; arange(0, 600, 600 / 64)
        assert len(layout.indices) == 64 and (layout.indices[0], layout.indices[-1], layout.total, layout.fps) == (0, last, 600, 1)
        model.visual_inputs(None).precompute([video, video])
        assert "1 videos, frames read 64 (2.0 per second within [4, 64]), visual tokens per video 128" in capsys.readouterr().out
        metadata = VideoMetadata(total_num_frames=600, fps=1.0, frames_indices=list(layout.indices))
        if model.architecture == QWEN3:
            template = model.tokenizer.apply_chat_template(model._messages([Turn("user", "<video>\nwhat moves?")]),
                                                           tokenize=False, add_generation_prompt=True)
            expanded = processor_text(model, template, layout)
            assert model.encode_prompt("<video>\nwhat moves?", layout) == processor_ids(model.tokenizer, expanded)
            assert expanded.count(" seconds>") == 32 and layout.times(2)[-1] > 590
        else:
            item = model.visual_inputs(None).get(video)
            assert item["video_grid_thw"].tolist() == [32, 4, 4]
            seconds = model.stack_visual([item])["second_per_grid_ts"]
            torch.testing.assert_close(seconds, torch.tensor([2 / metadata.sampled_fps]))  # 18.75 s per patch
    with pytest.raises(ConfigError, match="model.min_frames 8 and model.max_frames 4"):
        policy(qwen25, fps=2.0, min_frames=8, max_frames=4)
    with pytest.raises(ConfigError, match="model.fps: vlmalign's VideoLM reads a fixed model.num_frames"):
        build_model(ModelConfig(fps=2.0))


def test_a_frame_folder_reads_as_its_video_given_its_frame_rate(checkpoint, tiny_bench, tmp_path):
    """The frames of a video saved as images: the same layout and patches as the video once
    model.frame_folder_fps says their rate; without it the families that place frames by time refuse."""
    from PIL import Image

    from vlmalign.video import read_video

    video = read_instructions(tiny_bench / "sft_easy.json")[0].video
    folder = tmp_path / "frames"
    folder.mkdir()
    for i, frame in enumerate(read_video(video)):
        Image.fromarray(frame).save(folder / f"frame_{i}.png")
    model = policy(checkpoint)
    if model.needs_frame_rate:
        with pytest.raises(DataError, match=f"frames/? *: {model.architecture} places frames by their time.*model.frame_folder_fps"):
            model.video_layout(str(folder))
    model = policy(checkpoint, frame_folder_fps=8.0, train_projector=True)  # a trainable projector reads pixels
    assert model.video_layout(str(folder)) == model.video_layout(video)
    visual = model.visual_inputs(None)
    from_folder, from_video = visual.get(str(folder)), visual.get(video)
    assert torch.equal(from_folder["pixel_values_videos"], from_video["pixel_values_videos"])


def two_and_six_seconds(folder) -> list[str]:
    """A 2-second and a 6-second video at 4 fps (fps sampling at 2 reads 4 and 12 frames)."""
    from vlmalign.video import write_video

    rng = np.random.default_rng(0)
    videos = []
    for frames in (8, 24):
        videos.append(str(folder / f"{frames}.mp4"))
        write_video(videos[-1], rng.integers(0, 256, (frames, 32, 32, 3), dtype=np.uint8), fps=4)
    return videos


def assert_batched_rows_are_alone(model, videos: list[str]) -> None:
    """A row about each video, all in one batch: each row's logits are those it gets alone."""
    visual, rows = model.visual_inputs(None), []
    for video in videos:
        enc = model.encode_conversation([Turn("user", "<video>\nwhat colour?"), Turn("assistant", "red")], 512,
                                        layout=model.video_layout(video))
        rows.append(EncodedSample("s", enc.input_ids, enc.labels, video))
    with torch.no_grad():
        together = model(**model.model_inputs(Collator(model, visual)(rows), "cpu")).logits
        for i, row in enumerate(rows):
            alone = model(**model.model_inputs(Collator(model, visual)([row]), "cpu")).logits
            torch.testing.assert_close(together[i, : len(row.input_ids)], alone[0], rtol=0, atol=1e-4)


def test_videos_of_different_lengths_share_a_batch(checkpoint, tmp_path):
    """With fps sampling a 2-second and a 6-second video get 4 and 12 frames, so rows of different
    grids and token counts stack in one batch: each row's logits are those it gets alone."""
    videos = two_and_six_seconds(tmp_path)
    model = policy(checkpoint, fps=2.0, min_frames=2, max_frames=16).eval()
    assert [len(model.video_layout(v).indices) for v in videos] == [4, 12]
    assert_batched_rows_are_alone(model, videos)


def test_videos_of_different_sizes_share_a_batch_under_a_pixel_budget(qwen_checkpoint, tmp_path, capsys):
    """With fps sampling, frame_size 4 merged patches a side and a budget of 12 frames at 2: a 6-second
    video reads 12 frames at 2 patches a side, a 2-second one 4 frames at 3 (sqrt(12 x 2^2 / 4) = 3.46,
    rounded down). Their patches of two sizes stack in one batch, each row's logits those it gets
    alone; the printed summary gives both sizes."""
    unit = frame_size(qwen_checkpoint)[0] // 2
    videos = two_and_six_seconds(tmp_path)
    model = policy(qwen_checkpoint, frame_size=[4 * unit, 4 * unit], fps=2.0, min_frames=2, max_frames=16,
                   max_video_pixels=12 * (2 * unit) ** 2).eval()
    visual = model.visual_inputs(None)
    assert [visual.get(v)["video_grid_thw"].tolist() for v in videos] == [[2, 6, 6], [6, 4, 4]]
    assert_batched_rows_are_alone(model, videos)
    visual.precompute(videos)
    printed = f"visual tokens per video 18-24 (median 21) at {2 * unit} x {2 * unit} to {3 * unit} x {3 * unit} pixels "
    assert printed + f"(model.max_video_pixels {12 * (2 * unit) ** 2})" in capsys.readouterr().out


def test_reward_model_reads_the_chat_template_and_keeps_its_scores(checkpoint, tiny_bench, tmp_path):
    """A reward model on an HF policy: its input is the chat template's rendering of the question,
    the answer and the evaluation prompt as one more user turn, ready for the assistant's reply (the
    video expanded as the family's processor expands it); a long answer is cut, never that turn;
    scores do not depend on the batch's padding and survive save and load."""
    from vlmalign.model.reward import build_reward_model, load_reward_model, score_samples

    torch.manual_seed(0)
    model = build_reward_model(ModelConfig(init_from=str(checkpoint), num_frames=4, frame_size=frame_size(checkpoint)),
                               "Is the answer right?", "test@v0").eval()
    with torch.no_grad():
        model.head.weight.normal_(0, 1.0)
        model.head.bias.fill_(0.5)
    backbone, tok = model.backbone, model.tokenizer
    sample = read_instructions(tiny_bench / "sft_easy.json")[0]
    question, answer = sample.turns[0].text, sample.turns[1].text
    enc = model.encode(question, answer, sample.video, 512)
    ended = tok.eos_token if backbone.adds_eos_after_answers else ""  # the eos a Vicuna template leaves out
    messages = [{"role": "user", "content": [{"type": "video"}, {"type": "text", "text": question.replace("<video>", "").strip()}]},
                {"role": "assistant", "content": [{"type": "text", "text": answer + ended}]},
                {"role": "user", "content": [{"type": "text", "text": "Is the answer right?"}]}]

    def template_ids(messages, generation_prompt):
        text = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=generation_prompt)
        return processor_ids(tok, processor_text(backbone, text, backbone.video_layout(sample.video)))

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
    from vlmalign.train import ppo, rm

    write_oracle_pairs(tiny_bench, tmp_path / "pairs.jsonl")
    rm_dir = tmp_path / "rm"
    rm_final = rm.run(load_config(RMConfig, "configs/tiny/rm.yaml", FRAMES + [
        f"model.init_from={qwen25}", f"run.dir={rm_dir}", f"data.train=[{tmp_path / 'pairs.jsonl'}]", "rm.eval_fraction=0.0",
        "train.batch_size=8", "train.epochs=10", "train.lr=1e-3", "train.log_every=1", "train.scheduler=constant"]))
    metrics = [json.loads(line) for line in (rm_dir / "metrics.jsonl").read_text().splitlines() if "loss" in line]
    assert metrics[0]["loss"] == pytest.approx(math.log(2), abs=0.05)
    assert sum(m["loss"] for m in metrics[-4:]) / 4 < 0.8 * metrics[0]["loss"]

    ppo_dir = tmp_path / "ppo"
    # the value model (the reward model's copy) reads the policy's ids: its frames must be the policy's
    with pytest.raises(ConfigError, match="must share the policy's tokenizer and frame settings .*differ: num_frames 4 vs 8"):
        ppo.run(load_config(PPOConfig, "configs/tiny/ppo.yaml", FRAMES + [
            f"model.init_from={qwen25}", f"reward_model={rm_final}", f"run.dir={tmp_path / 'mismatch'}", "model.num_frames=8",
            f"data.train=[{tiny_bench}/sft_easy.json]", "eval_qa=null"]))
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


def test_gradient_checkpointing_keeps_the_gradients_and_the_projectors_train(checkpoint, tiny_bench):
    """With model.train_projector a LoRA policy trains its adapters and the family's projectors
    (Qwen's merger and Qwen3-VL's deepstack mergers; LLaVA-OneVision's projector and newline; the other
    LLaVA families' projector), never
    the vision tower; gradient checkpointing gives the same loss and gradients as without it."""
    sample = read_instructions(tiny_bench / "sft_easy.json")[0]
    grads = []
    for checkpointing in (False, True):
        model = policy(checkpoint, lora=LoraConfig(enabled=True, r=4, alpha=8, dropout=0.0), train_projector=True,
                       gradient_checkpointing=checkpointing).train()
        for name, p in model.named_parameters():
            if "lora_B" in name:  # a trained adapter: off its zero start, so every LoRA factor gets a gradient
                p.data.normal_(0, 0.1, generator=torch.Generator().manual_seed(0))
        enc = model.encode_conversation(sample.turns, 512, layout=model.video_layout(sample.video))
        batch = Collator(model, model.visual_inputs(None))([EncodedSample("s", enc.input_ids, enc.labels, sample.video)])
        logps, mask = token_logps(model(**model.model_inputs(batch, "cpu")).logits, batch["labels"])
        (-(logps * mask).sum() / mask.sum()).backward()
        trainable = {n: p.grad for n, p in model.named_parameters() if p.requires_grad}
        grads.append(trainable)
    projectors = [n for n in grads[0] if "lora_" not in n]  # all that trains besides the adapters
    assert projectors and all(any(f".{m}" in n for m in model.projector_modules) for n in projectors)
    assert grads[0].keys() == grads[1].keys() and all(g is not None for g in grads[0].values())
    for name in grads[0]:
        torch.testing.assert_close(grads[1][name], grads[0][name], rtol=1e-4, atol=1e-6)


def same_inputs(a: dict, b: dict) -> bool:
    """Equal visual inputs: every tensor bit for bit, and the layout."""
    return a.keys() == b.keys() and a["layout"] == b["layout"] and all(
        torch.equal(a[k], b[k]) for k in a if k != "layout")


def test_a_frozen_visual_path_runs_once_per_video_and_gives_the_logits_of_its_pixels(checkpoint, tiny_bench, tmp_path):
    """With the tower and projectors frozen (the recipes' setting) a video's features are computed
    once, stored in the cache folder, and handed to the model precomputed: the logits, the sampled
    log-probs' forward and the shared-prompt training forward equal a pass that runs the tower on the
    pixels. A trainable projector reads pixels; changed visual weights miss the cached features."""
    samples = read_instructions(tiny_bench / "sft_easy.json")[:2]
    frozen, trained = policy(checkpoint).eval(), policy(checkpoint, train_projector=True).eval()
    cache = str(tmp_path / "cache")
    features, pixels = frozen.visual_inputs(cache), trained.visual_inputs(cache)
    assert features.use_features and not pixels.use_features
    assert features.cache_dir.name.split("-")[-2:-1] == ["features"] and "-pixels-" in pixels.cache_dir.name
    features.precompute([s.video for s in samples])
    assert "pixel_values_videos" not in features.get(samples[0].video) and features.hits == 1

    rows = []
    for s in samples:
        enc = frozen.encode_conversation(s.turns, 512, layout=frozen.video_layout(s.video))
        rows.append(EncodedSample(s.id, enc.input_ids, enc.labels, s.video))
    with torch.no_grad():
        from_features = frozen(**frozen.model_inputs(Collator(frozen, features)(rows), "cpu")).logits
        from_pixels = trained(**trained.model_inputs(Collator(trained, pixels)(rows), "cpu")).logits
        hidden = frozen.hidden_states(**frozen.model_inputs(Collator(frozen, features)(rows), "cpu"))
    torch.testing.assert_close(from_features, from_pixels, rtol=0, atol=1e-5)
    assert hidden.shape[:2] == from_features.shape[:2]
    check_shared_prompt_forward(frozen, features, [(s.video, s.turns[0].text) for s in samples])

    for name, p in frozen.core.model.named_parameters():  # a trained projector: other features
        if any(name.startswith(m) for m in frozen.projector_modules):
            p.data.add_(0.5)
            break
    moved = frozen.visual_inputs(cache)
    assert moved.cache_dir != features.cache_dir
    assert not torch.equal(moved.get(samples[0].video)["video_features"], features.get(samples[0].video)["video_features"])
    assert (moved.hits, moved.misses) == (0, 1)


def test_the_pixel_cache_gives_the_computed_inputs_until_the_video_or_a_setting_changes(checkpoint, tiny_bench, tmp_path, caplog):
    """With data.feature_cache and a trainable projector an HF policy stores each video's tower input
    and layout once: read back they equal a fresh computation bit for bit, and a second run's
    instance only hits. Other frame settings, a touched or replaced video, and an unreadable entry
    miss (the entry is then computed and written again) rather than give stale or broken inputs."""
    import os

    bench = [s.video for s in read_instructions(tiny_bench / "sft_easy.json")]
    video, other = str(tmp_path / "video.mp4"), next(v for v in bench if v != bench[0])
    shutil.copy(bench[0], video)
    cache = str(tmp_path / "cache")
    model = policy(checkpoint, train_projector=True)
    fresh = model.visual_inputs(None).get(video)

    first = model.visual_inputs(cache)
    first.precompute([video, video])
    assert (first.hits, first.misses) == (0, 1) and same_inputs(first.get(video), fresh)
    second = model.visual_inputs(cache)
    assert same_inputs(second.get(video), fresh) and (second.hits, second.misses) == (1, 0)
    assert second.cache_dir.parent == tmp_path / "cache"  # the reward judge's backbone reads the same folder

    fewer = policy(checkpoint, num_frames=2, train_projector=True)
    fewer_inputs = fewer.visual_inputs(cache)
    assert same_inputs(fewer_inputs.get(video), fewer.visual_inputs(None).get(video)) and fewer_inputs.misses == 1

    later = os.stat(video).st_mtime_ns + 10**9
    os.utime(video, ns=(later, later))
    touched = model.visual_inputs(cache)
    assert same_inputs(touched.get(video), fresh) and (touched.hits, touched.misses) == (0, 1)

    shutil.copy(other, video)
    model = policy(checkpoint, train_projector=True)  # a new policy: a policy reads each video's layout once
    replaced = model.visual_inputs(cache)
    assert same_inputs(replaced.get(video), model.visual_inputs(None).get(other)) and replaced.misses == 1

    entry = replaced.cache.path(video)
    entry.write_bytes(entry.read_bytes()[:100])  # as a crash before the disk flushed it can leave it
    broken = model.visual_inputs(cache)
    with caplog.at_level("WARNING"):
        assert same_inputs(broken.get(video), model.visual_inputs(None).get(other)) and broken.misses == 1
    assert f"{entry}: unreadable cache entry" in caplog.text
    rewritten = model.visual_inputs(cache)
    rewritten.get(video)
    assert rewritten.hits == 1 and not list(entry.parent.glob("*.tmp"))


def test_the_pixel_cache_misses_when_the_pixel_budget_changes(qwen25, tiny_bench, tmp_path):
    """The pixel cache's key holds model.max_video_pixels: another budget (or none) is another entry,
    never the pixels of the frames at another size."""
    video = read_instructions(tiny_bench / "sft_easy.json")[0].video
    cache = str(tmp_path / "cache")
    folders = set()
    for budget in (None, 4 * 56 * 56, 4 * 28 * 28, 4 * 56 * 56):
        model = policy(qwen25, frame_size=[112, 112], max_video_pixels=budget, train_projector=True)
        cached = model.visual_inputs(cache)
        assert same_inputs(cached.get(video), model.visual_inputs(None).get(video))
        assert (cached.hits, cached.misses) == ((1, 0) if cached.cache_dir in folders else (0, 1))
        folders.add(cached.cache_dir)
    assert len(folders) == 3


def test_writers_of_one_cache_entry_never_leave_half_of_it(tmp_path):
    """Several writers of the same entry at once (processes or threads): each writes a file of its
    own and renames it into place, so a reader finds a whole entry and no temporary file stays."""
    from concurrent.futures import ThreadPoolExecutor

    from vlmalign.data.features import VideoCache

    video = tmp_path / "video.mp4"
    video.write_bytes(b"frames")
    cache = VideoCache(tmp_path / "cache")
    path = cache.path(str(video))
    big = torch.arange(1_000_000, dtype=torch.float32)

    def write(i):
        cache.write(path, {"x": big + i})
        tensors, _ = cache.read(path)
        return bool(torch.equal(tensors["x"] - tensors["x"][0], big))

    with ThreadPoolExecutor(4) as pool:
        assert all(pool.map(write, range(16)))
    assert [p.name for p in (tmp_path / "cache").iterdir()] == [path.name]
