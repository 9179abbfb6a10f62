"""Curriculum SFT (VLM-RLAIF): instruction data split into easy and hard stages by answer length,
trained one stage after the other (one epoch each by default); `curriculum.criterion: none` trains on
the mixture. Config in (`SFTConfig`), artifacts out: `RUN/config.yaml`, `metrics.jsonl`,
`checkpoints/step-N/`, `final/`.
"""

from __future__ import annotations

import statistics
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm.auto import tqdm

from vlmalign.config import CurriculumConfig, SFTConfig
from vlmalign.data.collate import Collator, EncodedSample, encode_instructions
from vlmalign.data.formats import InstructionSample, read_instructions
from vlmalign.errors import ConfigError
from vlmalign.losses import answer_nll
from vlmalign.model.policy import MANIFEST, build_model, labelled_logits
from vlmalign.train.common import (
    backward,
    epoch_batches,
    global_count,
    optimizer_step,
    prepare_training,
    remaining_steps,
    save_final,
    setup_run,
    steps_per_epoch,
    sync_context,
)


@dataclass
class Pass:
    """One epoch over one curriculum stage's data."""

    stage: str
    data: list[EncodedSample]
    batches: list[list[int]]
    steps: int


def answer_words(sample: InstructionSample) -> int:
    return sum(len(t.text.split()) for t in sample.turns if t.role == "assistant")


def curriculum_stages(files: list[list[InstructionSample]], cfg: CurriculumConfig) -> list[tuple[str, list[InstructionSample]]]:
    """Split the training data into named stages, in training order."""
    if cfg.criterion == "none":
        return [("mix", [s for f in files for s in f])]
    if cfg.criterion == "files":
        if len(files) != len(cfg.stages):
            raise ConfigError(f"curriculum.criterion 'files' needs one data.train file per stage: {len(files)} files, stages {cfg.stages}")
        return list(zip(cfg.stages, files))
    samples = [s for f in files for s in f]
    threshold = cfg.threshold if cfg.threshold is not None else statistics.median(answer_words(s) for s in samples)
    split = {
        "easy": [s for s in samples if answer_words(s) <= threshold],
        "hard": [s for s in samples if answer_words(s) > threshold],
    }
    unknown = [name for name in cfg.stages if name not in split]
    if unknown:
        raise ConfigError(f"curriculum.stages: {unknown} not in 'easy', 'hard' (criterion answer_length)")
    return [(name, split[name]) for name in cfg.stages if split[name]]


def run(cfg: SFTConfig) -> Path:
    # --- setup -------------------------------------------------------------------------------
    if not cfg.data.train:
        raise ConfigError("data.train: give at least one instruction data file")
    rt = setup_run(cfg, cfg.run, cfg.train)
    final = rt.run_dir / "final"
    if (final / MANIFEST).is_file():
        rt.print(f"{final} exists: this stage is complete (delete it or change run.dir to train again)")
        return final
    acc, train = rt.accelerator, cfg.train
    model = build_model(cfg.model)
    model.to(acc.device)

    files = [read_instructions(path, cfg.data.video_root) for path in cfg.data.train]
    stages = curriculum_stages(files, cfg.curriculum)
    visual = model.visual_inputs(cfg.data.feature_cache)
    if rt.is_main:
        visual.precompute([s.video for _, data in stages for s in data if s.video is not None], progress=cfg.run.progress)
    acc.wait_for_everyone()
    collate = Collator(model, visual)

    epochs = cfg.curriculum.epochs_per_stage if cfg.curriculum.criterion != "none" else train.epochs
    passes = []
    for name, samples in stages:
        data = encode_instructions(samples, model, cfg.data.max_length)
        for _ in range(epochs):
            batches = epoch_batches(len(data), train.batch_size, train.seed, len(passes), rt.rank, rt.world)
            passes.append(Pass(name, data, batches, steps_per_epoch(len(batches), train.grad_accum)))
    total_steps = sum(p.steps for p in passes)
    if train.max_steps is not None:
        total_steps = min(total_steps, train.max_steps)
    rt.print(f"SFT: stages {[(n, len(s)) for n, s in stages]}, {len(passes)} passes, {total_steps} optimizer steps")
    # The loss per question type, where the records name one: a mix's overall loss can fall while
    # one type stays on its plateau (the gym's reader and direction in the SFT mix, docs/results.md).
    kinds = sorted({s.kind for _, samples in stages for s in samples if s.kind})
    kind_rows = {kind: i for i, kind in enumerate(kinds)}
    kind_nll = torch.zeros(len(kinds) + 1, 2, dtype=torch.float32, device=acc.device)  # per kind since the last log: NLL, tokens; last row: no kind

    run = prepare_training(rt, model, train, total_steps, cfg.run.resume)
    model, optimizer, scheduler, checkpointer, step = run.model, run.optimizer, run.scheduler, run.checkpointer, run.step

    # --- loop --------------------------------------------------------------------------------
    model.train()
    bar = tqdm(total=total_steps, initial=step, desc="sft", disable=not (rt.is_main and cfg.run.progress))
    schedule = remaining_steps([p.batches for p in passes], [p.steps for p in passes], train.grad_accum, step, total_steps)
    for pass_index, micro in schedule:
        p = passes[pass_index]
        batches = [collate([p.data[i] for i in idx]) for idx in micro]
        num_tokens = global_count(acc, sum(int((b["labels"][:, 1:] != -100).sum()) for b in batches))
        loss_sum = 0.0
        for j, batch in enumerate(batches):
            with sync_context(acc, model, sync=j == len(batches) - 1), acc.autocast():
                logits, labels = labelled_logits(model, batch, acc.device)
                # losses.sft_loss, from the per-row sums that the loss per kind reads too (one
                # log-softmax): sum over tokens / global token count; x world because DDP averages gradients
                row_nll, row_tokens = answer_nll(logits, labels)
                loss = row_nll.sum() / max(num_tokens, 1) * acc.num_processes
                if kinds:
                    rows = torch.tensor([kind_rows.get(k, len(kinds)) for k in batch["kinds"]], device=acc.device)
                    kind_nll.index_add_(0, rows, torch.stack([row_nll.detach(), row_tokens.to(row_nll.dtype)], 1))
            backward(acc, loss)
            loss_sum += loss.item() / acc.num_processes
        grad_norm = optimizer_step(acc, model, optimizer, scheduler, train.max_grad_norm)
        step += 1
        bar.update(1)
        loss_value = float(acc.reduce(torch.tensor(loss_sum, device=acc.device), reduction="sum"))
        bar.set_postfix(stage=p.stage, loss=f"{loss_value:.3f}")
        if step % train.log_every == 0 or step == total_steps:
            metrics = {"stage": p.stage, "loss": loss_value, "lr": scheduler.get_last_lr()[0], "tokens": num_tokens}
            if grad_norm is not None:
                metrics["grad_norm"] = grad_norm
            if kinds:
                totals = acc.reduce(kind_nll[:-1].clone(), reduction="sum").cpu()
                metrics.update({f"loss/{k}": float(s / n) for k, (s, n) in zip(kinds, totals.tolist()) if n})
                kind_nll.zero_()
            rt.metrics.log(step, **metrics)
        if step % train.save_every == 0 and step < total_steps:
            checkpointer.save(step, model, optimizer, scheduler, {"stage": p.stage})
    bar.close()

    # --- artifacts ---------------------------------------------------------------------------
    final = save_final(rt, model)
    rt.metrics.close()
    rt.print(f"SFT done: {step} steps, model saved to {final} (feature cache hits {visual.hits}, misses {visual.misses})")
    return final
