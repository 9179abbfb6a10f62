"""PPO against a trained reward model (`vlmalign ppo`), as VLM-RLAIF released it (AlpacaFarm style).

Models: the policy starts from the SFT checkpoint (`model.init_from`, a new LoRA per `model.lora`
or all weights); the reference is the policy with its adapter disabled, or a frozen copy without
LoRA; the reward model (`reward_model`, from `train-rm`) is frozen; the value model is a trainable
copy of the reward model (its own adapter and head). Policy and value model share one optimizer.
With `reward: judge` a judge scores the answers instead (`judge`, e.g. the oracle: 1-5), and without
a reward model the value model is the policy's starting weights with a new head.
Either value model's head bias is shifted once, before the first update, to start at the first
rollout's mean return.

Per rollout (step = one rollout):
1. rollout: `ppo.rollout_batch` questions, `sampling.num_samples` answers each, sampled from the
   policy (one shared video prefix per question);
2. reward: score = RM(question, answer + evaluation prompt) (or the judge's score) + `eos_penalty`
   if the answer has no EOS + `length_coef` * tokens / `sampling.max_new_tokens`; an answer the judge
   could not score (a failed or unreadable reply) takes no part in the update;
3. old log-probs, reference log-probs and values of the sampled tokens (no dropout);
   per-token rewards = -kl_coef * k1 KL (`losses.kl_penalized_rewards`) with the score on the last
   token, then whitened (keeping their mean) or multiplied by `reward_scale`; GAE (gamma, lam) gives
   advantages (whitened) and returns;
4. `ppo.ppo_epochs` shuffled passes in optimizer steps of `step_batch` answers (`micro_batch` per
   forward): clipped policy loss + `vf_coef` * clipped value loss, token means over the step.
With `kl_target`, kl_coef then moves towards that per-answer KL (adaptive controller).

Logged per rollout: reward (mean RM or judge score; with a judge also judged_fraction), score (with
the EOS and length terms), kl (summed k1 per answer, unclamped) and kl_coef, entropy, policy and
value losses, clip fractions, approx_kl, response_length, eos_fraction, and the time split: rollout
(sampling), reward (RM or judge scoring), train (log-probs, values, advantages and the PPO epochs).

Several processes (plain data parallel, `--launch`): each samples its share of the rollout's
questions (batches of `sampling.batch_size` questions seeded alike whatever the process count, so
`ppo.rollout_batch / processes` must be a multiple of it), scores them with its copy of the reward
model (a judge runs in the first process only, on every process's answers: one judge, one cache),
and trains on them; reward and advantage whitening, the KL and the logged means are taken over all
processes, and each optimizer step's `step_batch` answers are split evenly between them.
With one optimizer step per PPO epoch the update is that of one process. DeepSpeed is refused.

Per-token tensors of a rollout are [N, T]: each answer's tokens left-aligned, right-padded, where
position t holds the log-prob of answer token t and the value of the state before it.

Artifacts: RUN/config.yaml, metrics.jsonl, checkpoints/step-N (N = rollouts; the policy and value
weights, optimizer, kl_coef), final/ (the policy) and with `eval_qa` the held-out accuracy in
RUN/eval/.
"""

from __future__ import annotations

import time
from pathlib import Path

import torch
from torch import nn
from tqdm.auto import tqdm

from vlmalign.config import PPOConfig
from vlmalign.data.collate import Collator
from vlmalign.errors import ConfigError
from vlmalign.feedback.judges import JudgeRequest, build_judge
from vlmalign.feedback.preferences import read_questions
from vlmalign.losses import (
    IGNORE_INDEX,
    gae_advantages,
    kl_penalized_rewards,
    masked_whiten,
    ppo_policy_loss,
    ppo_value_loss,
    token_entropy,
    token_logps,
)
from vlmalign.model.generation import GenerationConfig
from vlmalign.model.policy import MANIFEST, build_model, labelled_logits, load_model
from vlmalign.model.reward import RewardModel, build_reward_model, load_reward_model, score_samples
from vlmalign.prompts import load_prompt
from vlmalign.train.common import (
    all_sum,
    backward,
    check_rollout_shares,
    optimizer_step,
    prepare_training,
    rollout_plan,
    sample_share,
    save_final,
    setup_run,
    sync_context,
    uses_deepspeed,
)
from vlmalign.train.grpo_rank import completion_rows


