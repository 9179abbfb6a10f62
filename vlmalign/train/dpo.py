"""DPO (LLaVA-Hound-DPO) and iterative self-retrospective DPO (ISR-DPO) on one trainer.

`train(cfg, pairs)`: one DPO run. The reference is the starting policy; its log-probs of every pair
are computed once before the first update (the policy at step 0 *is* the reference, so no second
model is kept) and stored in `RUN/reference_logps.safetensors`. Chosen and rejected answers of a
batch go through one forward pass of 2B rows. Loss: `losses.dpo_loss`, plus `dpo.sft_weight` times
the token-mean NLL of the chosen answers.

`run(cfg)`: `loop.iterations` 0 trains on the preference files in `data.train`. With T > 0 it runs
ISR-DPO: for t = 1..T, the policy pi_t answers the fixed question set (2 samples, T=0.7), writes the
context of `loop.context_mode`, judges its own pairs (`loop.judge`, by default the policy itself),
and DPO with reference pi_t gives pi_{t+1}. Each iteration lives in `RUN/iter-NN/` (samples,
contexts, judgments, preferences, stats, checkpoints, final); a re-run skips finished iterations
and resumes the first unfinished one where it stopped.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from tqdm.auto import tqdm

from vlmalign.config import DPOConfig, PrefsConfig, RunConfig
from vlmalign.data.collate import Collator, EncodedSample
from vlmalign.data.formats import PreferencePair, Turn, read_json, read_preference_pairs, write_json
from vlmalign.errors import ConfigError, DataError
from vlmalign.losses import dpo_loss, sequence_logps, sft_loss
from vlmalign.model.policy import MANIFEST, build_model, labelled_logits
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
def encode_pairs(pairs: list[PreferencePair], policy, max_length: int) -> list[tuple[EncodedSample, EncodedSample]]:
    out = []
    for p in pairs:
        rows, layout = [], policy.video_layout(p.video)
        for answer in (p.chosen, p.rejected):
            turns = [Turn("user", p.prompt), Turn("assistant", answer)]
            enc = policy.encode_conversation(turns, max_length, sample_id=f"{p.id} ({p.source})", layout=layout)
            rows.append(EncodedSample(p.id, enc.input_ids, enc.labels, p.video))
        out.append((rows[0], rows[1]))
    return out


def pair_batch(collate: Collator, items: list[tuple[EncodedSample, EncodedSample]]) -> dict:
    """One batch of 2B rows: the B chosen answers, then the B rejected ones."""
    return collate([c for c, _ in items] + [r for _, r in items])


def batch_logps(model, batch: dict, device, average: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(sequence log-probs [2B], logits, labels) of a pair batch, the logits and labels cut to the
    answers' positions (`labelled_logits`; `model` may be wrapped for DDP)."""
    logits, labels = labelled_logits(model, batch, device)
    return sequence_logps(logits, labels, average=average), logits, labels


def _data_hash(encoded) -> str:
    h = hashlib.sha256()
    for c, r in encoded:
        h.update(json.dumps([c.id, c.input_ids, r.input_ids, str(c.video)]).encode())
    return h.hexdigest()


@torch.no_grad()
def reference_logps(model, encoded, collate: Collator, batch_size: int, average: bool, path: Path, progress: bool) -> torch.Tensor:
    """[N, 2] (chosen, rejected) log-probs of every pair under the starting policy, cached in `path`."""
    digest = _data_hash(encoded)
    if path.is_file():
        stored = load_file(path)
        if stored["digest"].numpy().tobytes().decode() == digest:
            return stored["logps"]
    was_training = model.training
    model.eval()
    out = []
    for start in tqdm(range(0, len(encoded), batch_size), desc="reference log-probs", disable=not progress):
        chunk = encoded[start : start + batch_size]
        logps = batch_logps(model, pair_batch(collate, chunk), model.device, average)[0]
        out.append(torch.stack([logps[: len(chunk)], logps[len(chunk) :]], 1).float().cpu())
    model.train(was_training)
    logps = torch.cat(out)
    tmp = path.with_suffix(".tmp")
    save_file({"logps": logps.contiguous(), "digest": torch.frombuffer(bytearray(digest.encode()), dtype=torch.uint8)}, tmp)
    tmp.replace(path)
    return logps


