import warnings

import numpy as np
import pytest
import torch

from tests.conftest import tiny_model_overrides
from vlmalign.config import ModelConfig, SFTConfig, load_config
from vlmalign.data.formats import Turn
from vlmalign.data.template import IGNORE_INDEX, VISUAL_TOKEN_ID, encode_conversation, encode_prompt
from vlmalign.errors import ConfigError, DataError
from vlmalign.model.projector import build_projector, spatio_temporal_pool
from vlmalign.losses import logits_needed, sequence_logps
from vlmalign.model.policy import build_model, labelled_logits, load_model
from vlmalign.model.vision import preprocess_frames

TINY = "configs/tiny/sft.yaml"
CLIP_1L = "{hidden_size: 32, intermediate_size: 64, num_hidden_layers: 2, num_attention_heads: 4, image_size: %d, patch_size: 14}"


def tiny(word_corpus, **extra) -> ModelConfig:
    return load_config(SFTConfig, TINY, tiny_model_overrides(word_corpus, **extra)).model


def test_vlm_rlaif_token_count_50_frames_576_patches_after_projector(word_corpus):
    cfg = tiny(word_corpus, **{"model.vision.arch": CLIP_1L % 336, "model.num_frames": 50, "model.pooling": "after_projector"})
    model = build_model(cfg)
    assert model.vision.num_patches == 576
    pixels = torch.randn(1, 50, 3, 336, 336)
    feats = model.video_features(pixels)
    assert feats.shape == (1, 50, 576, 32)
    tokens = model.visual_tokens(feats)
    assert tokens.shape == (1, 626, 128) and model.num_visual_tokens == 626
    # after the projector: pool(project(x)), not project(pool(x)) (they differ for an MLP)
    expected = spatio_temporal_pool(model.projector(feats))
    torch.testing.assert_close(tokens, expected)
    assert not torch.allclose(tokens, model.projector(spatio_temporal_pool(feats)))


def test_video_chatgpt_token_count_100_frames_256_patches_before_projector(word_corpus):
    cfg = tiny(word_corpus, **{"model.vision.arch": CLIP_1L % 224, "model.num_frames": 100,
                               "model.pooling": "before_projector", "model.projector": "linear"})
    model = build_model(cfg)
    feats = torch.randn(2, 100, 256, 32)
    tokens = model.visual_tokens(feats)
    assert tokens.shape == (2, 356, 128) and model.num_visual_tokens == 356
    torch.testing.assert_close(tokens, model.projector(spatio_temporal_pool(feats)))


def test_pooling_is_temporal_then_spatial_means():
    feats = torch.arange(2 * 3 * 4 * 1, dtype=torch.float).view(1, 3, 4, 2)  # T=3 frames, P=4 patches, D=2
    pooled = spatio_temporal_pool(feats)
    assert pooled.shape == (1, 3 + 4, 2)
    torch.testing.assert_close(pooled[0, 0], feats[0, 0].mean(0))  # frame 0 averaged over patches
    torch.testing.assert_close(pooled[0, 3], feats[0, :, 0].mean(0))  # patch 0 averaged over frames
    with pytest.raises(ValueError, match="expected features"):
        spatio_temporal_pool(torch.zeros(3, 4, 2))


def test_frame_grid_pooling_keeps_each_frames_cells_then_the_spatial_tokens():
    # 1 video, 2 frames, 4 x 4 patches, 1 feature: patch value = its index, + 100 in frame 1
    features = torch.arange(16.0).view(1, 1, 16, 1).repeat(1, 2, 1, 1)
    features[:, 1] += 100
    # a 2 x 2 grid of the row-major patches: top-left {0,1,4,5} -> 2.5, top-right {2,3,6,7} -> 4.5,
    # bottom-left 10.5, bottom-right 12.5; then each patch's mean over the 2 frames (index + 50)
    assert spatio_temporal_pool(features, 2)[0, :, 0].tolist() == [2.5, 4.5, 10.5, 12.5, 102.5, 104.5, 110.5, 112.5,
                                                                    *[i + 50.0 for i in range(16)]]
    # grid 1 is Video-ChatGPT's one mean per frame, grid 4 every patch of every frame
    assert spatio_temporal_pool(features, 1)[0, :2, 0].tolist() == [7.5, 107.5]
    torch.testing.assert_close(spatio_temporal_pool(features, 4)[:, :32], features.flatten(1, 2))
    with pytest.raises(ValueError, match="frame_grid 3 does not divide a frame of 16 patches"):
        spatio_temporal_pool(features, 3)


