"""Every loss and advantage as a small pure function, shared by the trainers.

Conventions: `labels` use -100 for positions that carry no loss; logits are [B, L, V] and are
shifted here (position t predicts token t + 1), as causal LMs do.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

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


def logits_needed(labels: torch.Tensor) -> int:
    """How many trailing positions' logits `token_logps` reads for `labels` [B, L]: from the one
    before the batch's first counted token to the end (at least 1). Given the logits of those
    positions alone and `labels[:, -n:]`, every loss here computes what it computes on the whole."""
    counted = (labels[:, 1:] != IGNORE_INDEX).any(0).nonzero()
    return labels.shape[1] - int(counted[0]) if len(counted) else 1


def sft_loss(logits: torch.Tensor, labels: torch.Tensor, num_tokens: int | None = None) -> torch.Tensor:
    """Summed next-token cross-entropy over answer tokens divided by `num_tokens`.

    `num_tokens` defaults to this batch's answer-token count (plain token mean). Trainers pass the
    count over the whole optimizer step (all micro-batches, all processes) so the gradient does not
    depend on how the step is split.
    """
    logps, mask = token_logps(logits, labels)
    count = int(mask.sum()) if num_tokens is None else num_tokens
    return -logps.sum() / max(count, 1)


def answer_nll(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Each row's summed next-token cross-entropy over its answer tokens, and their count: [B], [B].
    SFT makes its loss from them (their sum over `num_tokens` is `sft_loss`) and sums them per
    question type for the loss it logs by kind."""
    logps, mask = token_logps(logits, labels)
    return -logps.sum(-1), mask.sum(-1)


def sequence_logps(logits: torch.Tensor, labels: torch.Tensor, average: bool = False) -> torch.Tensor:
    """Log-probability of each row's label tokens: [B, L, V] logits, [B, L] labels -> [B].

    The sum over counted tokens by default (what DPO and the GRPO_rank ordering use); `average=True`
    divides by the number of counted tokens instead (a row with none gives 0).
    """
    logps, mask = token_logps(logits, labels)
    total = logps.sum(-1)
    if average:
        return total / mask.sum(-1).clamp(min=1)
    return total


# --- DPO ---------------------------------------------------------------------------------------------

DPO_LOSS_TYPES = ("sigmoid", "ipo", "hinge")