# --- one DPO run -----------------------------------------------------------------------------------
def train(cfg: DPOConfig, pairs: list[PreferencePair]) -> Path:
    """DPO from `cfg.model` (init_from: the starting policy = the reference) on `pairs`; returns final/."""
    # --- setup -------------------------------------------------------------------------------
    if not pairs:
        raise DataError(f"DPO run {cfg.run.dir}: no preference pairs to train on")
    rt = setup_run(cfg, cfg.run, cfg.train)
    final = rt.run_dir / "final"
    if (final / MANIFEST).is_file():
        rt.print(f"{final} exists: this DPO run is complete")
        return final
    acc, train_cfg, dpo = rt.accelerator, cfg.train, cfg.dpo
    model = build_model(cfg.model)
    model.to(acc.device)
    visual = model.visual_inputs(cfg.data.feature_cache)
    collate = Collator(model, visual)
    encoded = encode_pairs(pairs, model, cfg.data.max_length)
    ref_path = rt.run_dir / "reference_logps.safetensors"
    if rt.is_main:
        visual.precompute([p.video for p in pairs if p.video is not None], progress=cfg.run.progress)
        reference_logps(model, encoded, collate, train_cfg.batch_size, dpo.average_logps, ref_path, cfg.run.progress)
    acc.wait_for_everyone()
    reference = load_file(ref_path)["logps"]

    batches_per_epoch, steps_each, total_steps = epoch_plan(len(encoded), train_cfg, rt)
    rt.print(f"DPO: {len(encoded)} pairs, {train_cfg.epochs} epochs, {total_steps} optimizer steps, beta {dpo.beta} ({dpo.loss_type})")

    run = prepare_training(rt, model, train_cfg, total_steps, cfg.run.resume)
    model, optimizer, scheduler, checkpointer, step = run.model, run.optimizer, run.scheduler, run.checkpointer, run.step

    # --- loop --------------------------------------------------------------------------------
    model.train()
    bar = tqdm(total=total_steps, initial=step, desc="dpo", disable=not (rt.is_main and cfg.run.progress))
    for epoch, micro in remaining_steps(batches_per_epoch, steps_each, train_cfg.grad_accum, step, total_steps):
        num_pairs = global_count(acc, sum(len(idx) for idx in micro))
        step_batches = [pair_batch(collate, [encoded[i] for i in idx]) for idx in micro]
        # the SFT term is a token mean over the chosen answers of the whole step (all processes)
        chosen_tokens = global_count(acc, sum(int((b["labels"][: len(idx), 1:] != -100).sum()) for b, idx in zip(step_batches, micro)))
        sums = {"loss": 0.0, "chosen_reward": 0.0, "rejected_reward": 0.0, "accuracy": 0.0,
                "chosen_logp": 0.0, "rejected_logp": 0.0, "chosen_tokens": 0.0, "rejected_tokens": 0.0}
        for j, (idx, batch) in enumerate(zip(micro, step_batches)):
            n = len(idx)
            with sync_context(acc, model, sync=j == len(micro) - 1), acc.autocast():
                logps, logits, labels = batch_logps(model, batch, acc.device, dpo.average_logps)
                ref = reference[idx].to(acc.device)
                losses, chosen_r, rejected_r = dpo_loss(
                    logps[:n], logps[n:], ref[:, 0], ref[:, 1], dpo.beta, dpo.loss_type, dpo.label_smoothing
                )
                # pair mean over the global batch; x processes because DDP averages gradients
                loss = losses.sum() / num_pairs * acc.num_processes
                if dpo.sft_weight:
                    loss = loss + dpo.sft_weight * sft_loss(logits[:n], labels[:n], chosen_tokens) * acc.num_processes
            backward(acc, loss)
            counted = (batch["labels"][:, 1:] != -100).sum(-1).float()
            sums["loss"] += loss.item() / acc.num_processes
            sums["chosen_reward"] += float(chosen_r.sum())
            sums["rejected_reward"] += float(rejected_r.sum())
            sums["accuracy"] += float((chosen_r > rejected_r).float().sum())
            sums["chosen_logp"] += float(logps[:n].detach().sum())
            sums["rejected_logp"] += float(logps[n:].detach().sum())
            sums["chosen_tokens"] += float(counted[:n].sum())
            sums["rejected_tokens"] += float(counted[n:].sum())
        grad_norm = optimizer_step(acc, model, optimizer, scheduler, train_cfg.max_grad_norm)
        step += 1
        bar.update(1)
        totals = acc.reduce(torch.tensor(list(sums.values()), device=acc.device), reduction="sum").tolist()
        m = dict(zip(sums, totals))
        loss_value = m.pop("loss")
        m = {k: v / num_pairs for k, v in m.items()}
        bar.set_postfix(loss=f"{loss_value:.3f}", acc=f"{m['accuracy']:.2f}")
        if step % train_cfg.log_every == 0 or step == total_steps:
            metrics = {"epoch": epoch, "loss": loss_value, "lr": scheduler.get_last_lr()[0],
                       "reward_margin": m["chosen_reward"] - m["rejected_reward"], **m}
            if grad_norm is not None:
                metrics["grad_norm"] = grad_norm
            rt.metrics.log(step, **metrics)
        if step % train_cfg.save_every == 0 and step < total_steps:
            checkpointer.save(step, model, optimizer, scheduler, {"epoch": epoch})
    bar.close()

    # --- artifacts ---------------------------------------------------------------------------
    final = save_final(rt, model)
    rt.metrics.close()
    rt.print(f"DPO done: {step} steps, model saved to {final}")
    return final