def test_a_frame_grid_model_gives_four_tokens_a_frame_and_keeps_its_grid_when_saved(word_corpus, tmp_path):
    model = build_model(tiny(word_corpus, **{"model.frame_grid": 2}))  # 16 frames of 8 x 8 patches
    assert model.num_visual_tokens == 16 * 4 + 64
    feats = torch.randn(2, 16, 64, model.vision.hidden_size)
    torch.testing.assert_close(model.visual_tokens(feats), spatio_temporal_pool(model.projector(feats), 2))
    assert encode_prompt(model.tokenizer, "<video>\nwhat colour?", model.num_visual_tokens).count(VISUAL_TOKEN_ID) == 128
    model.save_pretrained(tmp_path / "m")
    assert load_model(tmp_path / "m").num_visual_tokens == 128
    # a start's grid is its architecture: training from it keeps the grid
    assert build_model(tiny(word_corpus, **{"model.init_from": str(tmp_path / "m")})).num_visual_tokens == 128
    with pytest.raises(ConfigError, match=r"model.frame_grid: 3 does not divide the vision tower's 8 x 8 patch grid"):
        build_model(tiny(word_corpus, **{"model.frame_grid": 3}))
    # asking a start for another grid is refused, not ignored
    with pytest.raises(ConfigError, match=r"model.frame_grid: 4 asked, but model.init_from .*/m was built with 2"):
        build_model(tiny(word_corpus, **{"model.init_from": str(tmp_path / "m"), "model.frame_grid": 4}))
    model = build_model(tiny(word_corpus))
    model.save_pretrained(tmp_path / "plain")
    with pytest.raises(ConfigError, match=r"model.visual_positions: True asked, but model.init_from .*/plain was built with False"):
        build_model(tiny(word_corpus, **{"model.init_from": str(tmp_path / "plain"), "model.visual_positions": "true"}))


def test_visual_positions_are_added_per_slot_trained_with_the_projector_and_kept_through_save_and_init_from(word_corpus, tmp_path):
    model = build_model(tiny(word_corpus, **{"model.frame_grid": 2, "model.visual_positions": "true"}))
    assert model.visual_positions.shape == (128, 128) and model.visual_positions.requires_grad
    feats = torch.randn(2, 16, 64, model.vision.hidden_size)
    pooled = spatio_temporal_pool(model.projector(feats), 2)
    torch.testing.assert_close(model.visual_tokens(feats), pooled + model.visual_positions)  # the same for every video
    model.save_pretrained(tmp_path / "m")
    loaded = load_model(tmp_path / "m")
    assert torch.equal(loaded.visual_positions, model.visual_positions)
    torch.testing.assert_close(_logits(model, word_corpus), _logits(loaded, word_corpus), rtol=0, atol=1e-6)
    started = build_model(tiny(word_corpus, **{"model.init_from": str(tmp_path / "m")}))
    assert torch.equal(started.visual_positions, model.visual_positions) and started.visual_positions.requires_grad
    frozen = build_model(tiny(word_corpus, **{"model.init_from": str(tmp_path / "m"), "model.train_projector": "false"}))
    assert not frozen.visual_positions.requires_grad
    with pytest.raises(ConfigError, match="model.num_frames: 8 frames give 96 visual tokens, but the model's visual "
                                          "positions are learnt for 128"):
        build_model(tiny(word_corpus, **{"model.init_from": str(tmp_path / "m"), "model.num_frames": 8}))
    assert build_model(tiny(word_corpus)).visual_positions is None  # off by default: the papers' models have none


@pytest.mark.parametrize("kind,act", [("mlp2x_gelu", torch.nn.GELU), ("mlp2x_relu", torch.nn.ReLU)])
def test_projector_kinds(kind, act):
    proj = build_projector(kind, 8, 16)
    assert isinstance(proj[1], act) and proj[0].in_features == 8 and proj[2].out_features == 16
    assert isinstance(build_projector("linear", 8, 16), torch.nn.Linear)


def test_preprocess_frames_resizes_and_crops():
    frames = np.random.default_rng(0).integers(0, 255, (3, 48, 80, 3), dtype=np.uint8)
    out = preprocess_frames(frames, 32)
    assert out.shape == (3, 3, 32, 32) and out.dtype == torch.float32


