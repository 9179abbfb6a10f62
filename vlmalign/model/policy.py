"""The policy interface: what every stage asks of a video LLM, whichever family implements it.

Two families implement it:
    VideoLM      (`model/video_lm.py`) our CLIP + pooling + projector + causal LM, the papers' model
    HFVideoLM    (`model/hf_video.py`) a transformers video model (Qwen2-VL, Qwen2.5-VL, Qwen3-VL,
                 LLaVA-OneVision, LLaVA-NeXT-Video, Video-LLaVA) driven with its own chat template,
                 video tokens and positions

Stages build or load a policy with `build_model` / `load_model` below, which pick the family from
the checkpoint (a saved model's model.json, or an HF checkpoint's config.json architectures), and
then only call these operations:

    video_layout(video), inputs_layout(inputs)          what a video's ids depend on (its frames' count
                                                        and times; None for VideoLM), from the video
                                                        or from visual inputs in hand (a clip)
    encode_conversation(turns, max_length, sample_id,   training ids and labels (answers only)
                        layout)
    encode_prompt(question, layout)                     generation prompt ids
    visual_slot_id, num_visual_tokens                   how a video shows in the ids, and its most tokens
    unsampled_token_ids                                 ids sampling never picks (vision markers)
    visual_inputs(cache_dir)                            per-video inputs (features, or pixels)
    stack_visual(items)                                 a batch's visual entries for the collator
    model_inputs(batch, device)                         forward arguments of a collated batch
    forward(..., logits_to_keep=0) -> output .logits    teacher-forced logits (of the last logits_to_keep
                                                        positions; 0: all); `labelled_logits` below
    hidden_states(...) -> [B, L, H]                     the LM's final hidden states (reward and value heads)
    encode_followup(turns, text, max_length,           a conversation, then one more user turn to answer
                    sample_id, layout)
    language_model                                      the causal LM (its embeddings and LM head)
    frame_settings()                                    what decides the frames read and their tokens
    prefill(input_ids, attention_mask, visual)          shared-prefix sampling and training: one prefill ...
    extend(tokens, attention_mask, state)               ... then tokens [rows, n] on its cache (one per
                                                        step when sampling, whole answers when training)
    reference()                                         context: the starting policy (LoRA off)
    uses_lora, save_pretrained(path), tokenizer, device
"""

from __future__ import annotations

from contextlib import contextmanager
from pathlib import Path

import torch
from accelerate.utils import extract_model_from_parallel
from torch import nn

from vlmalign.config import ModelConfig, QuantizationConfig
from vlmalign.data.formats import read_json
from vlmalign.errors import ConfigError
from vlmalign.losses import logits_needed

MANIFEST = "model.json"


class Policy(nn.Module):
    """Base of the model families; see the module doc for the contract."""

    cfg: ModelConfig
    tokenizer: object

    @property
    def uses_lora(self) -> bool:
        raise NotImplementedError

    @contextmanager
    def reference(self):
        """The starting policy for as long as the context lasts: a LoRA policy with its adapter off."""
        if not self.uses_lora:
            raise RuntimeError("reference(): only a LoRA policy holds its starting weights")
        with self.adapted_module().disable_adapter():
            yield self

    def adapted_module(self):
        """The module LoRA wraps (a peft model)."""
        raise NotImplementedError

    def video_layout(self, video):
        """What this family's ids depend on for `video` (a file, frame folder or image list): None
        where they do not (every video gives the same tokens)."""
        return None

    def inputs_layout(self, inputs):
        """`video_layout` of visual inputs from `visual_inputs(...)`: a video's, or a clip's."""
        return None

    def frame_settings(self) -> dict:
        """What decides which frames of a video the model reads and the tokens they become: two
        models with equal settings fill each other's visual slots (PPO's value model reads the
        policy's ids)."""
        raise NotImplementedError

    @property
    def hidden_size(self) -> int:
        return self.language_model.get_input_embeddings().embedding_dim


def labelled_logits(model, batch: dict, device) -> tuple[torch.Tensor, torch.Tensor]:
    """(logits, labels) of a collated batch, cut to the positions its labelled tokens' log-probs
    read (`losses.logits_needed`): the LM head and the softmax skip the prompt before every answer,
    most of a short answer's sequence (a 32-row SFT batch of one-sentence answers: 147 labelled
    tokens of 5,856). `model` may be wrapped for data parallelism."""
    labels = batch["labels"].to(device)
    keep = logits_needed(labels)
    logits = model(**extract_model_from_parallel(model).model_inputs(batch, device), logits_to_keep=keep).logits
    return logits, labels[:, -keep:]


def hf_architecture(path: str | Path) -> str | None:
    """The first `architectures` entry of an HF checkpoint's config.json: a local folder's, or a hub
    name's (from the hub or its local cache); None for anything else."""
    path = Path(path)
    if path.exists():
        config = path / "config.json"
        return (read_json(config).get("architectures") or [None])[0] if config.is_file() else None
    from transformers import AutoConfig

    try:
        return (AutoConfig.from_pretrained(str(path)).architectures or [None])[0]
    except (OSError, ValueError):
        return None


def _family(path: Path) -> str:
    if (path / MANIFEST).is_file():
        return read_json(path / MANIFEST).get("family", "video_lm")
    from vlmalign.model.hf_video import is_hf_video

    return "hf_video" if is_hf_video(path) else "video_lm"


def build_model(cfg: ModelConfig) -> Policy:
    """A trainable policy from a model config: the family is the one `model.init_from` holds
    (our VideoLM when it is empty or a VideoLM / llava-hf checkpoint)."""
    if cfg.init_from and _family(Path(cfg.init_from)) == "hf_video":
        from vlmalign.model.hf_video import build_hf_video

        if cfg.frame_grid != 1 or cfg.visual_positions:
            raise ConfigError(f"model.{'frame_grid' if cfg.frame_grid != 1 else 'visual_positions'}: HF video models "
                              "pool and place each frame as their checkpoint does; this is for vlmalign's VideoLM")
        return build_hf_video(cfg)
    if cfg.fps is not None:
        raise ConfigError(f"model.fps: vlmalign's VideoLM reads a fixed model.num_frames (its token count is fixed); "
                          "fps sampling is for HF video models (model/hf_video.py)")
    if cfg.max_visual_tokens is not None:
        raise ConfigError("model.max_visual_tokens: vlmalign's VideoLM gives every video model.num_frames x model.frame_grid^2 "
                          "+ its patch count tokens; the budget is for HF video models (model/hf_video.py)")
    if cfg.max_video_pixels is not None:
        raise ConfigError("model.max_video_pixels: vlmalign's VideoLM reads every frame at its CLIP tower's size; the "
                          "pixel budget is for the HF Qwen families (model/hf_video.py)")
    from vlmalign.model.video_lm import build_video_lm

    return build_video_lm(cfg)


def load_model(path: str | Path, trainable: bool = False, quantization: QuantizationConfig | None = None) -> Policy:
    """A saved policy (either family), an HF video checkpoint, or a llava-hf LLaVA-1.5 checkpoint."""
    path = Path(path)
    if _family(path) == "hf_video":
        from vlmalign.model.hf_video import load_hf_video

        return load_hf_video(path, trainable=trainable, quantization=quantization)
    from vlmalign.model.video_lm import load_video_lm

    return load_video_lm(path, trainable=trainable, quantization=quantization)