# --- iterative self-retrospective DPO --------------------------------------------------------------
def _iteration_prefs_config(cfg: DPOConfig, policy: str, out_dir: Path) -> PrefsConfig:
    loop = cfg.loop
    prefs = PrefsConfig(
        run=RunConfig(dir=str(out_dir), resume=cfg.run.resume, progress=cfg.run.progress),
        policy=policy,
        sampling=loop.sampling,
        judge=loop.judge,
        preferences=loop.preferences,
        seed=cfg.train.seed,
    )
    prefs.data = dataclasses.replace(cfg.data, train=list(loop.questions))
    return prefs


def run_iterative(cfg: DPOConfig) -> Path:
    from accelerate.utils import set_seed

    from vlmalign.feedback.context import context_for_iteration
    from vlmalign.feedback.preferences import load_contexts, make_preferences, read_questions, save_contexts
    from vlmalign.model.policy import load_model

    loop = cfg.loop
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        # every process would sample, judge and write the same iteration files
        raise ConfigError("dpo --iterations runs on one process for now; launch the single-iteration `dpo` stage for multi-process training")
    if not cfg.model.init_from:
        raise ConfigError("model.init_from: iterative DPO starts from a saved policy (e.g. runs/tiny-sft/final)")
    if not loop.questions:
        raise ConfigError("loop.questions: give the question file(s) the policy answers each iteration")
    root = Path(cfg.run.dir)
    root.mkdir(parents=True, exist_ok=True)
    questions = read_questions(loop.questions, cfg.data.video_root, loop.limit)
    videos = [q.video for q in questions if q.video is not None]
    policy = cfg.model.init_from
    previous, first = None, None
    summary = []
    for t in range(1, loop.iterations + 1):
        it_dir = root / f"iter-{t:02d}"
        contexts_path = it_dir / "contexts.json"
        done = read_json(it_dir / "summary.json") if (it_dir / "summary.json").is_file() else None
        if done is not None and (Path(done["policy_out"]) / MANIFEST).is_file():
            final = Path(done["policy_out"])
            print(f"iteration {t}: done ({final})", flush=True)
            contexts = load_contexts(contexts_path) or {}
            record = done
        else:
            print(f"iteration {t}/{loop.iterations}: policy {policy}", flush=True)
            set_seed(cfg.train.seed + t)
            model = load_model(policy).eval()
            if torch.cuda.is_available():
                model.cuda()
            visual = model.visual_inputs(cfg.data.feature_cache)
            settings = {"mode": loop.context_mode, "policy": str(policy), "prompts": loop.judge.prompts}
            contexts = load_contexts(contexts_path, settings, videos) if cfg.run.resume else None
            if contexts is None:
                contexts = context_for_iteration(
                    loop.context_mode, t, model, visual, videos, previous, first,
                    prompts_path=loop.judge.prompts, progress=cfg.run.progress,
                )
                it_dir.mkdir(parents=True, exist_ok=True)
                save_contexts(contexts_path, settings, contexts)
            prefs_cfg = _iteration_prefs_config(cfg, policy, it_dir)
            prefs_path, stats = make_preferences(prefs_cfg, model, visual, questions, it_dir, contexts=contexts,
                                                 context_name=loop.context_mode, progress=cfg.run.progress)
            del model, visual
            pairs = read_preference_pairs(prefs_path, cfg.data.video_root)
            if pairs:
                it_cfg = dataclasses.replace(
                    cfg,
                    run=dataclasses.replace(cfg.run, dir=str(it_dir)),
                    model=dataclasses.replace(cfg.model, init_from=str(policy)),
                    train=dataclasses.replace(cfg.train, seed=cfg.train.seed + t),
                )
                final = train(it_cfg, pairs)
            else:
                # the judge preferred no answer of any pair (ties, identical answers): nothing to learn,
                # so the policy goes on unchanged rather than a long loop dying at this iteration
                final = Path(policy)
                print(f"iteration {t}: no preference pairs (dropped: {stats['dropped']}); the policy goes on "
                      f"unchanged", flush=True)
            record = {"iteration": t, "policy_in": str(policy), "policy_out": str(final), **stats}
            if loop.eval_qa:
                record["eval"] = _evaluate(final, loop, cfg.data.feature_cache, it_dir)
            write_json(it_dir / "summary.json", record, indent=2)  # atomic: it marks the iteration done
        summary.append(record)
        first = first if first is not None else contexts
        previous = contexts
        policy = str(final)
    write_json(root / "summary.json", summary, indent=2)
    for rec in summary:
        acc = rec.get("eval", {}).get("all")
        print(
            f"iter {rec['iteration']}: pairs {rec['pairs']}, length ratio {rec['length_ratio'] or float('nan'):.2f}, "
            f"judge-oracle agreement {rec.get('oracle_agreement', {}).get('agreement')}, held-out accuracy {acc}",
            flush=True,
        )
    return Path(policy)


def _evaluate(model_dir: Path, loop, feature_cache, out_dir: Path) -> dict:
    from vlmalign.eval.synthetic import evaluate_qa_file

    report = evaluate_qa_file(model_dir, loop.eval_qa, out_dir / "eval", loop.eval_limit, feature_cache)
    return {qtype: row["accuracy"] for qtype, row in report["results"].items()}


def run(cfg: DPOConfig) -> Path:
    """`vlmalign dpo`: offline DPO on data.train, or ISR-DPO with loop.iterations > 0."""
    if cfg.loop.iterations > 0:
        return run_iterative(cfg)
    if not cfg.data.train:
        raise ConfigError("data.train: give the preference file(s) to train on (or set loop.iterations)")
    if not cfg.model.init_from:
        raise ConfigError("model.init_from: DPO starts from a saved policy (e.g. runs/tiny-sft/final)")
    pairs = [p for path in cfg.data.train for p in read_preference_pairs(path, cfg.data.video_root)]
    return train(cfg, pairs)
