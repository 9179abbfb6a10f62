"""Reward (and value) model: a policy backbone (either family, `model/policy.py`) with a scalar head
on its last hidden states.

The head reads the LLM's final hidden state (after the last norm, before `lm_head`) at every
position: `forward` returns [B, L] scores. A reward model uses the score of each row's last
attended token (`final_scores`), after the conversation and the evaluation prompt appended as one
more user turn (`USER: {reward.evaluate} ASSISTANT:` in VideoLM's template, the checkpoint's chat
template for an HF model); PPO's value model uses the scores at the positions that predict each
answer token.

Saved layout: the backbone's `save_pretrained` layout (so a LoRA reward model records its SFT base
and stores only its adapter), plus
    value_head.safetensors   the head (`weight` [1, H], `bias` [1]), always float32
    reward.json              the evaluation prompt the model was trained with, and its prompt id
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from vlmalign.config import ModelConfig
from vlmalign.data.collate import Collator, EncodedSample
from vlmalign.data.formats import VIDEO_TOKEN, Turn, read_json
from vlmalign.data.template import IGNORE_INDEX
from vlmalign.errors import ConfigError
from vlmalign.model.policy import Policy, build_model, load_model

HEAD_FILE = "value_head.safetensors"
REWARD_FILE = "reward.json"


class RewardModel(nn.Module):
    def __init__(self, backbone: Policy, head: nn.Linear, evaluation_prompt: str, prompt_id: str):
        super().__init__()
        self.backbone = backbone
        self.head = head
        self.evaluation_prompt = evaluation_prompt
        self.prompt_id = prompt_id
        # The score reads the decoder's hidden states, never the LM head: a trainable head that gets
        # no gradient would stall data-parallel training (an untied head only; a tied one is the
        # input embedding and is used).
        llm = backbone.language_model
        lm_head = llm.get_output_embeddings()
        if lm_head is not None and lm_head.weight is not llm.get_input_embeddings().weight:
            lm_head.requires_grad_(False)

    @property
    def tokenizer(self):
        return self.backbone.tokenizer

    @property
    def device(self) -> torch.device:
        return self.backbone.device

    def forward(self, **inputs) -> torch.Tensor:
        """Scalar score at every position, [B, L] float32; `inputs` as `backbone.model_inputs` gives them."""
        hidden = self.backbone.hidden_states(**inputs)
        return self.head(hidden.to(self.head.weight.dtype)).squeeze(-1)

    def encode(self, question: str, answer: str, video, max_length: int, sample_id: str = "") -> EncodedSample:
        """Reward-model input for one answer: the conversation, then the evaluation turn.

        The question gets a `<video>` placeholder at its start when it has none and a video is given,
        as in generation. Room for the evaluation turn is kept, so a long answer is cut rather than
        the prompt that asks for the judgement.
        """
        text = question if video is None or VIDEO_TOKEN in question else f"{VIDEO_TOKEN}\n{question}"
        ids = self.backbone.encode_followup([Turn("user", text), Turn("assistant", answer)], self.evaluation_prompt,
                                            max_length, sample_id, layout=self.backbone.video_layout(video))
        return EncodedSample(sample_id, ids, [IGNORE_INDEX] * len(ids), video)

    def save_pretrained(self, path: str | Path) -> None:
        path = Path(path)
        self.backbone.save_pretrained(path)
        state = {k: v.detach().float().cpu().contiguous() for k, v in self.head.state_dict().items()}
        save_file(state, path / HEAD_FILE)
        info = {"evaluation_prompt": self.evaluation_prompt, "prompt": self.prompt_id, "head": HEAD_FILE}
        (path / REWARD_FILE).write_text(json.dumps(info, indent=2))


def final_scores(scores: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """[B, L] per-position scores -> [B] at each row's last attended token (either padding side)."""
    width = attention_mask.shape[1]
    last = width - 1 - attention_mask.flip(1).long().argmax(1)
    return scores.gather(1, last.unsqueeze(1)).squeeze(1)


@torch.no_grad()
def score_samples(model: RewardModel, collate: Collator, samples: list[EncodedSample], batch_size: int) -> torch.Tensor:
    """[N] rewards of encoded reward-model inputs, `batch_size` rows per forward pass, in eval mode."""
    was_training = model.training
    model.eval()
    out = []
    for start in range(0, len(samples), batch_size):
        batch = collate(samples[start : start + batch_size])
        inputs = model.backbone.model_inputs(batch, model.device)
        out.append(final_scores(model(**inputs), inputs["attention_mask"]).float().cpu())
    model.train(was_training)
    return torch.cat(out) if out else torch.zeros(0)


def build_reward_model(cfg: ModelConfig, evaluation_prompt: str, prompt_id: str) -> RewardModel:
    """A trainable reward model: `build_model(cfg)` (usually the SFT policy via `init_from`, LoRA per
    cfg.lora) plus a new head with a zero bias."""
    backbone = build_model(cfg)
    head = nn.Linear(backbone.hidden_size, 1)
    # Zero bias, as VLM-RLAIF's head: the new head adds no offset, and the centering term of the
    # loss keeps the mean reward near zero from there (the Bradley-Terry term sees differences only).
    nn.init.zeros_(head.bias)
    return RewardModel(backbone, head, evaluation_prompt, prompt_id)


def load_reward_model(path: str | Path, trainable: bool = False) -> RewardModel:
    """A reward model saved by `RewardModel.save_pretrained`; `trainable` gives a copy to train
    further (PPO's value model: its own adapter, or all LLM weights without LoRA, and the head)."""
    path = Path(path)
    if not (path / HEAD_FILE).is_file() or not (path / REWARD_FILE).is_file():
        raise ConfigError(f"not a reward model directory (no {HEAD_FILE} / {REWARD_FILE}; train one with `vlmalign train-rm`): {path}")
    backbone = load_model(path, trainable=trainable)
    info = read_json(path / REWARD_FILE)
    head = nn.Linear(backbone.hidden_size, 1)
    head.load_state_dict(load_file(path / HEAD_FILE))
    model = RewardModel(backbone, head, info["evaluation_prompt"], info["prompt"])
    head.requires_grad_(trainable)
    return model.train(trainable)
