"""GRPO_rank (Oracle-RLAIF), with plain GRPO as a sibling (`grpo.advantage`).

Per rollout: `grpo.rollout_batch` questions, G = `sampling.num_samples` answers each from the
current policy (one shared video prefix per question); the judge ranks each group or scores each
answer, as the advantage estimator asks (`losses.ADVANTAGE_ESTIMATORS[grpo.advantage]`: grpo_rank
compares the policy's ranking, the order of its sequence log-probs, with the judge's by nDCG); then
`grpo.num_iterations` passes of `losses.grpo_loss` over the rollout in mini-batches: clipped
surrogate (token or GSPO sequence ratio, optional clip-higher), k3 KL to the frozen starting policy
(beta), entropy bonus, reduced by the chosen policy loss (`losses.GRPO_LOSSES[grpo.loss]`).

Context (`context`): what the ranker reads besides the question and answers: nothing, the video's
caption from a file (the proxy a text-only API ranker needs), or a narrative of clip captions
written once by the starting policy; kept in RUN/contexts.json.

Ties: the policy's ranking breaks equal log-probs by answer order (`ranks_from_scores`); the oracle
gives answers of equal score one rank (`Oracle.rank`), and the advantages count a policy's order
within such a tie as right (`losses.untie_ranks`), so a group it cannot order is not learnt from. A group whose ranking failed to parse
is left out of the update (its advantages are zero) and counted.

Several processes (DDP, `--launch`): each samples its share of the rollout's questions; rank 0
gathers the answers, judges them all (one judge, one cache) and computes every advantage; each
process then trains on its share, and gradients are averaged. Questions are sampled in batches of
`sampling.batch_size`, each batch with its own seed, so a rollout's answers do not depend on the
process count: with several processes, `grpo.rollout_batch / processes` must be a multiple of
`sampling.batch_size`, and `grpo.mini_batch` of the process count. With one mini-batch per rollout
the update is that of one process; with several, each mini-batch takes an equal part from every
process's share, so its composition (not its expectation) depends on the process count. DeepSpeed
is not supported here.

Artifacts: RUN/config.yaml, metrics.jsonl, rollouts.jsonl (every group: answers, log-probs, the
judge's verdicts and replies, advantages; what `vlmalign inspect` shows), checkpoints/step-N
(N = rollouts), final/, and with `eval_qa` the held-out accuracy of final/ in RUN/eval/.
"""

from __future__ import annotations

import json
import os
import time
from contextlib import contextmanager
from dataclasses import asdict
from pathlib import Path

import torch
from accelerate.utils import broadcast_object_list, extract_model_from_parallel, gather_object
from safetensors.torch import load_file, save_file
from tqdm.auto import tqdm

from vlmalign.config import GRPOConfig
from vlmalign.data.collate import Collator, EncodedSample
from vlmalign.data.formats import VIDEO_TOKEN
from vlmalign.data.template import IGNORE_INDEX
from vlmalign.errors import ConfigError, DataError, VlmalignError
from vlmalign.feedback.judges import JudgeRequest, build_judge
from vlmalign.feedback.preferences import (
    absolute_video,
    build_contexts,
    load_contexts,
    read_questions,
    save_contexts,
    video_key,
)
from vlmalign.losses import (
    ADVANTAGE_ESTIMATORS,
    LossCounts,
    grpo_loss,
    kendall_tau,
    ranks_from_scores,
    untie_ranks,
    token_entropy,
    token_logps,
)
from vlmalign.model.generation import GenerationConfig, answer_logits
from vlmalign.model.policy import MANIFEST, build_model, labelled_logits, load_model
from vlmalign.train.common import (
    all_sum,
    backward,
    check_rollout_shares,
    global_count,
    optimizer_step,
    prepare_training,
    rollout_plan,
    save_final,
    sample_share,
    setup_run,
    uses_deepspeed,
)


def completion_rows(model, question: str, video, samples) -> list[EncodedSample]:
    """Prompt + sampled answer token ids, labels on the answer only (as sampled, EOS included)."""
    text = question if video is None or VIDEO_TOKEN in question else f"{VIDEO_TOKEN}\n{question}"
    prompt = model.encode_prompt(text, model.video_layout(video))
    return [
        EncodedSample("", prompt + s.token_ids, [IGNORE_INDEX] * len(prompt) + s.token_ids, video)
        for s in samples
    ]


