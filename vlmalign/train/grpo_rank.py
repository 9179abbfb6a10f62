"""GRPO_rank (Oracle-RLAIF), with plain GRPO as a sibling (`grpo.advantage: grpo_rank | grpo`).

Per rollout: `grpo.rollout_batch` questions, G = `sampling.num_samples` answers each from the
current policy (one shared video prefix per question); the judge ranks each group (grpo_rank) or
scores each answer (grpo); advantages come from `losses.grpo_rank_advantages` (the policy's ranking
= the order of its sequence log-probs, compared with the judge's by nDCG) or
`losses.grpo_advantages`; then `grpo.num_iterations` passes of `losses.grpo_loss` over the rollout
in mini-batches: clipped surrogate, k3 KL to the frozen starting policy (beta), entropy bonus.

Ties: the policy's ranking breaks equal log-probs by answer order (`ranks_from_scores`); the oracle
breaks equal scores by length, then order (`Oracle.rank`). A group whose ranking failed to parse
is left out of the update (its advantages are zero) and counted.

Artifacts: RUN/config.yaml, metrics.jsonl, checkpoints/step-N (N = rollouts), final/, and with
`eval_qa` the held-out accuracy of final/ in RUN/eval/.
"""

from __future__ import annotations

from pathlib import Path

import torch
from tqdm.auto import tqdm

from vlmalign.config import GRPOConfig
from vlmalign.data.collate import Collator, EncodedSample, model_inputs
from vlmalign.data.features import VisualInputs
from vlmalign.data.formats import VIDEO_TOKEN
from vlmalign.data.template import IGNORE_INDEX, encode_prompt
from vlmalign.errors import ConfigError
from vlmalign.feedback.judges import JudgeRequest, build_judge
from vlmalign.feedback.preferences import read_questions
from vlmalign.losses import (
    grpo_advantages,
    grpo_loss,
    grpo_rank_advantages,
    kendall_tau,
    ranks_from_scores,
    token_entropy,
    token_logps,
)
from vlmalign.model.generation import GenerationConfig, sample_answers
from vlmalign.model.video_lm import MANIFEST, build_model, load_model
from vlmalign.train.common import (
    backward,
    epoch_batches,
    optimizer_step,
    prepare_training,
    save_final,
    setup_run,
    uses_deepspeed,
)


def completion_rows(model, question: str, video, samples) -> list[EncodedSample]:
    """Prompt + sampled answer token ids, labels on the answer only (as sampled, EOS included)."""
    text = question if video is None or VIDEO_TOKEN in question else f"{VIDEO_TOKEN}\n{question}"
    prompt = encode_prompt(model.tokenizer, text, model.num_visual_tokens)
    return [
        EncodedSample("", prompt + s.token_ids, [IGNORE_INDEX] * len(prompt) + s.token_ids, video)
        for s in samples
    ]


def _forward_logps(model, batch: dict, device, with_entropy: bool):
    logits = model(**model_inputs(model, batch, device)).logits
    labels = batch["labels"].to(device)
    logps, mask = token_logps(logits, labels)
    entropy = token_entropy(logits, labels) if with_entropy else None
    return logps, mask, entropy


