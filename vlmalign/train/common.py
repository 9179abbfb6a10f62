"""Mechanics shared by every training stage: run directory, accelerate, batch order, optimizer,
scheduler, atomic checkpoints with resume, metrics. A stage file calls these; it never copies them.

Batch order is a pure function of (seed, epoch tag, process rank, process count), so a resumed run
skips exactly the batches it already trained on and ends with the same weights as one that was never
interrupted.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import time
from contextlib import nullcontext
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path

import torch
import yaml
from safetensors.torch import load_file, save_file

from vlmalign.config import RunConfig, TrainConfig, config_from_dict, save_config, to_dict
from vlmalign.data.formats import read_json
from vlmalign.errors import ConfigError, VlmalignError

# --- run directory and metrics --------------------------------------------------------------------
class MetricsLogger:
    """Appends one JSON object per call to `metrics.jsonl` (main process only); optional TensorBoard."""

    def __init__(self, run_dir: Path, enabled: bool, tensorboard: bool):
        self.enabled = enabled
        self.path = run_dir / "metrics.jsonl"
        self.writer = None
        if enabled and tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self.writer = SummaryWriter(str(run_dir / "tensorboard"))

    def log(self, step: int, **metrics) -> None:
        if not self.enabled:
            return
        record = {"step": step, "time": round(time.time(), 3), **metrics}
        with self.path.open("a") as f:
            f.write(json.dumps(record) + "\n")
        if self.writer:
            for key, value in metrics.items():
                if isinstance(value, (int, float)):
                    self.writer.add_scalar(key, value, step)

    def close(self) -> None:
        if self.writer:
            self.writer.close()


@dataclass
class Runtime:
    accelerator: object
    run_dir: Path
    metrics: MetricsLogger

    @property
    def is_main(self) -> bool:
        return self.accelerator.is_main_process

    @property
    def rank(self) -> int:
        return self.accelerator.process_index

    @property
    def world(self) -> int:
        return self.accelerator.num_processes

    def print(self, *args) -> None:
        if self.is_main:
            print(*args, flush=True)


def setup_run(cfg, run: RunConfig, train: TrainConfig) -> Runtime:
    """Create the run directory, write the resolved config, seed, and start accelerate."""
    from accelerate import Accelerator
    from accelerate.utils import InitProcessGroupKwargs, set_seed

    # Rank 0 alone judges a PPO / GRPO rollout (an API judge retries with backoff) while the other
    # processes wait in a collective: allow it far longer than the usual 10 minutes.
    group = {"timeout": timedelta(hours=2)}
    if os.environ.get("ACCELERATE_USE_DEEPSPEED", "").lower() == "true" and not torch.cuda.is_available():
        # accelerate picks no process-group backend for DeepSpeed without CUDA; gloo runs it on CPU
        group["backend"] = "gloo"
    accelerator = Accelerator(mixed_precision=train.mixed_precision, kwargs_handlers=[InitProcessGroupKwargs(**group)])
    if uses_deepspeed(accelerator):
        # Stages build their models whole and encode videos or score reference log-probs with them
        # before prepare() hands them to DeepSpeed; under ZeRO-3 transformers would otherwise create
        # them already partitioned, and those passes would fail.
        from transformers.integrations import unset_hf_deepspeed_config

        unset_hf_deepspeed_config()
    run_dir = Path(run.dir)
    if accelerator.is_main_process:
        run_dir.mkdir(parents=True, exist_ok=True)
        previous = run_dir / "config.yaml"
        if previous.is_file() and run.resume:
            changed = config_changes(previous, cfg)
            if changed:
                print(f"note: config differs from the one in {previous}: {', '.join(changed)}", flush=True)
        save_config(cfg, previous)
    accelerator.wait_for_everyone()
    set_seed(train.seed)
    metrics = MetricsLogger(run_dir, accelerator.is_main_process, train.tensorboard)
    return Runtime(accelerator, run_dir, metrics)


def config_changes(previous: Path, cfg) -> list[str]:
    """Keys whose values differ between a run's saved config.yaml and `cfg`. A key added to the
    schema since that run was written counts with its default, which the run used."""
    old = yaml.safe_load(previous.read_text()) or {}
    try:
        old = to_dict(config_from_dict(type(cfg), old, source=str(previous)))
    except ConfigError:  # a key since removed or renamed: compare what was written
        pass
    return sorted(_diff_keys(old, to_dict(cfg)))


def _diff_keys(old, new, prefix: str = "") -> list[str]:
    if isinstance(old, dict) and isinstance(new, dict):
        keys = set(old) | set(new)
        return [k for key in keys for k in _diff_keys(old.get(key), new.get(key), f"{prefix}{key}.")]
    return [prefix.rstrip(".")] if old != new else []


# --- batches -------------------------------------------------------------------------------------
def epoch_batches(num_items: int, batch_size: int, seed: int, tag: int, rank: int = 0, world: int = 1) -> list[list[int]]:
    """This process's micro-batches for one pass over `num_items`, shuffled by (seed, tag).

    Global batches of `batch_size * world` items are cut from one permutation and split by rank, so
    1 process x batch 2b and 2 processes x batch b see the same global batches. With several processes
    a final incomplete global batch is dropped so every process takes the same number of steps.
    """
    order = torch.randperm(num_items, generator=torch.Generator().manual_seed(seed * 100_003 + tag)).tolist()
    global_size = batch_size * world
    batches = []
    for start in range(0, num_items, global_size):
        chunk = order[start : start + global_size]
        if world > 1 and len(chunk) < global_size:
            break
        batches.append(chunk[rank * batch_size : (rank + 1) * batch_size])
    return batches


def rollout_plan(num_questions: int, rollout_batch: int, seed: int, epochs: int,
                 max_rollouts: int | None = None) -> list[list[int]]:
    """The question indices of every rollout, epoch after epoch. Rollouts are whole (an epoch's
    incomplete last one is dropped), so any process count splits them alike and a checkpoint
    resumes on another count at the same rollout. `max_rollouts` (train.max_steps) overrides
    `epochs`: the plan runs as many epochs as it takes (the SFT, DPO and RM stages only cap their
    epochs' steps with it)."""
    if num_questions < rollout_batch:
        raise ConfigError(f"rollout_batch ({rollout_batch}) is larger than the {num_questions} training questions")
    per_epoch = num_questions // rollout_batch
    if max_rollouts is not None:
        epochs = -(-max_rollouts // per_epoch)
    plan = [b for e in range(epochs) for b in epoch_batches(num_questions, rollout_batch, seed, e) if len(b) == rollout_batch]
    return plan if max_rollouts is None else plan[:max_rollouts]


def check_rollout_shares(world: int, rollout_batch: int, sampling_batch: int, update_batch: int, section: str,
                         update_key: str) -> None:
    """Several processes split each rollout into equal shares of whole sampling batches, and each
    update batch into equal parts, so a rollout does not depend on the process count."""
    if world == 1:
        return
    if rollout_batch % world or (rollout_batch // world) % sampling_batch:
        raise ConfigError(f"{section}.rollout_batch ({rollout_batch}) / {world} processes must be a multiple of "
                          f"sampling.batch_size ({sampling_batch}): each batch of questions is sampled with its own "
                          "seed, so the rollout does not depend on the process count")
    if update_batch % world:
        raise ConfigError(f"{section}.{update_key} ({update_batch}) must be a multiple of the {world} processes")


def sample_share(policy, visual, questions, gen, seed: int, step: int, rank: int, world: int):
    """This process's share of a rollout: (its questions, their groups of samples). Batch k of
    `gen.batch_size` questions is sampled with its own seed, whichever process samples it."""
    from vlmalign.model.generation import sample_answers

    share = len(questions) // world
    mine = questions[rank * share : (rank + 1) * share]
    groups = []
    for start in range(0, share, gen.batch_size):
        batch_index = (rank * share + start) // gen.batch_size
        generator = torch.Generator(device=policy.device).manual_seed((seed * 1_000_003 + step) * 1009 + batch_index)
        groups += sample_answers(policy, visual, [(q.video, q.question) for q in mine[start : start + gen.batch_size]], gen,
                                 generator=generator)
    return mine, groups


def all_sum(accelerator):
    """tensor -> its sum over processes (identity on one process), for statistics of a sharded rollout."""
    if accelerator.num_processes == 1:
        return lambda t: t
    return lambda t: accelerator.reduce(t.to(accelerator.device), reduction="sum").to(t.device)


def steps_per_epoch(num_batches: int, grad_accum: int) -> int:
    return math.ceil(num_batches / grad_accum)


# --- optimisation ------------------------------------------------------------------------------
def build_optimizer(model: torch.nn.Module, train: TrainConfig) -> torch.optim.Optimizer:
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise VlmalignError("nothing to train: every parameter is frozen (check model.lora / train_projector)")
    decay = [p for p in params if p.dim() >= 2]
    no_decay = [p for p in params if p.dim() < 2]  # biases and norms: no weight decay, as usual
    groups = [{"params": decay, "weight_decay": train.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=train.lr, betas=tuple(train.betas))


def build_scheduler(optimizer, train: TrainConfig, total_steps: int):
    from transformers import get_scheduler

    warmup = int(round(train.warmup_ratio * total_steps))
    name = {"cosine": "cosine", "linear": "linear", "constant": "constant_with_warmup"}[train.scheduler]
    return get_scheduler(name, optimizer, num_warmup_steps=warmup, num_training_steps=max(total_steps, 1))


def uses_deepspeed(accelerator) -> bool:
    return accelerator.state.deepspeed_plugin is not None


def sync_context(accelerator, model, sync: bool):
    """Wrap one micro-batch's forward and backward: gradients are reduced across processes only on
    the optimizer step's last micro-batch (`sync`)."""
    if uses_deepspeed(accelerator):
        accelerator.deepspeed_engine_wrapped.engine.set_gradient_accumulation_boundary(sync)
        return nullcontext()
    return nullcontext() if sync or accelerator.num_processes == 1 else accelerator.no_sync(model)


def backward(accelerator, loss: torch.Tensor) -> None:
    """Backward of a loss that is already normalised over the whole optimizer step, so nothing may
    divide it again (DeepSpeed would, by its accumulation count)."""
    if uses_deepspeed(accelerator):
        accelerator.deepspeed_engine_wrapped.engine.backward(loss, scale_wrt_gas=False)
    else:
        accelerator.backward(loss)


def optimizer_step(accelerator, model, optimizer, scheduler, max_grad_norm: float) -> float | None:
    """Clip, step, schedule, zero the gradients; returns the gradient norm before clipping (None when
    clipping is off). Under DeepSpeed its engine clips (`gradient_clipping`) and steps."""
    if uses_deepspeed(accelerator):
        engine = accelerator.deepspeed_engine_wrapped.engine
        engine.step()
        norm = engine.get_global_grad_norm() if max_grad_norm > 0 else None
    else:
        norm = accelerator.clip_grad_norm_(model.parameters(), max_grad_norm) if max_grad_norm > 0 else None
        optimizer.step()
    scheduler.step()
    optimizer.zero_grad(set_to_none=True)
    return None if norm is None else float(norm)


def global_count(accelerator, count: int) -> int:
    """Sum of `count` over processes (used to normalise losses by the global token count)."""
    return int(all_sum(accelerator)(torch.tensor([count])).item())


@dataclass
class Training:
    """What every recipe's loop works with: the wrapped model, its optimizer and schedule, the
    checkpointer, and the step to start from (0, or the latest checkpoint's when resuming)."""

    model: torch.nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: object
    checkpointer: "Checkpointer"
    step: int
    state: dict  # the resumed checkpoint's loop state ({} when starting fresh)


def prepare_training(rt: "Runtime", model: torch.nn.Module, train: TrainConfig, total_steps: int, resume: bool) -> Training:
    """Optimizer and scheduler for `total_steps` updates, accelerate wrapping, and resumption from the
    run's latest checkpoint when `resume` is set."""
    optimizer = build_optimizer(model, train)
    scheduler = build_scheduler(optimizer, train, total_steps)
    if uses_deepspeed(rt.accelerator):
        configure_deepspeed(rt.accelerator.state.deepspeed_plugin.deepspeed_config, train, rt.world)
    model, optimizer = rt.accelerator.prepare(model, optimizer)
    checkpointer = Checkpointer(rt, train.keep_checkpoints)
    latest = checkpointer.latest() if resume else None
    state = checkpointer.load(latest, model, optimizer, scheduler) if latest is not None else {}
    if latest is not None:
        rt.print(f"resuming from {latest} (step {state['step']})")
    return Training(model, optimizer, scheduler, checkpointer, state.get("step", 0), state)


def configure_deepspeed(ds_config: dict, train: TrainConfig, world: int) -> None:
    """Fill the DeepSpeed config's "auto" batch, accumulation and clipping entries from the training
    config; an explicit value that disagrees with it is an error (the loop, not DeepSpeed, decides)."""
    wanted = {
        "train_micro_batch_size_per_gpu": train.batch_size,
        "gradient_accumulation_steps": train.grad_accum,
        "train_batch_size": train.batch_size * train.grad_accum * world,
        "gradient_clipping": train.max_grad_norm,
    }
    for key, value in wanted.items():
        given = ds_config.get(key, "auto")
        if given == "auto":
            ds_config[key] = value
        elif float(given) != float(value):
            raise VlmalignError(f"DeepSpeed config: {key} is {given}, but the training config gives {value}; set it to \"auto\"")


def epoch_plan(num_items: int, train: TrainConfig, rt: "Runtime") -> tuple[list[list[list[int]]], list[int], int]:
    """Batches of every epoch, optimizer steps per epoch, and the total (capped by max_steps)."""
    batches = [epoch_batches(num_items, train.batch_size, train.seed, e, rt.rank, rt.world) for e in range(train.epochs)]
    steps_each = [steps_per_epoch(len(b), train.grad_accum) for b in batches]
    total = sum(steps_each) if train.max_steps is None else min(sum(steps_each), train.max_steps)
    return batches, steps_each, total


def remaining_steps(batches_per_epoch: list[list[list[int]]], steps_each: list[int], grad_accum: int, start: int, total: int):
    """Yield (epoch index, micro-batches) of every optimizer step from `start` (a resumed run's step)
    up to `total`, skipping the steps trained before the resume."""
    step = 0
    for epoch, batches in enumerate(batches_per_epoch):
        for local in range(steps_each[epoch]):
            if step >= total:
                return
            if step >= start:
                yield epoch, batches[local * grad_accum : (local + 1) * grad_accum]
            step += 1


# --- checkpoints -------------------------------------------------------------------------------
DEEPSPEED_TAG = "deepspeed"  # the folder DeepSpeed's own checkpoint goes in, inside step-N/


class Checkpointer:
    """`checkpoints/step-N/`: trainable weights, optimizer, scheduler, RNG and loop state. Under
    DeepSpeed, weights and optimizer are DeepSpeed's own sharded checkpoint in `step-N/deepspeed/`.

    Written to a temporary folder and renamed into place, so a crash never leaves a half checkpoint
    that a resume would pick up; only the newest `keep` are kept.
    """

    def __init__(self, runtime: Runtime, keep: int):
        self.runtime = runtime
        self.root = runtime.run_dir / "checkpoints"
        self.keep = keep

    def latest(self) -> Path | None:
        if not self.root.is_dir():
            return None
        done = [p for p in self.root.glob("step-*") if (p / "state.json").is_file()]
        return max(done, key=lambda p: int(p.name.split("-")[1]), default=None)

    def save(self, step: int, model, optimizer, scheduler, state: dict) -> None:
        rt = self.runtime
        acc = rt.accelerator
        final = self.root / f"step-{step}"
        tmp = self.root / f".tmp-step-{step}"
        if rt.is_main:
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(parents=True)
        acc.wait_for_everyone()
        if uses_deepspeed(acc):
            # ZeRO partitions optimizer state (and, at stage 3, the weights): every process writes its shard
            acc.deepspeed_engine_wrapped.engine.save_checkpoint(str(tmp), tag=DEEPSPEED_TAG, exclude_frozen_parameters=True)
        elif rt.is_main:
            unwrapped = acc.unwrap_model(model)
            trainable = {n: p.detach().cpu().contiguous() for n, p in unwrapped.named_parameters() if p.requires_grad}
            save_file(trainable, tmp / "trainable.safetensors")
            torch.save(optimizer.state_dict(), tmp / "optimizer.pt")
        if rt.is_main:
            torch.save(scheduler.state_dict(), tmp / "scheduler.pt")
        torch.save({"cpu": torch.get_rng_state()}, tmp / f"rng-{rt.rank}.pt")
        acc.wait_for_everyone()
        if rt.is_main:
            (tmp / "state.json").write_text(json.dumps({"step": step, "processes": rt.world, **state}))
            os.replace(tmp, final)
            for old in sorted(self.root.glob("step-*"), key=lambda p: int(p.name.split("-")[1]))[: -self.keep]:
                shutil.rmtree(old, ignore_errors=True)
        acc.wait_for_everyone()

    def load(self, path: Path, model, optimizer, scheduler) -> dict:
        acc = self.runtime.accelerator
        state = read_json(path / "state.json")
        if uses_deepspeed(acc):
            if not (path / DEEPSPEED_TAG).is_dir():
                raise VlmalignError(f"{path}: not a DeepSpeed checkpoint; resume it without DeepSpeed, or start a new run.dir")
            written_by = state.get("processes")
            if written_by != self.runtime.world:
                raise VlmalignError(
                    f"{path}: ZeRO checkpoint written by {written_by} processes, resumed with {self.runtime.world}; "
                    "resume with the same process count (or convert it with DeepSpeed's ds_to_universal)"
                )
            acc.deepspeed_engine_wrapped.engine.load_checkpoint(
                str(path), tag=DEEPSPEED_TAG, load_module_strict=False, load_lr_scheduler_states=False
            )
        else:
            if not (path / "trainable.safetensors").is_file():
                raise VlmalignError(f"{path}: a DeepSpeed checkpoint; resume it under the same DeepSpeed launch config")
            params = dict(acc.unwrap_model(model).named_parameters())
            for name, tensor in load_file(path / "trainable.safetensors").items():
                if name not in params:
                    raise VlmalignError(f"{path}: checkpoint has parameter {name} that the model lacks (model config changed?)")
                params[name].data.copy_(tensor)
            # plain optimizer state is whole on every process, so any process count can resume it
            optimizer.load_state_dict(torch.load(path / "optimizer.pt", weights_only=True))
        scheduler.load_state_dict(torch.load(path / "scheduler.pt", weights_only=True))
        rng = path / f"rng-{self.runtime.rank}.pt"
        if rng.is_file():  # absent when resuming with more processes than wrote the checkpoint
            torch.set_rng_state(torch.load(rng, weights_only=True)["cpu"])
        return state


def save_final(runtime: Runtime, model, name: str = "final") -> Path:
    """Save the model in the HF layout (`VideoLM.save_pretrained`) atomically under the run dir."""
    acc = runtime.accelerator
    acc.wait_for_everyone()
    final = runtime.run_dir / name
    unwrapped = acc.unwrap_model(model)
    with gathered_weights(acc, unwrapped):
        if runtime.is_main:
            tmp = runtime.run_dir / f".tmp-{name}"
            shutil.rmtree(tmp, ignore_errors=True)
            unwrapped.save_pretrained(tmp)
            shutil.rmtree(final, ignore_errors=True)
            os.replace(tmp, final)
    acc.wait_for_everyone()
    return final


def gathered_weights(accelerator, module: torch.nn.Module):
    """Context in which every process holds `module`'s whole weights: ZeRO-3 partitions them across
    processes, so saving (or generating) gathers them once; a no-op otherwise."""
    plugin = accelerator.state.deepspeed_plugin
    if plugin is None or plugin.zero_stage != 3:
        return nullcontext()
    import deepspeed

    return deepspeed.zero.GatheredParameters(list(module.parameters()), modifier_rank=None)