def _answer_logps(model, chunk: list, collate: Collator, device, with_entropy: bool, shared_prompts: bool):
    """Token log-probs (and entropies) of a chunk of (question, sample) rows under `model`.

    `shared_prompts`: each question's prompt runs once for all its answers (`answer_logits`, the
    same numbers as full rows). Otherwise every row runs prompt and answer, as a model wrapped for
    DDP needs (its gradient hooks run through the wrapper's forward) and gradient checkpointing too
    (it drops the prompt's cache)."""
    groups: list[tuple] = []  # (question, its samples in the chunk): a chunk may cut a group
    for question, sample in chunk:
        if not groups or groups[-1][0] is not question:
            groups.append((question, []))
        groups[-1][1].append(sample)
    if shared_prompts:
        logits, labels = answer_logits(
            model, [q.question for q, _ in groups], [None if q.video is None else collate.visual.get(q.video) for q, _ in groups],
            [s.token_ids for _, s in chunk], [i for i, (_, samples) in enumerate(groups) for _ in samples])
    else:
        policy = extract_model_from_parallel(model)
        batch = collate([row for q, samples in groups for row in completion_rows(policy, q.question, q.video, samples)])
        logits, labels = labelled_logits(model, batch, device)
    logps, mask = token_logps(logits, labels)
    entropy = token_entropy(logits, labels) if with_entropy else None
    return logps, mask, entropy


def judge_rollout(judge, grpo, questions, texts: list[tuple[str, ...]], seq_logps: torch.Tensor, contexts: dict):
    """(advantages [N, G], valid [N], metrics, judgments) for a whole rollout: the judge ranks
    (grpo_rank) or scores (grpo) every group, reading each video's context; a group whose judgment
    failed gets zero advantages. `judgments`: per group, the list of its judgments (one ranking,
    or one score per answer)."""
    g = seq_logps.shape[1]
    requests = [JudgeRequest(q.video, q.question, answers, contexts.get(video_key(q.video), "") if q.video is not None else "")
                for q, answers in zip(questions, texts)]
    metrics = {}
    estimator = ADVANTAGE_ESTIMATORS[grpo.advantage]
    if estimator.feedback == "ranks":
        judged = judge.rank(requests)
        per_group = [[j] for j in judged]
        valid = torch.tensor([j.status == "ok" for j in judged])
        feedback = torch.tensor([j.value if j.status == "ok" else list(range(g)) for j in judged])
        pred = ranks_from_scores(seq_logps)
        tau = kendall_tau(pred, feedback)[valid]
        tau = tau[~tau.isnan()]  # groups the judge ranked all alike have no order to agree with
        metrics.update(
            kendall_tau=float(tau.mean()) if len(tau) else None,
            ranking_matches=float((pred == untie_ranks(feedback, pred)).all(1)[valid].float().mean()) if valid.any() else None,
        )
    else:
        judged_flat = judge.score([JudgeRequest(r.video, r.question, (a,), r.context) for r in requests for a in r.answers])
        judged = per_group = [judged_flat[i * g : (i + 1) * g] for i in range(len(requests))]
        valid = torch.tensor([all(j.status == "ok" for j in grp) for grp in judged])
        feedback = torch.tensor([[float(j.value) if j.status == "ok" else 0.0 for j in grp] for grp in judged])
        metrics["score_mean"] = float(feedback[valid].mean()) if valid.any() else None
    advantages, delta = estimator.compute(feedback, seq_logps, grpo.dcg)
    if delta is not None:
        metrics["delta_mean"] = float(delta[valid].mean()) if valid.any() else None
    return advantages * valid[:, None], valid, metrics, per_group


def rollout_rows(step: int, questions, groups, judgments, advantages: torch.Tensor, seq_logps: torch.Tensor) -> list[dict]:
    """RUN/rollouts.jsonl rows of one rollout, one per group: the question, every answer with its
    log-prob, the judge's verdicts and raw replies, each answer's advantage and the policy's own
    rank of it (the order of its log-probs, 0 = most likely); what `vlmalign inspect` shows."""
    policy_ranks = ranks_from_scores(seq_logps).tolist()
    return [{
        "step": step, "id": q.id, "video": absolute_video(q.video), "question": q.question,
        "answers": [{"text": s.text, "logp": s.logp, "num_tokens": len(s.token_ids)} for s in group],
        "judgments": [{"kind": j.kind, "status": j.status, "value": j.value, "raw": j.raw, "model": j.model} for j in judged],
        "advantages": adv.tolist(), "policy_ranks": ranks,
    } for q, group, judged, adv, ranks in zip(questions, groups, judgments, advantages, policy_ranks)]