def run(cfg: GRPOConfig) -> Path:
    # --- setup -------------------------------------------------------------------------------
    if not cfg.model.init_from:
        raise ConfigError("model.init_from: GRPO starts from a saved policy (e.g. runs/tiny-sft/final)")
    if not cfg.data.train:
        raise ConfigError("data.train: give the question file(s) to train on")
    if cfg.sampling.num_samples < 2:
        raise ConfigError("sampling.num_samples: a group needs at least 2 answers")
    rt = setup_run(cfg, cfg.run, cfg.train)
    final = rt.run_dir / "final"
    if (final / MANIFEST).is_file():
        rt.print(f"{final} exists: this GRPO run is complete")
        return final
    acc, g, grpo = rt.accelerator, cfg.sampling.num_samples, cfg.grpo
    if acc.num_processes > 1 or uses_deepspeed(acc):
        raise ConfigError("grpo-rank runs on one process without DeepSpeed for now (rollouts are not sharded across processes)")
    model = build_model(cfg.model)
    model.to(acc.device)
    reference = None
    if grpo.beta > 0 and not model.uses_lora:  # LoRA policies get the reference by disabling adapters
        reference = load_model(cfg.model.init_from).to(acc.device).eval()
    visual = VisualInputs(model, cfg.data.feature_cache)
    collate = Collator(model.tokenizer.pad_token_id, visual)
    questions = read_questions(cfg.data.train, cfg.data.video_root)
    judge = build_judge(cfg.judge, cfg.judge.cache or rt.run_dir / "judge_cache.sqlite", model=model, visual=visual, progress=False)
    gen = GenerationConfig(
        max_new_tokens=cfg.sampling.max_new_tokens, do_sample=True, temperature=cfg.sampling.temperature,
        top_p=cfg.sampling.top_p, num_return_sequences=g, batch_size=cfg.sampling.batch_size,
    )
    rollouts = [b for e in range(cfg.train.epochs) for b in epoch_batches(len(questions), grpo.rollout_batch, cfg.train.seed, e)]
    total = len(rollouts) if cfg.train.max_steps is None else min(len(rollouts), cfg.train.max_steps)
    updates_per_rollout = grpo.num_iterations * -(-grpo.rollout_batch * g // grpo.mini_batch)
    rt.print(f"GRPO ({grpo.advantage}): {len(questions)} questions, {total} rollouts of {grpo.rollout_batch} x {g} answers")

    run = prepare_training(rt, model, cfg.train, total * updates_per_rollout, cfg.run.resume)
    model, optimizer, scheduler, checkpointer, step = run.model, run.optimizer, run.scheduler, run.checkpointer, run.step
    policy = acc.unwrap_model(model)

    # --- loop --------------------------------------------------------------------------------
    bar = tqdm(total=total, initial=step, desc=f"grpo ({grpo.advantage})", disable=not (rt.is_main and cfg.run.progress))
    while step < total:
        batch_questions = [questions[i] for i in rollouts[step]]
        # rollout: sample G answers per question, judge them
        model.eval()
        generator = torch.Generator(device=acc.device).manual_seed(cfg.train.seed * 1_000_003 + step)
        groups = sample_answers(policy, visual, [(q.video, q.question) for q in batch_questions], gen, generator=generator)
        requests = [JudgeRequest(q.video, q.question, tuple(s.text for s in grp)) for q, grp in zip(batch_questions, groups)]
        seq_logps = torch.tensor([[s.logp if grpo.logp_order == "sum" else s.logp / max(len(s.token_ids), 1) for s in grp] for grp in groups])
        valid = torch.ones(len(groups), dtype=torch.bool)
        metrics = {}
        if grpo.advantage == "grpo_rank":
            judged = judge.rank(requests)
            valid = torch.tensor([j.status == "ok" for j in judged])
            oracle_ranks = torch.tensor([j.value if j.status == "ok" else list(range(g)) for j in judged])
            advantages, delta = grpo_rank_advantages(oracle_ranks, seq_logps, dcg=grpo.dcg)
            pred = ranks_from_scores(seq_logps)
            tau = kendall_tau(pred, oracle_ranks)[valid]
            metrics.update(
                delta_mean=float(delta[valid].mean()) if valid.any() else None,
                kendall_tau=float(tau.mean()) if valid.any() else None,
                ranking_matches=float((pred == oracle_ranks).all(1)[valid].float().mean()) if valid.any() else None,
            )
        else:
            judged_flat = judge.score([JudgeRequest(r.video, r.question, (a,)) for r in requests for a in r.answers])
            judged = [judged_flat[i * g : (i + 1) * g] for i in range(len(groups))]
            valid = torch.tensor([all(j.status == "ok" for j in grp) for grp in judged])
            scores = torch.tensor([[float(j.value) if j.status == "ok" else 0.0 for j in grp] for grp in judged])
            advantages = grpo_advantages(scores)
            metrics["score_mean"] = float(scores[valid].mean()) if valid.any() else None
        advantages = advantages * valid[:, None]
        rows = [row for q, grp in zip(batch_questions, groups) for row in completion_rows(policy, q.question, q.video, grp)]
        flat_adv = advantages.reshape(-1)
        lengths = torch.tensor([len(s.token_ids) for grp in groups for s in grp], dtype=torch.float)

        # old and reference log-probs of the sampled answers, before any update on this rollout
        with torch.no_grad():
            olds, refs = [], []
            for start in range(0, len(rows), grpo.mini_batch):
                batch = collate(rows[start : start + grpo.mini_batch])
                olds.append(_forward_logps(model, batch, acc.device, False)[0] if grpo.num_iterations > 1 else None)
                if grpo.beta > 0:
                    if reference is not None:
                        refs.append(_forward_logps(reference, batch, acc.device, False)[0])
                    else:
                        with policy.llm.disable_adapter():
                            refs.append(_forward_logps(model, batch, acc.device, False)[0])

        # optimisation passes over the rollout
        model.train()
        sums = {"loss": 0.0, "kl": 0.0, "entropy": 0.0, "clip_fraction": 0.0}
        updates = 0
        for _ in range(grpo.num_iterations):
            for k, start in enumerate(range(0, len(rows), grpo.mini_batch)):
                batch = collate(rows[start : start + grpo.mini_batch])
                with acc.autocast():
                    logps, mask, entropy = _forward_logps(model, batch, acc.device, grpo.c_entropy != 0)
                    old = olds[k] if olds[k] is not None else logps.detach()
                    loss, stats = grpo_loss(
                        logps, old, refs[k] if refs else None, flat_adv[start : start + grpo.mini_batch].to(acc.device),
                        mask, clip=grpo.clip, beta=grpo.beta, entropy=entropy, c_entropy=grpo.c_entropy,
                        aggregation=grpo.aggregation,
                    )
                backward(acc, loss)
                optimizer_step(acc, model, optimizer, scheduler, cfg.train.max_grad_norm)
                updates += 1
                sums["loss"] += float(loss.detach())
                for key in ("kl", "entropy", "clip_fraction"):
                    if key in stats:
                        sums[key] += float(stats[key])
        step += 1
        bar.update(1)
        metrics.update({k: v / updates for k, v in sums.items()})
        metrics.update(
            advantage_abs_mean=float(advantages.abs().mean()), advantage_std=float(advantages.std()),
            groups_skipped=int((~valid).sum()), answer_tokens=float(lengths.mean()), lr=scheduler.get_last_lr()[0],
        )
        bar.set_postfix(loss=f"{metrics['loss']:.3f}", tau=metrics.get("kendall_tau"), score=metrics.get("score_mean"))
        if step % cfg.train.log_every == 0 or step == total:
            rt.metrics.log(step, **metrics)
        if step % cfg.train.save_every == 0 and step < total:
            checkpointer.save(step, model, optimizer, scheduler, {})
    bar.close()

    # --- artifacts ---------------------------------------------------------------------------
    final = save_final(rt, model)
    rt.metrics.close()
    rt.print(f"GRPO done: {step} rollouts, model saved to {final}")
    if cfg.eval_qa and rt.is_main:
        from vlmalign.eval.synthetic import evaluate_qa_file

        rt.print(evaluate_qa_file(final, cfg.eval_qa, rt.run_dir / "eval", cfg.eval_limit, cfg.data.feature_cache)["table"])
    return final
