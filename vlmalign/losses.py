"""Every loss and advantage as a small pure function, shared by the trainers.

Conventions: `labels` use -100 for positions that carry no loss; logits are [B, L, V] and are
shifted here (position t predicts token t + 1), as causal LMs do.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

IGNORE_INDEX = -100


def token_logps(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token log-probabilities of `labels` under `logits` (shifted), and the mask of counted tokens.

    Returns ([B, L-1] log-probs with 0 at ignored positions, [B, L-1] bool mask).
    """
    logits = logits[:, :-1].float()
    targets = labels[:, 1:]
    mask = targets != IGNORE_INDEX
    logps = torch.gather(logits.log_softmax(-1), 2, targets.clamp(min=0).unsqueeze(-1)).squeeze(-1)
    return logps * mask, mask


def sft_loss(logits: torch.Tensor, labels: torch.Tensor, num_tokens: int | None = None) -> torch.Tensor:
    """Summed next-token cross-entropy over answer tokens divided by `num_tokens`.

    `num_tokens` defaults to this batch's answer-token count (plain token mean). Trainers pass the
    count over the whole optimizer step (all micro-batches, all processes) so the gradient does not
    depend on how the step is split.
    """
    logps, mask = token_logps(logits, labels)
    count = int(mask.sum()) if num_tokens is None else num_tokens
    return -logps.sum() / max(count, 1)
