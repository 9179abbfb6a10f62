"""Tokenised samples and the collator that pads them and attaches their visual inputs."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from vlmalign.data.features import VisualInputs
from vlmalign.data.formats import InstructionSample
from vlmalign.data.template import IGNORE_INDEX, VISUAL_TOKEN_ID, encode_conversation


@dataclass
class EncodedSample:
    id: str
    input_ids: list[int]
    labels: list[int]
    video: str | list[str] | None


def encode_instructions(samples: list[InstructionSample], tokenizer, num_visual_tokens: int, max_length: int) -> list[EncodedSample]:
    out = []
    for s in samples:
        enc = encode_conversation(tokenizer, s.turns, num_visual_tokens, max_length, sample_id=f"{s.id} ({s.source})")
        out.append(EncodedSample(s.id, enc.input_ids, enc.labels, s.video))
    return out


def pad_sequences(seqs: list[list[int]], value: int, side: str = "right") -> torch.Tensor:
    width = max(len(s) for s in seqs)
    rows = [(s + [value] * (width - len(s))) if side == "right" else ([value] * (width - len(s)) + s) for s in seqs]
    return torch.tensor(rows, dtype=torch.long)


class Collator:
    """Pads ids (pad id), labels (-100) and the attention mask, and stacks the visual inputs of the
    rows that have a video: features [N, T, P, D] under `features`, or frames [N, T, 3, S, S] under
    `pixels` when the vision tower is trained."""

    def __init__(self, pad_id: int, visual: VisualInputs, side: str = "right"):
        self.pad_id = pad_id
        self.visual = visual
        self.side = side

    def __call__(self, items: list[EncodedSample]) -> dict:
        batch = {
            "ids": [it.id for it in items],
            "input_ids": pad_sequences([it.input_ids for it in items], self.pad_id, self.side),
            "labels": pad_sequences([it.labels for it in items], IGNORE_INDEX, self.side),
            "attention_mask": pad_sequences([[1] * len(it.input_ids) for it in items], 0, self.side),
        }
        videos = [it.video for it in items if VISUAL_TOKEN_ID in it.input_ids]
        if videos:
            key = "features" if self.visual.use_features else "pixels"
            batch[key] = torch.stack(self.visual.features(videos) if self.visual.use_features else [self.visual.pixels(v) for v in videos])
        return batch


def model_inputs(model, batch: dict, device) -> dict:
    """The VideoLM forward arguments for a collated batch (runs the vision tower when it is trained)."""
    features = batch.get("features")
    if features is None and "pixels" in batch:
        features = model.video_features(batch["pixels"].to(device))
    return {
        "input_ids": batch["input_ids"].to(device),
        "attention_mask": batch["attention_mask"].to(device),
        "features": None if features is None else features.to(device),
    }