def test_template_masks_everything_but_answers(word_corpus):
    model = build_model(tiny(word_corpus))
    tok = model.tokenizer
    turns = [Turn("user", "<video>\nwhat colour is the square?"), Turn("assistant", "it is red.")]
    enc = encode_conversation(tok, turns, model.num_visual_tokens, 384)
    assert enc.input_ids.count(VISUAL_TOKEN_ID) == model.num_visual_tokens
    answer = [t for t, l in zip(enc.input_ids, enc.labels) if l != IGNORE_INDEX]
    assert tok.decode(answer[:-1]) == "it is red." and answer[-1] == tok.eos_token_id
    assert enc.labels[: enc.input_ids.index(VISUAL_TOKEN_ID) + model.num_visual_tokens] == [IGNORE_INDEX] * (
        enc.input_ids.index(VISUAL_TOKEN_ID) + model.num_visual_tokens
    )
    prompt = encode_prompt(tok, "<video>\nwhat colour is the square?", model.num_visual_tokens)
    assert enc.input_ids[: len(prompt)] == prompt
    with pytest.raises(DataError, match="prompt needs .* tokens .*80 visual.*max_length is 50"):
        encode_conversation(tok, turns, model.num_visual_tokens, 50, sample_id="s1")


def test_visual_tokens_are_spliced_into_their_slots(word_corpus):
    model = build_model(tiny(word_corpus))
    tok = model.tokenizer
    ids = torch.tensor([encode_prompt(tok, "<video>\nwhat colour?", model.num_visual_tokens)])
    feats = torch.randn(1, 16, 64, 64)
    embeds = model.embed(ids, feats)
    slots = ids[0] == VISUAL_TOKEN_ID
    torch.testing.assert_close(embeds[0, slots], model.visual_tokens(feats)[0])
    torch.testing.assert_close(embeds[0, ~slots], model.llm.get_input_embeddings()(ids[0, ~slots]))
    with pytest.raises(ValueError, match="visual slots"):
        model.embed(ids, torch.randn(2, 16, 64, 64))


def _logits(model, word_corpus):
    tok = model.tokenizer
    ids = torch.tensor([encode_prompt(tok, "<video>\nwhat colour is the red square?", model.num_visual_tokens)])
    feats = torch.randn(1, 16, 64, 64, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        return model.eval()(ids, torch.ones_like(ids), feats).logits


def test_labelled_logits_give_the_answers_log_probs_of_the_whole_pass(word_corpus):
    """The LM head run on the answers' positions alone gives each answer token the log-prob the
    whole teacher-forced pass gives it, for rows whose prompts and answers differ in length."""
    model = build_model(tiny(word_corpus)).eval()
    rows = [encode_conversation(model.tokenizer, [Turn("user", f"<video>\n{q}"), Turn("assistant", a)], model.num_visual_tokens, 384)
            for q, a in [("what colour is the square?", "red."), ("what?", "the square is red and the circle is blue.")]]
    width = max(len(r.input_ids) for r in rows)
    pad = lambda seq, value: seq + [value] * (width - len(seq))  # noqa: E731
    batch = {"input_ids": torch.tensor([pad(r.input_ids, 0) for r in rows]),
             "attention_mask": torch.tensor([pad([1] * len(r.input_ids), 0) for r in rows]),
             "labels": torch.tensor([pad(r.labels, IGNORE_INDEX) for r in rows]),
             "features": torch.randn(2, 16, 64, 64, generator=torch.Generator().manual_seed(0))}
    with torch.no_grad():
        whole = sequence_logps(model(**model.model_inputs(batch, "cpu")).logits, batch["labels"])
        logits, labels = labelled_logits(model, batch, "cpu")
    assert logits.shape[1] == labels.shape[1] == logits_needed(batch["labels"]) < width / 2
    torch.testing.assert_close(sequence_logps(logits, labels), whole, rtol=0, atol=1e-5)


def test_save_and_load_give_identical_logits(word_corpus, tmp_path):
    model = build_model(tiny(word_corpus))
    with torch.no_grad():  # make the weights differ from any fresh init
        for p in model.projector.parameters():
            p.add_(0.1)
    model.save_pretrained(tmp_path / "m")
    loaded = load_model(tmp_path / "m")
    saved, back = model.state_dict(), loaded.state_dict()
    assert saved.keys() == back.keys()
    for name in saved:
        assert torch.equal(saved[name], back[name]), name  # every weight comes back bit for bit
    # Same weights, same input; CPU kernels may pick other code paths for differently aligned memory,
    # so the logits are compared to 1e-6 rather than bitwise.
    torch.testing.assert_close(_logits(model, word_corpus), _logits(loaded, word_corpus), rtol=0, atol=1e-6)
    assert (tmp_path / "m" / "llm" / "model.safetensors").is_file()  # random-init base is kept
    assert not list((tmp_path / "m").rglob("*.bin"))


def test_lora_adapter_saved_on_top_of_a_referenced_base(word_corpus, tmp_path):
    base = build_model(tiny(word_corpus))
    base.save_pretrained(tmp_path / "base")
    cfg = tiny(word_corpus, **{"model.init_from": str(tmp_path / "base"), "model.lora.enabled": "true", "model.lora.r": 4})
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        model = build_model(cfg)
    assert model.uses_lora
    noise = [str(w.message) for w in caught if issubclass(w.category, FutureWarning)]  # shown to users by default
    assert not noise, noise  # no noise for users
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in n or n.startswith("projector") for n in trainable)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.normal_()
    with model.llm.disable_adapter():  # the reference policy is the starting model
        torch.testing.assert_close(_logits(model, word_corpus), _logits(load_model(tmp_path / "base"), word_corpus))
    model.save_pretrained(tmp_path / "lora")
    assert (tmp_path / "lora" / "adapter").is_dir() and not (tmp_path / "lora" / "llm").exists()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        loaded = load_model(tmp_path / "lora")
    assert not [w for w in caught if issubclass(w.category, FutureWarning)]
    torch.testing.assert_close(_logits(model, word_corpus), _logits(loaded, word_corpus))


