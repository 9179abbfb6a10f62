"""Tokenised samples and the collator that pads them and attaches their visual inputs."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from vlmalign.data.formats import InstructionSample
from vlmalign.data.template import IGNORE_INDEX


@dataclass
class EncodedSample:
    id: str
    input_ids: list[int]
    labels: list[int]
    video: str | list[str] | None
    kind: str | None = None  # the sample's question type (InstructionSample.kind)


def encode_instructions(samples: list[InstructionSample], policy, max_length: int) -> list[EncodedSample]:
    out = []
    for s in samples:
        enc = policy.encode_conversation(s.turns, max_length, sample_id=f"{s.id} ({s.source})",
                                         layout=policy.video_layout(s.video))
        out.append(EncodedSample(s.id, enc.input_ids, enc.labels, s.video, s.kind))
    return out


def pad_sequences(seqs: list[list[int]], value: int, side: str = "right") -> torch.Tensor:
    width = max(len(s) for s in seqs)
    rows = [(s + [value] * (width - len(s))) if side == "right" else ([value] * (width - len(s)) + s) for s in seqs]
    return torch.tensor(rows, dtype=torch.long)


class Collator:
    """Pads ids (pad id), labels (-100) and the attention mask, and adds the visual inputs of the
    rows that have a video as the policy stacks them (`policy.stack_visual`: features or frames for
    VideoLM, patches and grids for an HF video model)."""

    def __init__(self, policy, visual, side: str = "right"):
        self.policy = policy
        self.pad_id = policy.tokenizer.pad_token_id
        self.visual = visual
        self.side = side

    def __call__(self, items: list[EncodedSample]) -> dict:
        batch = {
            "ids": [it.id for it in items],
            "kinds": [it.kind for it in items],
            "input_ids": pad_sequences([it.input_ids for it in items], self.pad_id, self.side),
            "labels": pad_sequences([it.labels for it in items], IGNORE_INDEX, self.side),
            "attention_mask": pad_sequences([[1] * len(it.input_ids) for it in items], 0, self.side),
        }
        videos = [it.video for it in items if self.policy.visual_slot_id in it.input_ids]
        if videos:
            batch.update(self.policy.stack_visual(self.visual.batch(videos)))
        return batch