# --- per-token tensors -----------------------------------------------------------------------------
def answer_tokens(values: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Cut each row's answer span out of [B, L] per-position values: ([B, T] left-aligned, mask).

    `mask` marks one contiguous span per row (prompt before it, padding after); the result is what
    the PPO losses take: right-padded rows with 1 on a prefix.
    """
    lengths = mask.sum(-1)
    start = mask.long().argmax(-1)
    steps = torch.arange(int(lengths.max()), device=values.device)
    index = (start[:, None] + steps).clamp(max=values.shape[1] - 1)
    valid = steps[None] < lengths[:, None]
    return values.gather(1, index) * valid, valid


def policy_forward(model, batch: dict, device, with_entropy: bool = False):
    """(log-probs [B, T], mask [B, T], entropy [B, T] or None) of the answer tokens of `batch`."""
    logits, labels = labelled_logits(model, batch, device)
    logps, mask = token_logps(logits, labels)
    logps, valid = answer_tokens(logps, mask)
    entropy = answer_tokens(token_entropy(logits, labels), mask)[0] if with_entropy else None
    return logps, valid, entropy


def value_forward(value: RewardModel, batch: dict, device) -> torch.Tensor:
    """[B, T] values of the states before each answer token (position t - 1 predicts token t)."""
    scores = value(**value.backbone.model_inputs(batch, device))[:, :-1].float()
    return answer_tokens(scores, batch["labels"][:, 1:].to(device) != IGNORE_INDEX)[0]


class ActorCritic(nn.Module):
    """The policy and the value model as one module: one forward, so data parallelism wraps and
    synchronises both. Its state dict keys are `policy.*` and `value.*`."""

    def __init__(self, policy, value: RewardModel):
        super().__init__()
        self.policy, self.value = policy, value

    def forward(self, policy_batch: dict, value_batch: dict, device):
        logps, valid, _ = policy_forward(self.policy, policy_batch, device)
        return logps, valid, value_forward(self.value, value_batch, device)


def pad_rows(chunks: list[torch.Tensor]) -> torch.Tensor:
    """Concatenate [b, T_i] chunks along rows, right-padding to the widest."""
    width = max(c.shape[1] for c in chunks)
    return torch.cat([nn.functional.pad(c, (0, width - c.shape[1])) for c in chunks])


def judge_scores(judge, answers: list, acc) -> tuple[torch.Tensor, torch.Tensor]:
    """(scores [n], judged [n]) of this process's (question, sample) answers, each scored alone by
    the judge. The first process (the only one holding `judge`) scores every process's answers and
    hands each its share back."""
    from accelerate.utils import broadcast_object_list, gather_object

    requests = [JudgeRequest(q.video, q.question, (s.text,)) for q, s in answers]
    several = acc.num_processes > 1
    shares = gather_object([requests]) if several else [requests]  # one list per process, in process order
    values = None
    if judge is not None:
        flat = [j.value if j.status == "ok" else None for j in judge.score([r for share in shares for r in share])]
        ends = torch.tensor([len(share) for share in shares]).cumsum(0).tolist()
        values = [flat[end - len(share) : end] for share, end in zip(shares, ends)]
    values = broadcast_object_list([values], from_process=0)[0] if several else values
    values = values[acc.process_index if several else 0]
    judged = torch.tensor([v is not None for v in values], dtype=torch.bool)
    return torch.tensor([float(v) if v is not None else 0.0 for v in values]), judged


def adapt_kl_coef(coef: float, kl: float, target: float, horizon: int, num_answers: int) -> float:
    """Ziegler et al.'s proportional controller: nudge `coef` so the per-answer KL approaches `target`."""
    error = min(max(kl / target - 1.0, -0.2), 0.2)
    return coef * (1.0 + error * num_answers / horizon)


# --- PPO -----------------------------------------------------------------------------------------

def _check(cfg: PPOConfig) -> None:
    if not cfg.model.init_from:
        raise ConfigError("model.init_from: PPO starts from a saved policy (e.g. runs/tiny-sft/final)")
    if cfg.reward == "reward_model" and not cfg.reward_model:
        raise ConfigError("reward_model: give a reward model trained by `vlmalign train-rm` (e.g. runs/tiny-rm/final), "
                          "or set reward: judge to score answers with `judge`")
    if not cfg.data.train:
        raise ConfigError("data.train: give the question file(s) to train on")
    ppo = cfg.ppo
    for key in ("rollout_batch", "step_batch", "micro_batch", "ppo_epochs", "kl_horizon"):
        if getattr(ppo, key) < 1:
            raise ConfigError(f"ppo.{key}: must be at least 1, got {getattr(ppo, key)}")
    if cfg.sampling.num_samples < 1:
        raise ConfigError(f"sampling.num_samples: must be at least 1, got {cfg.sampling.num_samples}")
    if ppo.kl_target is not None and ppo.kl_target <= 0:
        raise ConfigError(f"ppo.kl_target: must be positive (or null for a fixed kl_coef), got {ppo.kl_target}")


def run(cfg: PPOConfig) -> Path:
    # --- setup -------------------------------------------------------------------------------
    _check(cfg)
    rt = setup_run(cfg, cfg.run, cfg.train)
    final = rt.run_dir / "final"
    if (final / MANIFEST).is_file():
        rt.print(f"{final} exists: this PPO run is complete")
        return final
    acc, ppo, g = rt.accelerator, cfg.ppo, cfg.sampling.num_samples
    world, rank = acc.num_processes, acc.process_index
    if uses_deepspeed(acc):
        raise ConfigError("ppo does not run under DeepSpeed; launch plain data parallel (--launch multi_gpu)")
    check_rollout_shares(world, ppo.rollout_batch, cfg.sampling.batch_size, ppo.step_batch, "ppo", "step_batch")
    policy = build_model(cfg.model).to(acc.device)
    reference = None if policy.uses_lora else load_model(cfg.model.init_from).to(acc.device).eval()
    policy_visual = policy.visual_inputs(cfg.data.feature_cache)
    reward_model = judge = None
    if cfg.reward == "reward_model":
        reward_model = load_reward_model(cfg.reward_model).to(acc.device)
    elif rt.is_main:  # one judge process, one cache file
        judge = build_judge(cfg.judge, cfg.judge.cache or rt.run_dir / "judge_cache.sqlite", model=policy,
                            visual=policy_visual, progress=False)
    if cfg.reward_model:
        value = load_reward_model(cfg.reward_model, trainable=True).to(acc.device)
    else:  # the policy's starting weights read the states; the head learns the returns from zero
        prompt = load_prompt("reward.evaluate")
        value = build_reward_model(cfg.model, prompt.render(), prompt.id).to(acc.device)
    # The value model reads the policy's token ids, one value per answer token, and reads each video
    # itself: its frames must be the policy's, or its visual tokens would not fill the policy's slots.
    frames, theirs = policy.frame_settings(), value.backbone.frame_settings()
    differ = [f"{key} {theirs.get(key)!r} vs {frames[key]!r}" for key in frames if theirs.get(key) != frames[key]]
    if value.tokenizer.get_vocab() != policy.tokenizer.get_vocab() or differ:
        raise ConfigError(f"reward_model: {cfg.reward_model} must share the policy's tokenizer and frame settings "
                          f"(its copy is the value model, which reads the policy's tokens); differ: "
                          f"{', '.join(differ) or 'the tokenizer'}")
    policy_collate = Collator(policy, policy_visual)
    value_collate = Collator(value.backbone, value.backbone.visual_inputs(cfg.data.feature_cache))
    reward_collate = (Collator(reward_model.backbone, reward_model.backbone.visual_inputs(cfg.data.feature_cache))
                      if reward_model is not None else None)
    questions = read_questions(cfg.data.train, cfg.data.video_root)
    gen = GenerationConfig(
        max_new_tokens=cfg.sampling.max_new_tokens, do_sample=True, temperature=cfg.sampling.temperature,
        top_p=cfg.sampling.top_p, num_return_sequences=g, batch_size=cfg.sampling.batch_size,
    )
    rollouts = rollout_plan(len(questions), ppo.rollout_batch, cfg.train.seed, cfg.train.epochs, cfg.train.max_steps)
    total = len(rollouts)
    total_updates = sum(ppo.ppo_epochs * -(-len(b) * g // ppo.step_batch) for b in rollouts[:total])
    rt.print(f"PPO: {len(questions)} questions, {total} rollouts of {ppo.rollout_batch} x {g} answers, {total_updates} optimizer steps")

    actor_critic = ActorCritic(policy, value)
    run = prepare_training(rt, actor_critic, cfg.train, total_updates, cfg.run.resume)
    actor_critic, optimizer, scheduler, checkpointer, step = run.model, run.optimizer, run.scheduler, run.checkpointer, run.step
    kl_coef = run.state.get("kl_coef", ppo.kl_coef)
    total_sum = all_sum(acc)  # statistics of the whole rollout, over every process's share

    def rollout_mean(values: torch.Tensor, mask: torch.Tensor | None = None) -> float:
        mask = torch.ones_like(values) if mask is None else mask.to(values.dtype)
        return float(total_sum((values * mask).sum()) / total_sum(mask.sum()).clamp(min=1))

    # --- loop --------------------------------------------------------------------------------
    bar = tqdm(total=total, initial=step, desc="ppo", disable=not (rt.is_main and cfg.run.progress))
    while step < total:
        # 1. rollout: this process's share of the questions
        started = time.perf_counter()
        actor_critic.eval()
        batch_questions, groups = sample_share(policy, policy_visual, [questions[i] for i in rollouts[step]], gen,
                                               cfg.train.seed, step, rank, world)
        answers = [(q, s) for q, grp in zip(batch_questions, groups) for s in grp]
        rows = [row for q, grp in zip(batch_questions, groups) for row in completion_rows(policy, q.question, q.video, grp)]
        rollout_time = time.perf_counter() - started

        # 2. reward
        started = time.perf_counter()
        if reward_model is not None:
            encoded = [reward_model.encode(q.question, s.text, q.video, cfg.data.max_length, q.id) for q, s in answers]
            rm_scores, judged = score_samples(reward_model, reward_collate, encoded, ppo.micro_batch), None
        else:
            rm_scores, judged = judge_scores(judge, answers, acc)
        finished = torch.tensor([s.finished for _, s in answers])
        lengths = torch.tensor([len(s.token_ids) for _, s in answers], dtype=torch.float)
        score = rm_scores + ppo.eos_penalty * (~finished) + ppo.length_coef * lengths / cfg.sampling.max_new_tokens
        reward_time = time.perf_counter() - started

        # 3. old and reference log-probs, values; shaped rewards, advantages, returns
        started = time.perf_counter()
        with torch.no_grad():
            parts = {"old": [], "ref": [], "values": [], "entropy": []}
            for start in range(0, len(rows), ppo.micro_batch):
                chunk = rows[start : start + ppo.micro_batch]
                batch = policy_collate(chunk)
                old, _, entropy = policy_forward(policy, batch, acc.device, with_entropy=True)
                if reference is not None:
                    ref = policy_forward(reference, batch, acc.device)[0]
                else:
                    with policy.reference():
                        ref = policy_forward(policy, batch, acc.device)[0]
                parts["old"].append(old.float().cpu())
                parts["ref"].append(ref.float().cpu())
                parts["entropy"].append(entropy.cpu())
                parts["values"].append(value_forward(value, value_collate(chunk), acc.device).cpu())
        old_logps, ref_logps, old_values, entropy = (pad_rows(parts[k]) for k in ("old", "ref", "values", "entropy"))
        tokens = torch.arange(old_logps.shape[1])[None] < lengths[:, None]
        rewards = kl_penalized_rewards(score, old_logps, ref_logps, tokens, kl_coef, ppo.clamp_kl)
        # an answer without a score gets no advantage or value target
        mask = tokens if judged is None else tokens & judged[:, None]
        # Scaling or whitening the whole shaped reward, as released, keeps the KL/score trade-off at kl_coef.
        rewards = (masked_whiten(rewards, mask, shift_mean=False, all_sum=total_sum) if ppo.whiten_rewards
                   else rewards * ppo.reward_scale)
        advantages, returns = gae_advantages(rewards, old_values, mask, ppo.gamma, ppo.lam)
        if step == 0:
            # A new head reads 0 and a reward model's copy its own scores, where the returns sit at
            # the reward's scale x reward_scale (x10 judge scores: 10-50); clipped value updates close
            # such an offset over a hundred rollouts, and until then the critic learns the offset, not
            # the states. The value model starts at the first rollout's mean return instead.
            offset = rollout_mean(returns - old_values, mask)
            with torch.no_grad():
                value.head.bias += offset
            old_values = old_values + offset * tokens
            advantages, returns = gae_advantages(rewards, old_values, mask, ppo.gamma, ppo.lam)
        if ppo.whiten_advantages:
            advantages = masked_whiten(advantages, mask, all_sum=total_sum)
        rollout = {"old_logps": old_logps, "advantages": advantages, "old_values": old_values, "returns": returns,
                   "mask": mask}

        # 4. PPO epochs over the rollout
        actor_critic.train()
        sums = {"policy_loss": 0.0, "value_loss": 0.0, "clip_fraction": 0.0, "value_clip_fraction": 0.0, "approx_kl": 0.0}
        updates = 0
        local_step = ppo.step_batch // world
        for epoch in range(ppo.ppo_epochs):
            seed = cfg.train.seed * 1_000_003 + step * 101 + epoch + rank * 7919
            order = torch.randperm(len(rows), generator=torch.Generator().manual_seed(seed))
            for begin in range(0, len(rows), local_step):
                step_rows = order[begin : begin + local_step]
                step_tokens = total_sum(mask[step_rows].sum())
                micros = step_rows.split(ppo.micro_batch)
                for j, micro in enumerate(micros):
                    chunk = [rows[i] for i in micro]
                    with sync_context(acc, actor_critic, sync=j == len(micros) - 1), acc.autocast():
                        logps, valid, values = actor_critic(policy_collate(chunk), value_collate(chunk), acc.device)
                        r = {k: v[micro, : logps.shape[1]].to(acc.device) for k, v in rollout.items()}
                        valid = valid & r["mask"]
                        pg_loss, clip_fraction, approx_kl = ppo_policy_loss(logps, r["old_logps"], r["advantages"], valid, ppo.clip)
                        vf_loss, vf_clip_fraction = ppo_value_loss(values, r["old_values"], r["returns"], valid, ppo.value_clip)
                        # token means over the whole optimizer step, however it is split over
                        # micro-batches and processes; x world because DDP averages gradients
                        share = valid.sum() / step_tokens.to(acc.device).clamp(min=1)  # 0: no answer scored
                        loss = (pg_loss + ppo.vf_coef * vf_loss) * share * world
                        backward(acc, loss)
                    for key, v in (("policy_loss", pg_loss), ("value_loss", vf_loss), ("clip_fraction", clip_fraction),
                                   ("value_clip_fraction", vf_clip_fraction), ("approx_kl", approx_kl)):
                        sums[key] += float(v.detach() * share)
                optimizer_step(acc, actor_critic, optimizer, scheduler, cfg.train.max_grad_norm)
                updates += 1
        train_time = time.perf_counter() - started

        kl = rollout_mean(((old_logps - ref_logps) * mask).sum(-1))  # per answer, unclamped k1
        losses = total_sum(torch.tensor(list(sums.values()))) / updates  # each process holds its share of the means
        scored = None if judged is None else judged.float()
        metrics = {
            "reward": rollout_mean(rm_scores, scored), "score": rollout_mean(score, scored), "kl": kl, "kl_coef": kl_coef,
            "entropy": rollout_mean(entropy, mask), **dict(zip(sums, losses.tolist())),
            "return_mean": rollout_mean(returns, mask), "value_mean": rollout_mean(old_values, mask),
            "response_length": rollout_mean(lengths), "eos_fraction": rollout_mean(finished.float()),
            "lr": scheduler.get_last_lr()[0],
            **({} if judged is None else {"judged_fraction": rollout_mean(scored)}),
            "time_rollout": rollout_time, "time_reward": reward_time, "time_train": train_time,
        }
        if ppo.kl_target is not None:
            kl_coef = adapt_kl_coef(kl_coef, kl, ppo.kl_target, ppo.kl_horizon, len(rows) * world)
        step += 1
        bar.update(1)
        bar.set_postfix(reward=f"{metrics['reward']:.3f}", kl=f"{kl:.3f}")
        if step % cfg.train.log_every == 0 or step == total:
            rt.metrics.log(step, **metrics)
        if step % cfg.train.save_every == 0 and step < total:
            checkpointer.save(step, actor_critic, optimizer, scheduler, {"kl_coef": kl_coef})
    bar.close()

    # --- artifacts ---------------------------------------------------------------------------
    final = save_final(rt, policy)
    rt.metrics.close()
    rt.print(f"PPO done: {step} rollouts, policy saved to {final}")
    if cfg.eval_qa and rt.is_main:
        from vlmalign.eval.synthetic import evaluate_qa_file

        rt.print(evaluate_qa_file(final, cfg.eval_qa, rt.run_dir / "eval", cfg.eval_limit, cfg.data.feature_cache)["table"])
    return final