def test_llava_hf_checkpoint_converts(word_corpus, tmp_path):
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig, LlavaForConditionalGeneration

    from vlmalign.model.tokenizer import build_word_tokenizer

    tok = build_word_tokenizer(["what", "colour", "is", "it", "red", "?"])
    cfg = LlavaConfig(
        vision_config=CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                                       image_size=28, patch_size=14).to_dict(),
        text_config=LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                num_attention_heads=4, num_key_value_heads=4).to_dict(),
        image_token_index=1,
    )
    llava = LlavaForConditionalGeneration(cfg).eval()
    llava.save_pretrained(tmp_path / "llava")
    tok.save_pretrained(tmp_path / "llava")

    model = build_model(tiny(word_corpus, **{"model.init_from": str(tmp_path / "llava"), "model.num_frames": 4}))
    assert model.num_visual_tokens == 4 + 4
    pixels = torch.randn(1, 4, 3, 28, 28)
    with torch.no_grad():
        feats = model.video_features(pixels)
        ref_feats = llava.model.vision_tower(pixels[0], output_hidden_states=True).hidden_states[-2][:, 1:]
        torch.testing.assert_close(feats[0], ref_feats)
        torch.testing.assert_close(model.projector(feats[0]), llava.model.multi_modal_projector(ref_feats))
        ids = torch.tensor([[2, 4, 5, 6]])
        torch.testing.assert_close(model.llm(input_ids=ids).logits, llava(input_ids=ids).logits)


def test_a_model_started_from_a_checkpoint_trains_its_llm(word_corpus, tmp_path):
    build_model(tiny(word_corpus)).save_pretrained(tmp_path / "start")
    full = build_model(tiny(word_corpus, **{"model.init_from": str(tmp_path / "start")}))
    assert all(p.requires_grad for p in full.llm.parameters())
    lora = build_model(tiny(word_corpus, **{"model.init_from": str(tmp_path / "start"), "model.lora.enabled": "true"}))
    trainable = [n for n, p in lora.llm.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n for n in trainable)


def test_gradient_checkpointing_keeps_the_gradients_and_asks_for_no_cache(word_corpus):
    """Gradient checkpointing gives the same loss gradients; a teacher-forced pass keeps no KV cache
    (asking for one made transformers warn on every training run that it drops it)."""
    grads = []
    for checkpointing in (False, True):
        torch.manual_seed(0)
        model = build_model(tiny(word_corpus, **{"model.gradient_checkpointing": str(checkpointing).lower()})).train()
        ids = torch.randint(0, len(model.tokenizer), (2, 12), generator=torch.Generator().manual_seed(0))
        mask = torch.ones_like(ids)
        out = model(ids, mask)
        assert out.past_key_values is None
        out.logits.logsumexp(-1).mean().backward()
        grads.append({n: p.grad for n, p in model.llm.named_parameters() if p.requires_grad})
    for name, grad in grads[0].items():
        torch.testing.assert_close(grads[1][name], grad, rtol=1e-4, atol=1e-6)