def collect_rollout(cfg: GRPOConfig, policy, visual, gen, judge, questions, indices, step: int, contexts: dict,
                    rank: int, world: int, log: list | None = None):
    """The rollout's questions and groups of answers (every process's, in question order), their
    advantages [N, G], and metrics (the judge's, and the seconds spent sampling and judging; rank
    0's, as it waits for the others). Each process samples its share of each batch of
    questions; rank 0 (the only one holding `judge`) judges them all.

    With `grpo.dynamic_sampling` (DAPO), a group whose advantages are all zero teaches nothing and
    is dropped; further batches of random questions are sampled until `rollout_batch` groups are
    kept or `max_sampling_rounds` batches were sampled. The kept count is cut to a multiple of the
    process count; if no group is left, the first batch trains (its KL term only). The judge's
    metrics describe the first batch: the policy's own rollout; with `log` (rank 0), its
    `rollout_rows` are appended to it."""
    grpo = cfg.grpo
    rounds = grpo.max_sampling_rounds if grpo.dynamic_sampling else 1
    kept: list[tuple] = []
    sampled = 0
    seconds = {"time_sampling": 0.0, "time_judging": 0.0}
    for round_ in range(rounds):
        if round_ == 0:
            batch = [questions[i] for i in indices]
        else:
            draw = torch.Generator().manual_seed((cfg.train.seed * 1_000_003 + step) * 101 + round_)
            batch = [questions[i] for i in torch.randperm(len(questions), generator=draw)[: grpo.rollout_batch].tolist()]
        # a seed of its own per round, so extra batches never repeat the first one's random draws
        started = time.perf_counter()
        _, groups = sample_share(policy, visual, batch, gen, cfg.train.seed + 104_729 * round_, step, rank, world)
        if world > 1:
            groups = gather_object(groups)
        seconds["time_sampling"] += time.perf_counter() - started
        started = time.perf_counter()
        judged = None
        if judge is not None:
            seq_logps = torch.tensor([[s.logp if grpo.logp_order == "sum" else s.logp / max(len(s.token_ids), 1)
                                       for s in grp] for grp in groups])
            judged = judge_rollout(judge, grpo, batch, [tuple(s.text for s in grp) for grp in groups], seq_logps, contexts)
        if world > 1:
            judged = broadcast_object_list([judged], from_process=0)[0]
        seconds["time_judging"] += time.perf_counter() - started
        advantages, valid, round_metrics, judgments = judged
        sampled += len(batch)
        if round_ == 0 and log is not None:
            log += rollout_rows(step + 1, batch, groups, judgments, advantages, seq_logps)
        if round_ == 0:
            first, metrics = list(zip(batch, groups, advantages)), {**round_metrics, "groups_skipped": int((~valid).sum())}
            if not grpo.dynamic_sampling:
                kept = first
                break
        kept += [item for item in zip(batch, groups, advantages) if bool(item[2].abs().sum() > 0)]
        if len(kept) >= grpo.rollout_batch:
            break
    if grpo.dynamic_sampling:
        metrics.update(sampling_rounds=round_ + 1, groups_sampled=sampled, groups_kept=min(len(kept), grpo.rollout_batch))
        kept = kept[: min(len(kept), grpo.rollout_batch) // world * world] or first
    batch_questions, groups, advantages = zip(*kept)
    return list(batch_questions), list(groups), torch.stack(advantages), {**metrics, **seconds}


class RolloutLog:
    """RUN/rollouts.jsonl, appended one rollout at a time; opened at `done` rollouts, it drops the
    rows of later ones (a resumed run samples them again)."""

    def __init__(self, path: Path, done: int):
        self.path = path
        if path.is_file():
            lines = path.read_text(encoding="utf-8").splitlines(keepends=True)
            if lines and not lines[-1].endswith("\n"):  # a write cut short by a crash: that rollout is redone
                lines.pop()
            kept = [line for number, line in enumerate(lines, 1) if line.strip() and self._step(line, number) <= done]
            if len(kept) != len(lines) or path.read_text(encoding="utf-8") != "".join(lines):
                tmp = path.with_suffix(".tmp")
                tmp.write_text("".join(kept), encoding="utf-8")
                os.replace(tmp, path)

    def _step(self, line: str, number: int) -> int:
        try:
            return int(json.loads(line)["step"])
        except (ValueError, KeyError, TypeError) as e:
            raise DataError(f"{self.path}:{number}: not a rollout row with a step ({e}); remove the line or the file "
                            "to resume") from None

    def append(self, rows: list[dict]) -> None:
        with open(self.path, "a", encoding="utf-8") as fh:
            fh.writelines(json.dumps(r, ensure_ascii=False) + "\n" for r in rows)
            fh.flush()
            os.fsync(fh.fileno())  # on disk before the checkpoint that counts this rollout as done


class EpochReference:
    """The KL reference of Oracle-RLAIF's Algorithm 1 (`grpo.reference: epoch`): the policy as it was
    when the current epoch (pass over the questions) began. A snapshot of the trainable weights
    (frozen ones are the policy's own) is swapped in for the reference forward pass, so no second
    model is held. Each snapshot is saved as RUN/reference-epoch-E.safetensors (the previous epoch's
    kept too), so a run interrupted within an epoch resumes with that epoch's reference."""

    def __init__(self, policy, run_dir: Path, is_main: bool):
        self.params = {n: p for n, p in policy.named_parameters() if p.requires_grad}
        self.run_dir, self.is_main = run_dir, is_main
        self.snapshot: dict[str, torch.Tensor] = {}

    def path(self, epoch: int) -> Path:
        return self.run_dir / f"reference-epoch-{epoch}.safetensors"

    def reset(self, epoch: int) -> None:
        self.snapshot = {n: p.detach().clone() for n, p in self.params.items()}
        if self.is_main:
            tmp = self.run_dir / ".tmp-reference.safetensors"
            save_file({n: t.cpu().contiguous() for n, t in self.snapshot.items()}, tmp)
            os.replace(tmp, self.path(epoch))
            for old in self.run_dir.glob("reference-epoch-*.safetensors"):
                if int(old.stem.rsplit("-", 1)[1]) < epoch - 1:
                    old.unlink()

    def load(self, epoch: int) -> None:
        path = self.path(epoch)
        if not path.is_file():
            raise VlmalignError(f"{path}: missing; a grpo.reference=epoch run resumed within epoch {epoch} needs the "
                                "reference saved when that epoch began (start a new run.dir)")
        saved = load_file(path)
        missing = sorted(self.params.keys() - saved.keys())
        if missing:
            raise VlmalignError(f"{path}: has no weights for {missing[0]} (model config changed?)")
        self.snapshot = {n: saved[n].to(p.device, p.dtype) for n, p in self.params.items()}

    @contextmanager
    def swapped_in(self):
        current = {n: p.data for n, p in self.params.items()}
        try:
            for n, p in self.params.items():
                p.data = self.snapshot[n]
            yield
        finally:
            for n, p in self.params.items():
                p.data = current[n]


def _contexts(cfg: GRPOConfig, acc, model, visual, questions, path: Path) -> dict:
    """The ranker's context per video: read from the caption file, or narratives written once by the
    starting policy, each process writing those of its share of the videos. Kept in RUN/contexts.json
    with the settings that made them; a resumed run reuses them only when those settings match and
    every video has one."""
    if cfg.context.kind == "none":
        return {}
    settings = {**asdict(cfg.context), "prompts": cfg.judge.prompts, "policy": cfg.model.init_from}
    one_per_video = list({video_key(q.video): q for q in questions if q.video is not None}.values())
    saved = load_contexts(path, settings, [q.video for q in one_per_video]) if cfg.run.resume else None
    if saved is not None:
        return saved
    share = one_per_video if cfg.context.kind == "caption" else one_per_video[acc.process_index :: acc.num_processes]
    contexts = build_contexts(cfg.context, model, visual, share, prompts_path=cfg.judge.prompts, progress=cfg.run.progress)
    if cfg.context.kind != "caption" and acc.num_processes > 1:
        contexts = {k: v for part in gather_object([contexts]) for k, v in part.items()}
    if acc.is_main_process:
        save_contexts(path, settings, contexts)
    return contexts


def run(cfg: GRPOConfig) -> Path:
    # --- setup -------------------------------------------------------------------------------
    if not cfg.model.init_from:
        raise ConfigError("model.init_from: GRPO starts from a saved policy (e.g. runs/tiny-sft/final)")
    if not cfg.data.train:
        raise ConfigError("data.train: give the question file(s) to train on")
    if cfg.sampling.num_samples < 2:
        raise ConfigError("sampling.num_samples: a group needs at least 2 answers")
    if cfg.context.kind == "retrospective":
        raise ConfigError("context.kind: retrospective contexts belong to iterative DPO; grpo-rank takes none, caption "
                          "or narrative")
    rt = setup_run(cfg, cfg.run, cfg.train)
    final = rt.run_dir / "final"
    if (final / MANIFEST).is_file():
        rt.print(f"{final} exists: this GRPO run is complete")
        return final
    acc, g, grpo = rt.accelerator, cfg.sampling.num_samples, cfg.grpo
    world, rank = acc.num_processes, acc.process_index
    if uses_deepspeed(acc):
        raise ConfigError("grpo-rank does not run under DeepSpeed; launch plain data parallel (--launch multi_gpu)")
    check_rollout_shares(world, grpo.rollout_batch, cfg.sampling.batch_size, grpo.mini_batch, "grpo", "mini_batch")
    model = build_model(cfg.model)
    model.to(acc.device)
    if grpo.reference == "epoch" and grpo.beta <= 0:
        raise ConfigError("grpo.reference: epoch resets the KL term's reference, which grpo.beta = 0 switches off")
    if grpo.max_sampling_rounds < 1:
        raise ConfigError(f"grpo.max_sampling_rounds: at least 1 (got {grpo.max_sampling_rounds})")
    reference = None
    # LoRA policies get the starting reference by disabling adapters; the per-epoch one is a snapshot
    if grpo.beta > 0 and grpo.reference == "start" and not model.uses_lora:
        reference = load_model(cfg.model.init_from).to(acc.device).eval()
    visual = model.visual_inputs(cfg.data.feature_cache)
    collate = Collator(model, visual)
    questions = read_questions(cfg.data.train, cfg.data.video_root)
    contexts = _contexts(cfg, acc, model, visual, questions, rt.run_dir / "contexts.json")
    judge = None  # only rank 0 judges: one judge process, one cache file
    if rt.is_main:
        judge = build_judge(cfg.judge, cfg.judge.cache or rt.run_dir / "judge_cache.sqlite", model=model, visual=visual,
                            progress=False)
    gen = GenerationConfig(
        max_new_tokens=cfg.sampling.max_new_tokens, do_sample=True, temperature=cfg.sampling.temperature,
        top_p=cfg.sampling.top_p, num_return_sequences=g, batch_size=cfg.sampling.batch_size,
    )
    rollouts = rollout_plan(len(questions), grpo.rollout_batch, cfg.train.seed, cfg.train.epochs, cfg.train.max_steps)
    total, per_epoch = len(rollouts), len(questions) // grpo.rollout_batch
    updates_per_rollout = grpo.num_iterations * -(-grpo.rollout_batch * g // grpo.mini_batch)
    rt.print(f"GRPO ({grpo.advantage}): {len(questions)} questions, {total} rollouts of {grpo.rollout_batch} x {g} answers")

    run = prepare_training(rt, model, cfg.train, total * updates_per_rollout, cfg.run.resume)
    model, optimizer, scheduler, checkpointer, step = run.model, run.optimizer, run.scheduler, run.checkpointer, run.step
    policy = acc.unwrap_model(model)
    epoch_reference = None
    if grpo.beta > 0 and grpo.reference == "epoch":
        epoch_reference = EpochReference(policy, rt.run_dir, rt.is_main)
        if step % per_epoch:  # resumed within an epoch: its reference was saved when the epoch began
            epoch_reference.load(step // per_epoch)

    # rank 0 keeps every rollout's groups; rollouts after the checkpoint a run resumes from are
    # sampled again, so their earlier rows go
    rollout_log = RolloutLog(rt.run_dir / "rollouts.jsonl", step) if judge is not None else None

    # --- loop --------------------------------------------------------------------------------
    bar = tqdm(total=total, initial=step, desc=f"grpo ({grpo.advantage})", disable=not (rt.is_main and cfg.run.progress))
    local_batch = grpo.mini_batch // world
    # in one process without gradient checkpointing each prompt runs once for its G answers
    shared_prompts = model is policy and not cfg.model.gradient_checkpointing

    def logps_of(net, chunk, with_entropy=False):
        return _answer_logps(net, chunk, collate, acc.device, with_entropy, shared_prompts)

    while step < total:
        if epoch_reference is not None and step % per_epoch == 0:
            epoch_reference.reset(step // per_epoch)
        model.eval()
        logged = [] if judge is not None else None
        batch_questions, groups, all_advantages, metrics = collect_rollout(
            cfg, policy, visual, gen, judge, questions, rollouts[step], step, contexts, rank, world, log=logged)
        if logged:
            rollout_log.append(logged)
        share = len(groups) // world
        batch_questions = batch_questions[rank * share : (rank + 1) * share]
        groups = groups[rank * share : (rank + 1) * share]
        advantages = all_advantages[rank * share : (rank + 1) * share]
        rows = [(q, s) for q, grp in zip(batch_questions, groups) for s in grp]
        flat_adv = advantages.reshape(-1)
        lengths = torch.tensor([len(s.token_ids) for grp in groups for s in grp], dtype=torch.float)

        # old and reference log-probs of the sampled answers, before any update on this rollout
        update_started = time.perf_counter()
        with torch.no_grad():
            olds, refs = [], []
            rollout_tokens = int(lengths.sum())
            for start in range(0, len(rows), local_batch):
                chunk = rows[start : start + local_batch]
                olds.append(logps_of(model, chunk)[0] if grpo.num_iterations > 1 else None)
                if grpo.beta > 0:
                    if epoch_reference is not None:
                        with epoch_reference.swapped_in():
                            refs.append(logps_of(policy, chunk)[0])
                    elif reference is not None:
                        refs.append(logps_of(reference, chunk)[0])
                    else:
                        with policy.reference():
                            refs.append(logps_of(model, chunk)[0])

        # optimisation passes over the rollout
        model.train()
        sums = {"loss": 0.0, "kl": 0.0, "entropy": 0.0, "clip_fraction": 0.0}
        updates = 0
        updates_per_pass = len(range(0, len(rows), local_batch))
        mean_tokens = global_count(acc, rollout_tokens) / updates_per_pass
        for _ in range(grpo.num_iterations):
            for k, start in enumerate(range(0, len(rows), local_batch)):
                chunk = rows[start : start + local_batch]
                # every loss divides this process's terms by a count over the whole update (all
                # processes); x world because DDP averages gradients
                local_tokens = sum(len(s.token_ids) for _, s in chunk)
                num_tokens = global_count(acc, local_tokens)
                counts = LossCounts(tokens=num_tokens, answers=global_count(acc, len(chunk)),
                                    mean_tokens=mean_tokens, max_length=cfg.sampling.max_new_tokens)
                scale = world
                with acc.autocast():
                    logps, mask, entropy = logps_of(model, chunk, grpo.c_entropy != 0)
                    old = olds[k] if olds[k] is not None else logps.detach()
                    loss, stats = grpo_loss(
                        logps, old, refs[k] if refs else None, flat_adv[start : start + local_batch].to(acc.device),
                        mask, clip=grpo.clip, beta=grpo.beta, entropy=entropy, c_entropy=grpo.c_entropy,
                        loss=grpo.loss, counts=counts, clip_high=grpo.clip_high, ratio=grpo.ratio,
                    )
                backward(acc, loss * scale)
                optimizer_step(acc, model, optimizer, scheduler, cfg.train.max_grad_norm)
                updates += 1
                # each process adds its part of the mini-batch's value; the sum over processes is the value
                sums["loss"] += float(loss.detach()) * scale / world
                for key in ("kl", "entropy", "clip_fraction"):
                    if key in stats:
                        sums[key] += float(stats[key]) * local_tokens / max(num_tokens, 1)
        step += 1
        bar.update(1)
        means = torch.tensor([v / updates for v in sums.values()] + [float(lengths.mean()) / world], device=acc.device)
        means = all_sum(acc)(means)
        metrics.update(zip(sums, means[:-1].tolist()))
        metrics.update(
            advantage_abs_mean=float(all_advantages.abs().mean()), advantage_std=float(all_advantages.std()),
            answer_tokens=float(means[-1]), lr=scheduler.get_last_lr()[0],
            time_update=time.perf_counter() - update_started,  # old/reference passes and optimizer steps
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