def dpo_loss(
    policy_chosen_logps: torch.Tensor,
    policy_rejected_logps: torch.Tensor,
    ref_chosen_logps: torch.Tensor,
    ref_rejected_logps: torch.Tensor,
    beta: float = 0.1,
    loss_type: str = "sigmoid",
    label_smoothing: float = 0.0,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-pair DPO loss and implicit rewards; every input is [B] sequence log-probs.

    With `margin = (policy_chosen - ref_chosen) - (policy_rejected - ref_rejected)`:
      sigmoid: -(1 - ls) * log sigmoid(beta * margin) - ls * log sigmoid(-beta * margin), where ls is
               `label_smoothing`, the probability that a label is flipped (conservative DPO; 0 = DPO);
      ipo:     (margin - 1 / (2 * beta))^2;
      hinge:   relu(1 - beta * margin).
    Returns (losses [B], chosen_rewards [B], rejected_rewards [B]); the rewards are
    beta * (policy - ref), detached, for logging.

    TRL's IPO divides each log-ratio by the completion's token count before taking the margin; to get
    that, pass mean log-probs (`sequence_logps(..., average=True)`) instead of sums.
    """
    if loss_type not in DPO_LOSS_TYPES:
        raise ValueError(f"unknown DPO loss_type {loss_type!r}; expected one of {', '.join(DPO_LOSS_TYPES)}")
    if not 0.0 <= label_smoothing < 0.5:
        raise ValueError(f"label_smoothing must be in [0, 0.5), got {label_smoothing}")
    if label_smoothing and loss_type != "sigmoid":
        raise ValueError(f"label_smoothing only applies to the sigmoid loss, not {loss_type!r}")
    chosen_logratios = policy_chosen_logps - ref_chosen_logps
    rejected_logratios = policy_rejected_logps - ref_rejected_logps
    margin = chosen_logratios - rejected_logratios
    if loss_type == "sigmoid":
        losses = (-(1 - label_smoothing) * F.logsigmoid(beta * margin)
                  - label_smoothing * F.logsigmoid(-beta * margin))
    elif loss_type == "ipo":
        losses = (margin - 1 / (2 * beta)) ** 2
    else:
        losses = torch.relu(1 - beta * margin)
    return losses, beta * chosen_logratios.detach(), beta * rejected_logratios.detach()


# --- Reward model ------------------------------------------------------------------------------------


def _check_preference(preference: torch.Tensor) -> torch.Tensor:
    if not ((preference == 0) | (preference == 1)).all():
        raise ValueError("preference must hold only 0 (A preferred) or 1 (B preferred)")
    return preference


def reward_model_loss(
    rewards_a: torch.Tensor, rewards_b: torch.Tensor, preference: torch.Tensor, center_coef: float = 1e-3
) -> torch.Tensor:
    """Bradley-Terry loss for a scalar reward model, with VLM-RLAIF's centering term; returns a scalar.

    `rewards_a`, `rewards_b`: [B] rewards of the two answers of each pair. `preference`: [B] of 0 or 1,
    0 = answer A preferred, 1 = answer B preferred (a file's 1|2 must be mapped to 0|1 first).
    Loss = mean BCE(r_a - r_b, target 1 when A is preferred) + center_coef * |mean(r_a + r_b)|.
    The BCE only sees reward differences, so the centering term is what keeps the rewards near zero.
    """
    target = 1 - _check_preference(preference).to(rewards_a.dtype)
    bce = F.binary_cross_entropy_with_logits(rewards_a - rewards_b, target)
    return bce + center_coef * (rewards_a + rewards_b).mean().abs()


def preference_accuracy(rewards_a: torch.Tensor, rewards_b: torch.Tensor, preference: torch.Tensor) -> torch.Tensor:
    """Fraction of pairs whose higher reward is the preferred answer (scalar; inputs as `reward_model_loss`).

    A tie counts as predicting B, as the released VLM-RLAIF metric does.
    """
    predicts_b = rewards_b >= rewards_a
    return (predicts_b == _check_preference(preference).bool()).float().mean()


# --- PPO (AlpacaFarm style) ----------------------------------------------------------------------------
# All [B, T] tensors here are per response token and right-padded: `mask` is 1 on a prefix of each row.


def masked_mean(values: torch.Tensor, mask: torch.Tensor, dim: int | None = None) -> torch.Tensor:
    """Mean of `values` where `mask` is set, over all elements or along `dim`; an empty mask gives 0."""
    mask = mask.to(values.dtype)
    if dim is None:
        return (values * mask).sum() / mask.sum().clamp(min=1)
    return (values * mask).sum(dim) / mask.sum(dim).clamp(min=1)


def masked_whiten(values: torch.Tensor, mask: torch.Tensor, shift_mean: bool = True, all_sum=None) -> torch.Tensor:
    """Scale the masked values to unit variance (population variance, as AlpacaFarm) and, with
    `shift_mean`, to zero mean; with `shift_mean=False` the mean is kept (used to whiten rewards without
    changing their sign). Masked-out positions come back as 0. `all_sum` (a tensor -> its sum over
    processes) takes the mean and variance over every process's rows, as if they were one batch.
    """
    total = all_sum or (lambda t: t)
    mask_f = mask.to(values.dtype)
    count = total(mask_f.sum()).clamp(min=1)
    mean = total((values * mask_f).sum()) / count
    std = (total(((values - mean) ** 2 * mask_f).sum()) / count).sqrt()
    whitened = (values - mean) / (std + 1e-8)
    if not shift_mean:
        whitened = whitened + mean
    return whitened * mask


def _check_right_padded(mask: torch.Tensor) -> None:
    # The backward recursions below treat the last set position of a row as its final token; a hole in
    # the mask would silently cut the row in two.
    if (mask[:, 1:].bool() & ~mask[:, :-1].bool()).any():
        raise ValueError("mask must be right-padded: 1 on a prefix of each row, then 0")


def gae_advantages(
    rewards: torch.Tensor, values: torch.Tensor, mask: torch.Tensor, gamma: float = 1.0, lam: float = 1.0
) -> tuple[torch.Tensor, torch.Tensor]:
    """Generalised advantage estimation over right-padded responses; all [B, T].

    delta_t = r_t + gamma * V_{t+1} - V_t with V = 0 after a row's last valid token, and
    A_t = delta_t + gamma * lam * A_{t+1}. Returns (advantages, returns = advantages + values), both 0
    at masked positions. Whitening the advantages is the caller's step (`masked_whiten`).
    """
    _check_right_padded(mask)
    mask = mask.to(values.dtype)
    next_values = torch.cat([values[:, 1:] * mask[:, 1:], values.new_zeros(values.shape[0], 1)], dim=1)
    deltas = (rewards + gamma * next_values - values) * mask
    advantages = torch.zeros_like(values)
    running = values.new_zeros(values.shape[0])
    for t in reversed(range(values.shape[1])):
        running = deltas[:, t] + gamma * lam * running * mask[:, t]
        advantages[:, t] = running
    return advantages, (advantages + values) * mask


def ppo_policy_loss(
    logps: torch.Tensor, old_logps: torch.Tensor, advantages: torch.Tensor, mask: torch.Tensor, clip: float = 0.2
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Clipped PPO surrogate over valid tokens; inputs [B, T] (per-token advantages, e.g. whitened GAE).

    loss = masked mean of max(-A * ratio, -A * clamp(ratio, 1 - clip, 1 + clip)), ratio = exp(logp - old).
    Returns (loss, clip_fraction, approx_kl) where clip_fraction is the share of tokens on which the
    clipped term is the larger one and approx_kl = 0.5 * mean((logp - old)^2); both are detached.
    """
    log_ratio = logps - old_logps.detach()
    ratio = log_ratio.exp()
    advantages = advantages.detach()
    unclipped = -advantages * ratio
    clipped = -advantages * ratio.clamp(1 - clip, 1 + clip)
    loss = masked_mean(torch.maximum(unclipped, clipped), mask)
    clip_fraction = masked_mean((clipped > unclipped).float(), mask)
    approx_kl = 0.5 * masked_mean(log_ratio.detach() ** 2, mask)
    return loss, clip_fraction, approx_kl


def ppo_value_loss(
    values: torch.Tensor, old_values: torch.Tensor, returns: torch.Tensor, mask: torch.Tensor, clip: float = 0.2
) -> tuple[torch.Tensor, torch.Tensor]:
    """Clipped value loss over valid tokens; inputs [B, T].

    The new prediction may move at most `clip` from the rollout's value before its error stops
    shrinking: loss = 0.5 * masked mean of max((V - R)^2, (clamp(V, V_old +- clip) - R)^2).
    Returns (loss, clip_fraction).
    """
    old_values, returns = old_values.detach(), returns.detach()
    clipped_values = torch.clamp(values, old_values - clip, old_values + clip)
    unclipped_error = (values - returns) ** 2
    clipped_error = (clipped_values - returns) ** 2
    loss = 0.5 * masked_mean(torch.maximum(unclipped_error, clipped_error), mask)
    clip_fraction = masked_mean((clipped_error > unclipped_error).float(), mask)
    return loss, clip_fraction


def kl_penalized_rewards(
    score: torch.Tensor,
    logps: torch.Tensor,
    ref_logps: torch.Tensor,
    mask: torch.Tensor,
    kl_coef: float = 0.1,
    clamp_kl: bool = False,
) -> torch.Tensor:
    """Per-token PPO rewards [B, T]: -kl_coef * (logp - ref_logp) on each valid token (the k1 KL
    estimate) plus the sequence `score` [B] on each row's last valid token; 0 at masked positions.

    `clamp_kl=True` floors each token's k1 estimate at 0, as the released VLM-RLAIF code does.
    """
    _check_right_padded(mask)
    lengths = mask.sum(-1).long()
    if (lengths == 0).any():
        raise ValueError("every response needs at least one valid token to carry its score")
    kl = logps - ref_logps
    if clamp_kl:
        kl = kl.clamp(min=0)
    rewards = -kl_coef * kl * mask
    last = F.one_hot(lengths - 1, mask.shape[1]).to(rewards.dtype)
    return rewards + last * score.unsqueeze(-1)


# --- GRPO and GRPO_rank --------------------------------------------------------------------------------
# Groups are rows: [B, G] holds the G answers sampled for each of B prompts. Ranks are 0-indexed, 0 = best.
# A judge's ranking may hold ties, in competition form: each answer's rank is the number of answers
# ranked strictly above it, so a group the judge cannot order at all is all zeros (the oracle's 1-5
# scores tie often; a reward model or an LLM's ordering of 1..G does not).

DCG_FORMS = ("table", "eq10")


def _dcg(ranks: torch.Tensor, form: str) -> torch.Tensor:
    x = ranks.double()
    if form == "table":
        # Reproduces the paper's own nDCG table (0.7925, 0.6667, 0.5805, 0.5170 for 0 vs 1..4).
        return torch.log2(2 + x) / (1 + x)
    if form == "eq10":
        # The paper's printed Eq. 10 (the textbook discount); its table does not follow from it.
        return 1 / torch.log2(2 + x)
    raise ValueError(f"unknown dcg form {form!r}; expected one of {', '.join(DCG_FORMS)}")


def rank_ndcg_penalty(true_ranks: torch.Tensor, pred_ranks: torch.Tensor, dcg: str = "table") -> torch.Tensor:
    """GRPO_rank's per-answer penalty delta = 1 - nDCG, elementwise over same-shaped rank tensors.

    nDCG = min(DCG(pred), DCG(true)) / max(DCG(pred), DCG(true)), so delta is 0 exactly when the two
    ranks agree and lies in [0, 1). Both DCG forms fall with the rank and flatten out, so one place of
    error near the top costs more than one near the bottom. Returns float32 values.
    """
    d_true, d_pred = _dcg(true_ranks, dcg), _dcg(pred_ranks, dcg)
    return (1 - torch.minimum(d_true, d_pred) / torch.maximum(d_true, d_pred)).float()


def ranks_from_scores(scores: torch.Tensor, descending: bool = True) -> torch.Tensor:
    """0-indexed ranks [B, G] (long) of each row's scores; with `descending` the highest score gets 0.

    Ties are broken by position: of equal scores, the one at the lower index gets the better rank, so
    the result never depends on the sort kernel.
    """
    order = torch.sort(scores, dim=-1, descending=descending, stable=True).indices
    positions = torch.arange(scores.shape[-1], device=scores.device).expand_as(order)
    return torch.empty_like(order).scatter_(-1, order, positions)


def untie_ranks(judge_ranks: torch.Tensor, pred_ranks: torch.Tensor) -> torch.Tensor:
    """The judge's ranking [B, G] made strict by the policy's ranking [B, G]: answers the judge ties
    take, among themselves, the order the policy gave them. It is the strict ranking closest to the
    policy's that the judge agrees with, so a policy that orders a tie either way makes no error
    there; a strict judge ranking comes back unchanged."""
    better = judge_ranks.unsqueeze(-1) > judge_ranks.unsqueeze(-2)  # [i, j]: the judge puts j above i
    tie_first = (judge_ranks.unsqueeze(-1) == judge_ranks.unsqueeze(-2)) & (pred_ranks.unsqueeze(-1) > pred_ranks.unsqueeze(-2))
    return (better | tie_first).sum(-1)


def average_ranks(ranks: torch.Tensor) -> torch.Tensor:
    """Each answer's mean position over its tie [B, G] (float): answers ranked strictly above it plus
    half the others tied with it. A strict ranking comes back as is; positions always sum to
    G (G - 1) / 2, so a tie gains nothing over the group."""
    above = (ranks.unsqueeze(-1) > ranks.unsqueeze(-2)).sum(-1)
    tied = (ranks.unsqueeze(-1) == ranks.unsqueeze(-2)).sum(-1)
    return above.float() + (tied - 1).float() / 2


def grpo_rank_advantages(
    oracle_ranks: torch.Tensor, seq_logps: torch.Tensor, dcg: str = "table"
) -> tuple[torch.Tensor, torch.Tensor]:
    """GRPO_rank advantages: (advantages [B, G], delta [B, G]).

    The policy's predicted ranking orders each group by `seq_logps` [B, G] (highest = rank 0); summed
    or mean log-probs are the caller's choice (the method uses sums). `oracle_ranks` [B, G] is the
    judge's ranking. Each answer's advantage is its group's mean penalty minus its own,
    A_i = mean_j(delta_j) - delta_i, so advantages sum to zero per group and an answer the policy
    placed where the judge did gains the most. Answers the judge ties count as placed right in
    either order (`untie_ranks`), so a group it cannot order gets zero advantages.
    """
    pred = ranks_from_scores(seq_logps.detach())
    delta = rank_ndcg_penalty(untie_ranks(oracle_ranks, pred), pred, dcg)
    return delta.mean(-1, keepdim=True) - delta, delta


def grpo_advantages(scores: torch.Tensor, eps: float = 1e-4, scale: str = "std") -> torch.Tensor:
    """Plain GRPO advantages from scalar scores [B, G]: (r - group mean) / (group std + eps).

    The std is the unbiased (n - 1) one, as TRL's GRPO; `scale="none"` skips the division (Dr. GRPO).
    A group of one answer gets advantage 0.
    """
    if scale not in ("std", "none"):
        raise ValueError(f"unknown scale {scale!r}; expected 'std' or 'none'")
    centred = scores - scores.mean(-1, keepdim=True)
    if scale == "none":
        return centred
    std = scores.std(-1, keepdim=True) if scores.shape[-1] > 1 else torch.zeros_like(centred)
    return centred / (std + eps)


def grpo_rank_monotone_advantages(
    oracle_ranks: torch.Tensor, seq_logps: torch.Tensor, dcg: str = "table"
) -> tuple[torch.Tensor, torch.Tensor]:
    """A rank advantage that always prefers the answers the judge ranks higher: (advantages, delta).

    A_i = (rank_gain_i + (mean_j(delta_j) - delta_i) / 2) / ((G - 1) / 2), with rank_gain_i =
    (G - 1) / 2 - t_i, t_i the answer's mean position over its tie (`average_ranks`), and delta the
    GRPO_rank penalty. The gain term alone orders the group by the judge's ranking, one unit per place,
    and gives answers the judge ties the same gain; the penalty term, bounded by half a unit (delta
    lies in [0, 1)), only rewards the answers the policy already places right. So in every group,
    whatever the policy's ranking, a better-ranked answer gets a strictly larger advantage, unlike
    `grpo_rank_advantages`, where a best answer the policy misplaces gets a negative one. Advantages
    sum to zero per group (zero everywhere in a group the judge cannot order); the division keeps
    them within [-1.25, 1.25].
    """
    g = oracle_ranks.shape[-1]
    pred = ranks_from_scores(seq_logps.detach())
    delta = rank_ndcg_penalty(untie_ranks(oracle_ranks, pred), pred, dcg)
    gain = (g - 1) / 2 - average_ranks(oracle_ranks)
    advantages = (gain + (delta.mean(-1, keepdim=True) - delta) / 2) / max((g - 1) / 2, 1)
    return advantages, delta


# Advantage estimators by name (`grpo.advantage`), as verl's core_algos registers them. Each says which
# feedback it needs from the judge (a 1-5 score per answer, or a ranking per group) and maps
# (feedback [B, G], the policy's sequence log-probs [B, G], dcg form) to (advantages [B, G], the rank
# penalty delta [B, G] or None). Any of them composes with any GRPO policy loss below.
@dataclass(frozen=True)
class AdvantageEstimator:
    feedback: str  # "scores" | "ranks"
    compute: Callable[[torch.Tensor, torch.Tensor, str], tuple[torch.Tensor, torch.Tensor | None]]


ADVANTAGE_ESTIMATORS: dict[str, AdvantageEstimator] = {
    # the original GRPO: (score - group mean) / group std
    "grpo": AdvantageEstimator("scores", lambda scores, logps, dcg: (grpo_advantages(scores), None)),
    # Dr. GRPO: no division by the group's std, so low-spread groups are not inflated
    "dr_grpo": AdvantageEstimator("scores", lambda scores, logps, dcg: (grpo_advantages(scores, scale="none"), None)),
    # Oracle-RLAIF's rank advantage: group-mean delta - delta, delta from the policy's ranking against the judge's
    "grpo_rank": AdvantageEstimator("ranks", grpo_rank_advantages),
    "grpo_rank_monotone": AdvantageEstimator("ranks", grpo_rank_monotone_advantages),
}


def kendall_tau(ranks_a: torch.Tensor, ranks_b: torch.Tensor) -> torch.Tensor:
    """Kendall's tau-b per group: [B, G] and [B, G] -> [B] in [-1, 1] (1 = same order, -1 = reversed).

    (concordant - discordant pairs) / sqrt(pairs untied in a * pairs untied in b), scipy's default. A
    pair tied in either ranking counts as neither; unlike tau-a's denominator (all pairs) this one
    leaves them out, so a judge that ties most answers (the oracle: equally right or wrong) does not
    pull tau towards 0. NaN for a group one ranking ties entirely (no order to agree with).
    """
    sign_a = torch.sign(ranks_a.unsqueeze(-1) - ranks_a.unsqueeze(-2)).float()
    sign_b = torch.sign(ranks_b.unsqueeze(-1) - ranks_b.unsqueeze(-2)).float()
    # Each [G, G] sum visits every unordered pair twice, numerator and denominator alike.
    untied = ((sign_a != 0).sum((-1, -2)) * (sign_b != 0).sum((-1, -2))).float().sqrt()
    return (sign_a * sign_b).sum((-1, -2)) / untied


# GRPO policy losses differ in how the per-token terms become one number (TRL's `loss_type`); each is
# registered by name (`grpo.loss`). A loss is this process's sum of terms over a normaliser counted
# over the whole update (`LossCounts`, every process and micro-batch), so the sum over processes and
# micro-batches is the update's loss and the gradient does not depend on how the update is split.
@dataclass(frozen=True)
class LossCounts:
    tokens: int | None = None  # answer tokens in the update; None: this batch's
    answers: int | None = None  # answers in the update; None: this batch's
    mean_tokens: float | None = None  # answer tokens per update, averaged over the rollout (DAPO)
    max_length: int | None = None  # the sampling cap on answer tokens (Dr. GRPO)


def _bnpo(terms: torch.Tensor, mask: torch.Tensor, counts: LossCounts) -> torch.Tensor:
    """Mean over every answer token of the update: long answers weigh more (TRL "bnpo")."""
    tokens = mask.sum().clamp(min=1) if counts.tokens is None else max(counts.tokens, 1)
    return (terms * mask).sum() / tokens


def _grpo(terms: torch.Tensor, mask: torch.Tensor, counts: LossCounts) -> torch.Tensor:
    """Mean within each answer, then over answers: every answer weighs the same (the original GRPO,
    Oracle-RLAIF's Eq. 6, TRL "grpo")."""
    answers = terms.shape[0] if counts.answers is None else counts.answers
    return masked_mean(terms, mask, dim=-1).sum() / max(answers, 1)


def _dapo(terms: torch.Tensor, mask: torch.Tensor, counts: LossCounts) -> torch.Tensor:
    """Token sum over the rollout's mean tokens per update (DAPO's token-level normalisation, TRL "dapo"):
    one normaliser for every update of a rollout, so a short update does not weigh more."""
    if counts.mean_tokens is None:
        raise ValueError("the dapo loss needs counts.mean_tokens (answer tokens per update over the rollout)")
    return (terms * mask).sum() / max(counts.mean_tokens, 1.0)


def _dr_grpo(terms: torch.Tensor, mask: torch.Tensor, counts: LossCounts) -> torch.Tensor:
    """Token sum over answers x the length cap (Dr. GRPO, TRL "dr_grpo"): no per-answer length
    normalisation, so a long wrong answer is not penalised less per token."""
    if counts.max_length is None:
        raise ValueError("the dr_grpo loss needs counts.max_length (the sampling cap on answer tokens)")
    answers = terms.shape[0] if counts.answers is None else counts.answers
    return (terms * mask).sum() / (max(answers, 1) * counts.max_length)


GRPO_LOSSES: dict[str, Callable[[torch.Tensor, torch.Tensor, LossCounts], torch.Tensor]] = {
    "bnpo": _bnpo, "grpo": _grpo, "dapo": _dapo, "dr_grpo": _dr_grpo,
}
GRPO_RATIOS = ("token", "sequence")


def grpo_loss(
    logps: torch.Tensor,
    old_logps: torch.Tensor,
    ref_logps: torch.Tensor | None,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    clip: float = 0.2,
    beta: float = 0.0,
    entropy: torch.Tensor | None = None,
    c_entropy: float = 0.0,
    loss: str = "bnpo",
    counts: LossCounts = LossCounts(),
    clip_high: float | None = None,
    ratio: str = "token",
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """GRPO / GRPO_rank loss over completions; per-token inputs are [B, T], `advantages` is [B].

    Per token: -min(r * A, clamp(r, 1 - clip, 1 + clip_high) * A) + beta * KL - c_entropy * H, with
    r = exp(logp - old_logp) (`ratio="token"`) or, for GSPO, the answer's geometric mean ratio
    exp(mean_t(logp - old_logp)) (`ratio="sequence"`); `clip_high` (DAPO's clip-higher) defaults to
    `clip`. A is the sequence advantage broadcast over its tokens, KL the k3 estimate
    exp(ref - logp) - (ref - logp) - 1 (unbiased, always >= 0) and H the `entropy` [B, T] of the
    policy (required when c_entropy != 0; needs a gradient to act as a bonus). The terms are reduced
    by `GRPO_LOSSES[loss]` with the update's `counts`. The entropy term is reduced with the rest,
    whereas TRL always takes its token mean; the two agree for "bnpo".
    Gradient flows only through `logps` (and `entropy`). Returns (loss, stats) with detached stats:
    clip_fraction (tokens whose ratio is clipped in the direction the advantage pushes), plus kl when
    `ref_logps` is given and entropy when `entropy` is given, each a mean over valid tokens.
    """
    if loss not in GRPO_LOSSES:
        raise ValueError(f"unknown GRPO loss {loss!r}; expected one of {', '.join(GRPO_LOSSES)}")
    if ratio not in GRPO_RATIOS:
        raise ValueError(f"unknown ratio {ratio!r}; expected one of {', '.join(GRPO_RATIOS)}")
    if beta != 0.0 and ref_logps is None:
        raise ValueError("beta != 0 needs ref_logps")
    if c_entropy != 0.0 and entropy is None:
        raise ValueError("c_entropy != 0 needs entropy")
    high = clip if clip_high is None else clip_high
    mask = mask.to(logps.dtype)
    adv = advantages.detach().unsqueeze(-1)
    log_ratio = logps - old_logps.detach()
    if ratio == "sequence":
        log_ratio = ((log_ratio * mask).sum(-1) / mask.sum(-1).clamp(min=1)).unsqueeze(-1)
    r = torch.exp(log_ratio)
    per_token = -torch.minimum(r * adv, r.clamp(1 - clip, 1 + high) * adv).expand_as(logps)
    stats = {}
    if ref_logps is not None:
        ref_diff = ref_logps.detach() - logps
        kl = ref_diff.exp() - ref_diff - 1
        per_token = per_token + beta * kl
        stats["kl"] = masked_mean(kl.detach(), mask)
    if entropy is not None:
        per_token = per_token - c_entropy * entropy
        stats["entropy"] = masked_mean(entropy.detach(), mask)
    clipped = ((r < 1 - clip) & (adv < 0)) | ((r > 1 + high) & (adv > 0))
    stats["clip_fraction"] = masked_mean(clipped.expand_as(logps).to(logps.dtype), mask)
    return GRPO_LOSSES[loss](per_token, mask, counts), stats


def token_entropy(logits: torch.Tensor, labels: torch.Tensor, chunk_size: int = 1024) -> torch.Tensor:
    """Entropy (nats) of the next-token distribution at each counted position: [B, L, V] -> [B, L-1].

    Shifted like `token_logps` (position t predicts token t + 1); 0 where the label is ignored. Only
    counted positions are computed, `chunk_size` rows at a time in float32, so the prompt (video tokens
    included) costs nothing and no [B, L, V] float copy is made. Differentiable.
    """
    logits = logits[:, :-1]
    mask = labels[:, 1:] != IGNORE_INDEX
    rows, cols = mask.nonzero(as_tuple=True)
    chunks = []
    for start in range(0, rows.numel(), chunk_size):
        picked = logits[rows[start:start + chunk_size], cols[start:start + chunk_size]].float()
        logp = picked.log_softmax(-1)
        chunks.append(-(logp.exp() * logp).sum(-1))
    out = torch.zeros(mask.shape, dtype=torch.float32, device=logits.device)
    if not chunks:
        return out
    return out.masked_scatter(mask, torch.cat(chunks))