def test_qlora_on_a_saved_model_quantises_the_base_and_trains_the_adapter(word_corpus, tmp_path):
    """QLoRA (nf4 base + LoRA) started from a saved model, on CPU with bitsandbytes >= 0.45."""
    bnb = pytest.importorskip("bitsandbytes", reason="QLoRA needs the optional bitsandbytes extra (pip install -e '.[qlora]')")
    start = build_model(tiny(word_corpus))
    start.save_pretrained(tmp_path / "start")
    qlora = {"model.init_from": str(tmp_path / "start"), "model.lora.enabled": "true", "model.lora.r": 4,
             "model.quantization.load_in_4bit": "true", "model.quantization.compute_dtype": "float32"}
    model = build_model(tiny(word_corpus, **qlora))
    layers = [m for m in model.llm.modules() if isinstance(m, bnb.nn.Linear4bit)]
    assert layers and all(m.weight.quant_type == "nf4" for m in layers)
    # 2 layers x (q, k, v, o, gate, up, down); lm_head stays in full precision
    assert len(layers) == 2 * 7 and not isinstance(model.llm.get_output_embeddings(), bnb.nn.Linear4bit)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in n or n.startswith("projector") for n in trainable)

    # 4-bit weights change the logits a little, not the model
    reference = _logits(load_model(tmp_path / "start"), word_corpus)
    with model.llm.disable_adapter():
        quantised = _logits(model, word_corpus)
    assert not torch.allclose(quantised, reference, atol=1e-4)
    assert torch.corrcoef(torch.stack([quantised.flatten(), reference.flatten()]))[0, 1] > 0.95

    # the adapter learns through the frozen 4-bit base
    ids = torch.tensor([encode_prompt(model.tokenizer, "<video>\nwhat colour is the red square?", model.num_visual_tokens)])
    feats = torch.randn(1, 16, 64, 64, generator=torch.Generator().manual_seed(0))
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    model.train()
    losses = []
    for _ in range(10):
        logits = model(ids, torch.ones_like(ids), feats).logits
        loss = torch.nn.functional.cross_entropy(logits[0, :-1], ids[0, 1:].clamp(min=0))
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    assert losses[-1] < 0.8 * losses[0]
    assert all(m.weight.dtype == torch.uint8 for m in layers)  # the base stayed quantised


@pytest.mark.parametrize("intermediate_size", [384, 344])  # the tiny config's own, and one the repacking refused
def test_qlora_on_cpu_trains_the_same_after_an_inference_forward(word_corpus, tmp_path, intermediate_size):
    """An inference forward (eval, no gradients: sampling, a reference pass) leaves training as it
    was. bitsandbytes' CPU inference repacking (AVX512-BF16 processors) has no backward: once it
    ran, the gradient through every frozen 4-bit layer was silently dropped. It also refused the
    128 -> 344 MLP (blocks of 32 output rows); it is off for 4-bit models on CPU, so any shape runs."""
    pytest.importorskip("bitsandbytes", reason="QLoRA needs the optional bitsandbytes extra (pip install -e '.[qlora]')")
    build_model(tiny(word_corpus, **{"model.llm.arch.intermediate_size": intermediate_size})).save_pretrained(tmp_path / "start")
    qlora = {"model.init_from": str(tmp_path / "start"), "model.lora.enabled": "true", "model.lora.r": 4,
             "model.quantization.load_in_4bit": "true", "model.quantization.compute_dtype": "float32"}
    model = build_model(tiny(word_corpus, **qlora))
    ids = torch.tensor([encode_prompt(model.tokenizer, "<video>\nwhat colour is the red square?", model.num_visual_tokens)])
    feats = torch.randn(1, 16, 64, 64, generator=torch.Generator().manual_seed(0))

    def adapter_grads():
        model.train()
        torch.manual_seed(0)  # the same LoRA dropout masks
        logits = model(ids, torch.ones_like(ids), feats).logits
        torch.nn.functional.cross_entropy(logits[0, :-1], ids[0, 1:].clamp(min=0)).backward()
        grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
        model.zero_grad()
        return grads

    before = adapter_grads()
    model.eval()
    with torch.no_grad():
        assert torch.isfinite(model(ids, torch.ones_like(ids), feats).logits).all()
    after = adapter_grads()
    assert before and all(torch.isfinite(g).all() for g in before.values())
    for name in before:
        torch.testing.assert_close(after[name], before[name], msg=name)


def test_word_tokenizer_comes_from_the_corpus_alone(word_corpus):
    """The tiny model's vocabulary (and so its initialisation) depends on the benchmark's files only:
    it once also took every packaged prompt's words, so editing a prompt moved every tiny result."""
    from vlmalign.model.tokenizer import SPECIAL_TOKENS, corpus_words

    model = build_model(tiny(word_corpus))
    expected = SPECIAL_TOKENS + corpus_words([word_corpus])
    assert sorted(model.tokenizer.get_vocab(), key=model.tokenizer.get_vocab().get) == expected
    # a word of the packaged judge prompts that the corpus lacks reads as <unk>
    assert model.tokenizer.convert_tokens_to_ids("assistant") == model.tokenizer.unk_token_id
