"""Reward-model training (`vlmalign train-rm`), VLM-RLAIF's context-aware reward model.

The backbone starts from the SFT policy (`model.init_from`, with a new LoRA per `model.lora`) and
a scalar head scores the last token of: the conversation (video prompt + answer) followed by the
evaluation prompt `reward.evaluate`. Each pair's chosen (A) and rejected (B) answers go through one
forward pass of 2B rows; the loss is `losses.reward_model_loss` (Bradley-Terry plus the
`rm.center_coef` centering term) with every pair's preference = A.

Preference files: our JSONL (`make-prefs`), LLaVA-Hound's, VLM-RLAIF's `output_1/output_2/
preference` records and LLaMA-Factory's (`formats.read_preference_pairs`). Held-out pairs (data.eval,
or `rm.eval_fraction` of data.train) give the pairwise accuracy `losses.preference_accuracy`.

Artifacts: RUN/config.yaml, metrics.jsonl (train steps, and `eval_*` records), checkpoints/step-N,
final/ (`RewardModel.save_pretrained`: the backbone layout + value_head.safetensors + reward.json)
and eval.json (the final held-out numbers).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from tqdm.auto import tqdm

from vlmalign.config import RMConfig
from vlmalign.data.collate import Collator, EncodedSample
from vlmalign.data.formats import PreferencePair, read_preference_pairs
from vlmalign.errors import ConfigError, DataError
from vlmalign.losses import preference_accuracy, reward_model_loss
from vlmalign.model.reward import HEAD_FILE, RewardModel, build_reward_model, final_scores, score_samples
from vlmalign.prompts import load_prompt
from vlmalign.train.common import (
    backward,
    epoch_plan,
    global_count,
    optimizer_step,
    prepare_training,
    remaining_steps,
    save_final,
    setup_run,
    sync_context,
)


# --- data ------------------------------------------------------------------------------------------
def read_pairs(paths: list[str], video_root) -> list[PreferencePair]:
    return [p for path in paths for p in read_preference_pairs(path, video_root)]


def split_pairs(pairs: list[PreferencePair], fraction: float, seed: int) -> tuple[list[PreferencePair], list[PreferencePair]]:
    """(train, held out): `fraction` of the questions (pair ids) drawn at random with `seed`, each with
    all its pairs, so that no held-out pair shares its question with a trained one (data with one
    pair per question splits as a draw of pairs)."""
    if not 0.0 <= fraction < 1.0:
        raise ConfigError(f"rm.eval_fraction: expected a share in [0, 1), got {fraction}")
    ids = list(dict.fromkeys(p.id for p in pairs))
    order = torch.randperm(len(ids), generator=torch.Generator().manual_seed(seed)).tolist()
    held = {ids[i] for i in order[: int(round(fraction * len(ids)))]}
    return [p for p in pairs if p.id not in held], [p for p in pairs if p.id in held]


def encode_pairs(model: RewardModel, pairs: list[PreferencePair], max_length: int) -> list[tuple[EncodedSample, EncodedSample]]:
    return [
        tuple(model.encode(p.prompt, answer, p.video, max_length, sample_id=f"{p.id} ({p.source})") for answer in (p.chosen, p.rejected))
        for p in pairs
    ]


def pair_rewards(model, backbone, batch: dict, device) -> torch.Tensor:
    """[2B] rewards of a pair batch (B chosen rows, then B rejected rows)."""
    inputs = backbone.model_inputs(batch, device)
    return final_scores(model(**inputs), inputs["attention_mask"])


def evaluate(model: RewardModel, encoded, collate: Collator, batch_size: int, center_coef: float) -> dict:
    """Held-out metrics: pairwise accuracy, loss, reward margin and mean reward."""
    rows = [c for c, _ in encoded] + [r for _, r in encoded]
    rewards = score_samples(model, collate, rows, batch_size)
    chosen, rejected = rewards[: len(encoded)], rewards[len(encoded) :]
    preference = torch.zeros(len(encoded), dtype=torch.long)  # A, the chosen answer, is preferred
    return {
        "eval_accuracy": float(preference_accuracy(chosen, rejected, preference)),
        "eval_loss": float(reward_model_loss(chosen, rejected, preference, center_coef)),
        "eval_margin": float((chosen - rejected).mean()),
        "eval_reward_mean": float(rewards.mean()),
        "eval_pairs": len(encoded),
    }


# --- training ----------------------------------------------------------------------------------
def run(cfg: RMConfig) -> Path:
    """`vlmalign train-rm`: train a reward model on preference pairs; returns final/."""
    # --- setup -------------------------------------------------------------------------------
    if not cfg.model.init_from:
        raise ConfigError("model.init_from: the reward model starts from a saved policy (e.g. runs/tiny-sft/final)")
    if not cfg.data.train:
        raise ConfigError("data.train: give the preference file(s) to train on")
    pairs = read_pairs(cfg.data.train, cfg.data.video_root)
    if cfg.data.eval:
        eval_pairs = read_pairs(cfg.data.eval, cfg.data.video_root)
    else:
        pairs, eval_pairs = split_pairs(pairs, cfg.rm.eval_fraction, cfg.train.seed)
    if not pairs:
        raise DataError(f"reward model {cfg.run.dir}: no preference pairs to train on")
    rt = setup_run(cfg, cfg.run, cfg.train)
    final = rt.run_dir / "final"
    if (final / HEAD_FILE).is_file():
        rt.print(f"{final} exists: this reward model is trained")
        return final
    acc, train_cfg = rt.accelerator, cfg.train
    prompt = load_prompt("reward.evaluate", cfg.rm.prompts)
    model = build_reward_model(cfg.model, prompt.render(), prompt.id)
    model.to(acc.device)
    visual = model.backbone.visual_inputs(cfg.data.feature_cache)
    collate = Collator(model.backbone, visual)
    encoded = encode_pairs(model, pairs, cfg.data.max_length)
    encoded_eval = encode_pairs(model, eval_pairs, cfg.data.max_length)
    if rt.is_main:
        visual.precompute([p.video for p in pairs + eval_pairs if p.video is not None], progress=cfg.run.progress)
    acc.wait_for_everyone()

    batches_per_epoch, steps_each, total_steps = epoch_plan(len(encoded), train_cfg, rt)
    rt.print(f"reward model: {len(encoded)} train pairs, {len(encoded_eval)} held out, {total_steps} optimizer steps ({prompt.id})")

    run = prepare_training(rt, model, train_cfg, total_steps, cfg.run.resume)
    wrapped, optimizer, scheduler, checkpointer, step = run.model, run.optimizer, run.scheduler, run.checkpointer, run.step

    def log_eval() -> dict:
        # Every process scores the whole held-out set with the unwrapped model (no collectives),
        # so they stay in step; only the main one writes.
        metrics = evaluate(model, encoded_eval, collate, train_cfg.batch_size * 2, cfg.rm.center_coef)
        rt.metrics.log(step, **metrics)
        return metrics

    # --- loop --------------------------------------------------------------------------------
    if encoded_eval and cfg.rm.eval_every > 0 and step == 0:
        log_eval()
    wrapped.train()
    bar = tqdm(total=total_steps, initial=step, desc="reward model", disable=not (rt.is_main and cfg.run.progress))
    for epoch, micro in remaining_steps(batches_per_epoch, steps_each, train_cfg.grad_accum, step, total_steps):
        num_pairs = global_count(acc, sum(len(idx) for idx in micro))
        sums = {"loss": 0.0, "accuracy": 0.0, "reward_margin": 0.0, "reward_mean": 0.0}
        for j, idx in enumerate(micro):
            n = len(idx)
            batch = collate([encoded[i][0] for i in idx] + [encoded[i][1] for i in idx])
            preference = torch.zeros(n, dtype=torch.long, device=acc.device)
            with sync_context(acc, wrapped, sync=j == len(micro) - 1), acc.autocast():
                rewards = pair_rewards(wrapped, model.backbone, batch, acc.device).float()
                # pair mean over the global batch; x processes because DDP averages gradients
                loss = reward_model_loss(rewards[:n], rewards[n:], preference, cfg.rm.center_coef) * n / num_pairs * acc.num_processes
            backward(acc, loss)
            rewards = rewards.detach()
            sums["loss"] += loss.item() / acc.num_processes
            sums["accuracy"] += float(preference_accuracy(rewards[:n], rewards[n:], preference)) * n
            sums["reward_margin"] += float((rewards[:n] - rewards[n:]).sum())
            sums["reward_mean"] += float(rewards.sum()) / 2
        grad_norm = optimizer_step(acc, wrapped, optimizer, scheduler, train_cfg.max_grad_norm)
        step += 1
        bar.update(1)
        totals = acc.reduce(torch.tensor(list(sums.values()), device=acc.device), reduction="sum").tolist()
        m = dict(zip(sums, totals))
        m = {"loss": m.pop("loss"), **{k: v / num_pairs for k, v in m.items()}}
        bar.set_postfix(loss=f"{m['loss']:.3f}", acc=f"{m['accuracy']:.2f}")
        if step % train_cfg.log_every == 0 or step == total_steps:
            metrics = {"epoch": epoch, "lr": scheduler.get_last_lr()[0], **m}
            if grad_norm is not None:
                metrics["grad_norm"] = grad_norm
            rt.metrics.log(step, **metrics)
        if encoded_eval and cfg.rm.eval_every > 0 and step % cfg.rm.eval_every == 0 and step < total_steps:
            log_eval()
        if step % train_cfg.save_every == 0 and step < total_steps:
            checkpointer.save(step, wrapped, optimizer, scheduler, {"epoch": epoch})
    bar.close()

    # --- artifacts ---------------------------------------------------------------------------
    result = {"train_pairs": len(encoded), "steps": step}
    if encoded_eval:
        result.update(log_eval())
    if rt.is_main:
        (rt.run_dir / "eval.json").write_text(json.dumps(result, indent=2))
    final = save_final(rt, wrapped)
    rt.metrics.close()
    accuracy = f", held-out accuracy {result['eval_accuracy']:.3f} on {result['eval_pairs']} pairs" if encoded_eval else ""
    rt.print(f"reward model done: {step} steps{accuracy}; saved to {final}")
    return final
