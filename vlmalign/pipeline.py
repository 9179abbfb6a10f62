"""Every method from one SFT start on the synthetic benchmark: the demo and the replication.

`run_pipeline(out, budget)` runs, each stage resumable (re-running skips what is finished):

  bench   the synthetic benchmark (600 videos)
  sft     the tiny model on the short- and long-answer data (a mixture; with `judge_data`, plus the
          judge-format examples so it can judge its own answers, as a pretrained LLM does)
  judges  self-judge agreement with the oracle on held-out questions: no context, narrative of 1
          and 3 clips, caption proxy (pairwise), no context / 3-clip narrative with the swap check
          (each pair judged in both orders; position-following verdicts dropped), pairs of a true
          and a wrong answer without and with the caption (`feedback/judge_probe.py`), and the
          sampled pairs scored 1-5 one answer at a time with no context, a 3-clip narrative or the
          caption
  ppo     VLM-RLAIF: 2 samples judged with a 3-clip narrative, a reward model on those
          preferences, PPO against it
  dpo     LLaVA-Hound: 6 samples scored 1-5 with the caption (the oracle stands in for the
          caption-proxy LLM judge), chosen >= 3 / rejected <= 2, DPO
  isr     ISR-DPO for T iterations with retrospective context and without context
  grpo    GRPO_rank with the oracle ranker, and plain GRPO on oracle scores, same budget

`self_judge` picks the judge of ppo, isr and judges: the SFT model itself (as the papers) or the
oracle (fast and right; the demo's choice, so a short run shows the training stages working).
Every checkpoint is evaluated on the held-out QA file with the oracle; OUT/results.md and
OUT/results.json hold the table.
"""

from __future__ import annotations

import dataclasses
import json
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from vlmalign.config import ContextConfig, DPOConfig, GRPOConfig, PPOConfig, PrefsConfig, RMConfig, SFTConfig, load_config
from vlmalign.errors import VlmalignError
from vlmalign.eval.synthetic import evaluate_synthetic

STAGES = ("judges", "ppo", "dpo", "isr", "grpo")
CONFIGS = Path(__file__).resolve().parents[1] / "configs" / "tiny"
QTYPES = ("colour", "count", "direction", "shape", "all")


@dataclass
class Budget:
    videos: int = 600
    sft_epochs: int = 4
    judge_data: bool = True  # SFT also on judge_train.json
    self_judge: bool = True  # ppo / isr / judges: the SFT model judges (else the oracle)
    judge_questions: int = 200
    rm_questions: int = 1200
    ppo_rollouts: int = 40
    dpo_questions: int = 1200
    isr_iterations: int = 3
    isr_questions: int = 400
    grpo_rollouts: int = 60
    eval_limit: int | None = None
    seed: int = 0  # training, sampling and initialisation; the benchmark is the same for every seed
    bench_seed: int = 0
    sft_overrides: tuple[str, ...] = ()  # extra `key=value` settings of the SFT config


FULL = Budget()
# `vlmalign demo`: every training stage touched; 6.7 minutes measured on two idle CPU cores.
QUICK = Budget(sft_epochs=4, judge_data=False, self_judge=False, rm_questions=300, ppo_rollouts=10,
               dpo_questions=400, isr_iterations=1, isr_questions=200, grpo_rollouts=15)


def _sets(**values) -> list[str]:
    return [f"{k.replace('__', '.')}={v}" for k, v in values.items()]


class Pipeline:
    def __init__(self, out: Path, budget: Budget, progress: bool = False, bench: Path | None = None,
                 feature_cache: Path | None = None):
        self.out, self.budget = Path(out), budget
        self.bench = Path(bench) if bench else self.out / "bench"
        self.feature_cache = str(feature_cache or self.out / "feature_cache")
        self.progress = str(progress).lower()

    def common(self, tokenizer: bool = True) -> dict:
        values = {"data__feature_cache": self.feature_cache, "run__progress": self.progress}
        if tokenizer:
            b = self.bench
            values["model__tokenizer__word_corpus"] = f"[{b}/sft_mix.json,{b}/judge_train.json,{b}/captions.json]"
        return values

    def judge(self, prefix: str, swap_check: bool = False) -> dict:
        # The tiny model writes narratives and retrospective contexts only when asked with the
        # benchmark's describe question (configs/tiny/prompts/context.yaml says why).
        prompts = {f"{prefix}judge__prompts": CONFIGS / "prompts", f"{prefix}judge__swap_check": str(swap_check).lower()}
        if self.budget.self_judge:
            return {f"{prefix}judge__backend": "hf", f"{prefix}judge__model": "policy", f"{prefix}judge__max_new_tokens": 4,
                    **prompts}
        return {f"{prefix}judge__backend": "oracle", f"{prefix}judge__bench": self.bench, **prompts}

    def evaluate(self, model_dir: Path) -> dict:
        """Held-out accuracy per question type (short answers, oracle-judged), `mcq`, the accuracy on
        the multiple-choice file (letters read from the reply, or the option it names), and
        `generative`, the five criteria of the generative benchmark (0-5, oracle-scored) and their average."""
        from vlmalign.config import JudgeConfig
        from vlmalign.eval.common import Decoding
        from vlmalign.eval.generative import evaluate_generative, synthetic_sets
        from vlmalign.eval.mcq import evaluate_mcq

        limit, cache = self.budget.eval_limit, self.feature_cache
        runs = {
            "eval": lambda out: evaluate_synthetic(model_dir, self.bench, out, qa_file="qa_test.json", limit=limit,
                                                   feature_cache=cache, progress=False),
            "eval-mcq": lambda out: evaluate_mcq("synthetic-mcq", out, data=self.bench / "mcq_test.json", model_dir=model_dir,
                                                 decoding=Decoding(max_new_tokens=16, batch_size=16), limit=limit,
                                                 feature_cache=cache, progress=False),
            # the benchmark's descriptions are at most ~45 tokens long
            "eval-generative": lambda out: evaluate_generative(
                out, JudgeConfig(backend="oracle", bench=str(self.bench)), synthetic_sets(self.bench), model_dir=model_dir,
                decoding=Decoding(max_new_tokens=64, batch_size=16), limit=limit, feature_cache=cache, progress=False),
        }
        reports = {}
        for name, run in runs.items():
            path = model_dir.parent / name / "report.json"
            reports[name] = json.loads(path.read_text()) if path.is_file() else run(path.parent)
        accuracy = {qtype: row["accuracy"] for qtype, row in reports["eval"]["results"].items()}
        accuracy["mcq"] = reports["eval-mcq"]["results"]["all"]["accuracy"]
        accuracy["generative"] = {name: row["score"] for name, row in reports["eval-generative"]["results"].items()}
        return accuracy

    # --- stages --------------------------------------------------------------------------------
    def bench_stage(self) -> None:
        from vlmalign.data.synthetic import generate_benchmark

        if not (self.bench / "manifest.json").is_file():
            generate_benchmark(self.bench, num_videos=self.budget.videos, seed=self.budget.bench_seed)

    def sft_config(self) -> SFTConfig:
        files = [self.bench / "sft_easy.json", self.bench / "sft_hard.json"]
        if self.budget.judge_data:
            files.append(self.bench / "judge_train.json")
        return load_config(SFTConfig, CONFIGS / "sft.yaml", _sets(
            run__dir=self.out / "sft", curriculum__criterion="none", train__epochs=self.budget.sft_epochs,
            train__seed=self.budget.seed, data__train="[" + ",".join(map(str, files)) + "]", data__max_length=512,
            **self.common()) + list(self.budget.sft_overrides))

    def sft_stage(self) -> Path:
        from vlmalign.train import sft

        return sft.run(self.sft_config())

    def prefs_config(self, run_dir: Path, policy: Path, **extra) -> PrefsConfig:
        values = dict(run__dir=run_dir, policy=policy, data__train=f"[{self.bench}/sft_easy.json]",
                      context__captions=self.bench / "captions.json", judge__bench=self.bench,
                      preferences__oracle=self.bench, seed=self.budget.seed, **self.common(tokenizer=False),
                      judge__prompts=CONFIGS / "prompts")  # prefs.yaml's is relative to the repository
        values.update(extra)
        return load_config(PrefsConfig, CONFIGS / "prefs.yaml", _sets(**values))

    def judges_stage(self, sft_final: Path) -> dict:
        from vlmalign.feedback.judge_probe import probe_judge, true_vs_wrong_pairs
        from vlmalign.feedback.judges import build_judge
        from vlmalign.feedback.oracle import Oracle
        from vlmalign.feedback.preferences import build_contexts, make_preferences, read_questions
        from vlmalign.model.policy import load_model

        model = load_model(sft_final).eval()
        visual = model.visual_inputs(self.feature_cache)
        n = self.budget.judge_questions
        questions = read_questions([str(self.bench / "qa_val.json")], None, n)
        rows = {}
        # "+ swap check": each pair judged in both orders, verdicts that follow the position dropped
        for name, ctx, swap in [("none", {"context__kind": "none"}, False),
                                ("narrative-1", {"context__kind": "narrative", "context__clips": 1}, False),
                                ("narrative-3", {"context__kind": "narrative", "context__clips": 3}, False),
                                ("caption", {"context__kind": "caption"}, False),
                                ("none + swap check", {"context__kind": "none"}, True),
                                ("narrative-3 + swap check", {"context__kind": "narrative", "context__clips": 3}, True)]:
            run_dir = self.out / "judges" / name.replace(" + ", "-").replace(" ", "-")
            cfg = self.prefs_config(run_dir, sft_final, data__train=f"[{self.bench}/qa_val.json]", preferences__method="pairwise",
                                    sampling__num_samples=2, preferences__limit=n, **self.judge("", swap), **ctx)
            _, stats = make_preferences(cfg, model, visual, questions, run_dir)
            rows[name] = {"agreement": stats["oracle_agreement"]["agreement"], "n": stats["oracle_agreement"]["n"],
                          "parse_errors": stats["by_status"].get("parse_error", 0), "judgments": stats["judgments"],
                          "inconsistent": stats["by_status"].get("inconsistent", 0),
                          # under the swap check only position-proof verdicts remain: no bias to read
                          "first_answer_chosen": None if swap else stats.get("first_answer_chosen")}
        # a true and a wrong answer per question: does the judge read the answers at all?
        pairs = true_vs_wrong_pairs(Oracle.from_dir(self.bench), questions, seed=self.budget.bench_seed)
        probe_dir = self.out / "judges" / "true-vs-wrong"
        probe_dir.mkdir(parents=True, exist_ok=True)
        judge = build_judge(self.prefs_config(probe_dir, sft_final, **self.judge("")).judge, probe_dir / "judge_cache.sqlite",
                            model=model, visual=visual, progress=False)
        captions = build_contexts(ContextConfig(kind="caption", captions=str(self.bench / "captions.json")), model, visual,
                                  [p.question for p in pairs])
        for name, contexts in [("none", {}), ("caption", captions)]:
            probe = probe_judge(judge, pairs, contexts)
            rows[f"true vs wrong: {name}"] = {"agreement": probe["accuracy"], "n": probe["n"], "parse_errors": probe["not_judged"],
                                              "judgments": len(pairs), "inconsistent": None,
                                              "first_answer_chosen": probe["first_answer_chosen"]}
        # the same answer pairs scored 1-5 one answer at a time: a judge with no position to follow
        for name, ctx in [("none", {"context__kind": "none"}),
                          ("narrative-3", {"context__kind": "narrative", "context__clips": 3}),
                          ("caption", {"context__kind": "caption"})]:
            run_dir = self.out / "judges" / f"score-{name}"
            cfg = self.prefs_config(run_dir, sft_final, data__train=f"[{self.bench}/qa_val.json]",
                                    preferences__method="score_threshold", sampling__num_samples=2, preferences__limit=n,
                                    **self.judge(""), **ctx)
            _, stats = make_preferences(cfg, model, visual, questions, run_dir)
            agreement = stats["oracle_agreement"]
            rows[f"score: {name}"] = {"agreement": agreement["pair_agreement"], "n": agreement["pairs_ordered"],
                                      "tied": agreement["pairs_tied"], "side_agreement": agreement["agreement"],
                                      "parse_errors": stats["by_status"].get("parse_error", 0),
                                      "judgments": stats["judgments"]}
        return rows

    def ppo_stage(self, sft_final: Path) -> dict:
        from vlmalign.feedback import preferences
        from vlmalign.train import ppo, rm

        prefs_dir = self.out / "ppo" / "prefs"
        if not (prefs_dir / "stats.json").is_file():
            preferences.run(self.prefs_config(
                prefs_dir, sft_final, preferences__method="pairwise", sampling__num_samples=2, context__kind="narrative",
                context__clips=3, context__max_new_tokens=64, preferences__limit=self.budget.rm_questions, **self.judge("")))
        stats = json.loads((prefs_dir / "stats.json").read_text())
        rm_final = rm.run(load_config(RMConfig, CONFIGS / "rm.yaml", _sets(
            run__dir=self.out / "ppo" / "rm", model__init_from=sft_final, train__seed=self.budget.seed,
            data__train=f"[{prefs_dir / 'preferences.jsonl'}]", **self.common())))
        rm_eval_path = self.out / "ppo" / "rm" / "eval.json"
        final = ppo.run(load_config(PPOConfig, CONFIGS / "ppo.yaml", _sets(
            run__dir=self.out / "ppo" / "ppo", model__init_from=sft_final, reward_model=rm_final, eval_qa="null",
            data__train=f"[{self.bench}/sft_easy.json]", train__max_steps=self.budget.ppo_rollouts,
            train__seed=self.budget.seed, **self.common())))
        return {"prefs": {k: stats[k] for k in ("pairs", "dropped", "length_ratio", "oracle_agreement")},
                "rm_eval": json.loads(rm_eval_path.read_text()) if rm_eval_path.is_file() else {},
                "eval": self.evaluate(final)}

    def dpo_stage(self, sft_final: Path) -> dict:
        from vlmalign.feedback import preferences
        from vlmalign.train import dpo

        prefs_dir = self.out / "dpo" / "prefs"
        if not (prefs_dir / "stats.json").is_file():
            preferences.run(self.prefs_config(prefs_dir, sft_final, preferences__limit=self.budget.dpo_questions))
        stats = json.loads((prefs_dir / "stats.json").read_text())
        final = dpo.run(load_config(DPOConfig, CONFIGS / "dpo.yaml", _sets(
            run__dir=self.out / "dpo" / "train", model__init_from=sft_final, train__seed=self.budget.seed,
            data__train=f"[{prefs_dir / 'preferences.jsonl'}]", **self.common())))
        return {"prefs": {k: stats[k] for k in ("pairs", "dropped", "length_ratio", "oracle_agreement")},
                "eval": self.evaluate(final)}

    def isr_stage(self, sft_final: Path) -> dict:
        from vlmalign.train import dpo

        result = {}
        for mode in ("retrospective", "none"):
            run_dir = self.out / "isr" / mode
            dpo.run(load_config(DPOConfig, CONFIGS / "isr_dpo.yaml", _sets(
                run__dir=run_dir, model__init_from=sft_final, loop__iterations=self.budget.isr_iterations,
                loop__questions=f"[{self.bench}/sft_easy.json]", loop__limit=self.budget.isr_questions,
                loop__context_mode=mode, loop__preferences__oracle=self.bench, loop__eval_qa=self.bench / "qa_test.json",
                loop__eval_limit=self.budget.eval_limit or "null", train__seed=self.budget.seed,
                **self.judge("loop__"), **self.common())))
            summary = json.loads((run_dir / "summary.json").read_text())
            result[mode] = [{"iteration": s["iteration"], "pairs": s["pairs"], "length_ratio": s["length_ratio"],
                             "agreement": s.get("oracle_agreement", {}).get("agreement"), "eval": s["eval"]}
                            for s in summary]
            # the loop evaluated every iteration on the QA file; the last one gets the full evaluation
            result[mode][-1]["eval"] = self.evaluate(Path(summary[-1]["policy_out"]))
        return result

    def grpo_stage(self, sft_final: Path) -> dict:
        from vlmalign.train import grpo_rank

        result = {}
        for advantage in ("grpo_rank", "grpo"):
            run_dir = self.out / "grpo" / advantage
            final = grpo_rank.run(load_config(GRPOConfig, CONFIGS / "grpo_rank.yaml", _sets(
                run__dir=run_dir, model__init_from=sft_final, data__train=f"[{self.bench}/sft_easy.json]",
                judge__bench=self.bench, grpo__advantage=advantage, train__max_steps=self.budget.grpo_rollouts,
                train__seed=self.budget.seed, eval_qa="null", **self.common())))
            metrics = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
            quarter = max(1, len(metrics) // 4)
            key = "kendall_tau" if advantage == "grpo_rank" else "score_mean"
            result[advantage] = {"eval": self.evaluate(final),
                                 f"{key}_first_quarter": sum(m[key] for m in metrics[:quarter]) / quarter,
                                 f"{key}_last_quarter": sum(m[key] for m in metrics[-quarter:]) / quarter}
        return result


COLUMNS = (*QTYPES, "mcq")
HEADER = "| model | colour | count | direction | shape | all | multiple choice |"
CRITERIA = ("correctness", "detail", "context", "temporal", "consistency", "average")


def model_rows(results: dict) -> dict[str, dict[str, float]]:
    """{model name: {column: accuracy}} of one pipeline run, in table order."""
    evals = {}
    if results.get("init_eval"):
        evals["untrained"] = results["init_eval"]
    evals["SFT (start of every method)"] = results["sft_eval"]
    if "ppo" in results:
        evals["VLM-RLAIF: RM + PPO"] = results["ppo"]["eval"]
    if "dpo" in results:
        evals["LLaVA-Hound: DPO"] = results["dpo"]["eval"]
    for mode, rows in results.get("isr", {}).items():
        evals[f"ISR-DPO ({mode} context), iteration {rows[-1]['iteration']}"] = rows[-1]["eval"]
    for adv, row in results.get("grpo", {}).items():
        evals["GRPO_rank (oracle ranks)" if adv == "grpo_rank" else "GRPO (oracle scores)"] = row["eval"]
    return evals


def mean_std(values: list[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (0 for a single value): the spread over seeds."""
    mean = sum(values) / len(values)
    std = (sum((v - mean) ** 2 for v in values) / (len(values) - 1)) ** 0.5 if len(values) > 1 else 0.0
    return mean, std


def _cell(values: list[float | None], percent: bool = True, digits: int = 1) -> str:
    """One value, or the mean and sample standard deviation of one value per seed."""
    values = [v for v in values if v is not None]
    if not values:
        return "n/a"
    scale = 100 if percent else 1
    mean, std = mean_std(values)
    if len(values) == 1:
        return f"{scale * mean:.{digits}f}"
    return f"{scale * mean:.{digits}f} ± {scale * std:.{digits}f}"


def format_results(runs: list[dict]) -> str:
    """Markdown tables of one pipeline run, or of several seeds (mean ± standard deviation)."""
    first = runs[0]
    per_seed = [model_rows(r) for r in runs]
    lines = [HEADER, "|---|" + "---|" * len(COLUMNS)]
    for name in per_seed[0]:
        cells = [_cell([rows.get(name, {}).get(c) for rows in per_seed]) for c in COLUMNS]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    if len(runs) > 1:
        start = "SFT (start of every method)"
        seeds = [r["budget"]["seed"] for r in runs]
        lines += ["", "Gain in short-answer accuracy over each seed's own SFT start (points):", "",
                  "| method | " + " | ".join(f"seed {s}" for s in seeds) + " | mean ± sd |", "|---|" + "---|" * (len(seeds) + 1)]
        for name in per_seed[0]:
            if name in (start, "untrained"):
                continue
            gains = [100 * (rows[name]["all"] - rows[start]["all"]) if name in rows else None for rows in per_seed]
            cells = [f"{g:+.1f}" if g is not None else "n/a" for g in gains]
            kept = [g for g in gains if g is not None]
            mean, std = mean_std(kept) if kept else (None, None)
            lines.append(f"| {name} | " + " | ".join(cells) + (f" | {mean:+.1f} ± {std:.1f} |" if kept else " | n/a |"))
    if any("generative" in evals for rows in per_seed for evals in rows.values()):
        lines += ["", "Generative benchmark (descriptions of the held-out videos, five criteria scored 0-5 by the oracle):", "",
                  "| model | " + " | ".join(CRITERIA) + " |", "|---|" + "---|" * len(CRITERIA)]
        for name in per_seed[0]:
            cells = [_cell([rows.get(name, {}).get("generative", {}).get(c) for rows in per_seed], False, 2) for c in CRITERIA]
            lines.append(f"| {name} | " + " | ".join(cells) + " |")
    if "judges" in first:
        lines += ["", "Judge agreement with the oracle (pairwise, held-out questions, pairs of the SFT model's samples the "
                  "oracle scores differently; with the swap check, only verdicts that survive swapping A and B count; "
                  "true vs wrong: the reference answer against another video's reference answer to the same question):", "",
                  "| context | agreement % | pairs | first answer chosen % | inconsistent under swap | parse errors |",
                  "|---|---|---|---|---|---|"]
        judges = {name: [r["judges"][name] for r in runs if name in r.get("judges", {})] for name in first["judges"]}
        for name, rows in judges.items():
            if "tied" not in rows[0]:
                lines.append(f"| {name} | {_cell([row['agreement'] for row in rows])} | {_cell([row['n'] for row in rows], False, 0)} "
                             f"| {_cell([row.get('first_answer_chosen') for row in rows])} "
                             f"| {_cell([row.get('inconsistent') for row in rows], False, 0)} "
                             f"| {_cell([row['parse_errors'] for row in rows], False, 0)} |")
        scored = {name: rows for name, rows in judges.items() if "tied" in rows[0]}
        if scored:
            lines += ["", "The same answer pairs scored 1-5 by the judge, one answer at a time (no position to follow); "
                      "agreement counts the pairs the oracle scores differently and the judge too:", "",
                      "| context | agreement % | pairs | pairs scored equal | answers on the oracle's side of 3 % | parse errors |",
                      "|---|---|---|---|---|---|"]
            for name, rows in scored.items():
                lines.append(f"| {name} | {_cell([row['agreement'] for row in rows])} | {_cell([row['n'] for row in rows], False, 0)} "
                             f"| {_cell([row['tied'] for row in rows], False, 0)} | {_cell([row['side_agreement'] for row in rows])} "
                             f"| {_cell([row['parse_errors'] for row in rows], False, 0)} |")
    if "isr" in first:
        lines += ["", "ISR-DPO per iteration:", "",
                  "| context | iteration | pairs | chosen/rejected words | judge-oracle agreement % | accuracy % |",
                  "|---|---|---|---|---|---|"]
        for mode, rows in first["isr"].items():
            for i, r in enumerate(rows):
                seeds = [run["isr"][mode][i] for run in runs if len(run.get("isr", {}).get(mode, [])) > i]
                lines.append(f"| {mode} | {r['iteration']} | {_cell([x['pairs'] for x in seeds], False, 0)} "
                             f"| {_cell([x['length_ratio'] for x in seeds], False, 2)} | {_cell([x['agreement'] for x in seeds])} "
                             f"| {_cell([x['eval']['all'] for x in seeds])} |")
    for run in runs:
        for stage, error in run.get("failed", {}).items():
            lines += ["", f"seed {run['budget']['seed']}, {stage}: failed: {error}"]
    return "\n".join(lines)


def run_pipeline(out, budget: Budget = FULL, stages=STAGES, sft: str | None = None, with_init: bool = False,
                 progress: bool = False, bench: Path | None = None, feature_cache: Path | None = None) -> dict:
    """Run the stages from one SFT start (trained here unless `sft` names a checkpoint); return results."""
    from accelerate.utils import set_seed

    from vlmalign.model.policy import MANIFEST, build_model

    unknown = set(stages) - set(STAGES)
    if unknown:
        raise ValueError(f"unknown stage(s) {sorted(unknown)}; choose from {', '.join(STAGES)}")
    pipe = Pipeline(out, budget, progress, bench, feature_cache)
    pipe.out.mkdir(parents=True, exist_ok=True)
    start = time.time()
    results: dict = {"budget": asdict(budget)}
    print("[bench] synthetic benchmark", flush=True)
    pipe.bench_stage()
    if with_init:
        init = pipe.out / "init" / "model"
        if not (init / MANIFEST).is_file():
            cfg = pipe.sft_config()
            set_seed(cfg.train.seed)  # the seed sft.run uses, so these are its initial weights
            build_model(cfg.model).save_pretrained(init)
        results["init_eval"] = pipe.evaluate(init)
    print(f"[sft] supervised fine-tuning (seed {budget.seed})", flush=True)
    sft_final = Path(sft) if sft else pipe.sft_stage()
    results["sft_eval"] = pipe.evaluate(sft_final)
    for stage in STAGES:
        if stage in stages:
            print(f"[{stage}]", flush=True)
            try:
                results[stage] = getattr(pipe, f"{stage}_stage")(sft_final)
            except VlmalignError as e:  # e.g. no preference pairs: report it, run the other methods
                print(f"[{stage}] failed: {e}", flush=True)
                results.setdefault("failed", {})[stage] = str(e)
    results["minutes"] = round((time.time() - start) / 60, 1)
    _write_results(pipe.out, [results], [pipe.out], pipe.bench, budget)
    return results


def run_seeds(root, budget: Budget, seeds: list[int], **kwargs) -> list[dict]:
    """`run_pipeline` once per training seed on one shared benchmark (ROOT/bench) and feature cache;
    each seed in ROOT/seed-N/, the tables (mean ± standard deviation over seeds) in ROOT/results.md."""
    if len(seeds) == 1:
        return [run_pipeline(root, dataclasses.replace(budget, seed=seeds[0]), **kwargs)]
    root = Path(root)
    runs = [run_pipeline(root / f"seed-{seed}", dataclasses.replace(budget, seed=seed), bench=root / "bench",
                         feature_cache=root / "feature_cache", **kwargs) for seed in seeds]
    _write_results(root, runs, [root / f"seed-{seed}" for seed in seeds], root / "bench", budget)
    return runs


def _write_results(out: Path, runs: list[dict], run_dirs: list[Path], bench: Path, budget: Budget) -> None:
    table = format_results(runs)
    minutes = round(sum(r["minutes"] for r in runs), 1)
    seeds = [r["budget"]["seed"] for r in runs]
    spread = f"mean ± standard deviation over seeds {seeds}" if len(runs) > 1 else f"seed {seeds[0]}"
    header = (f"# Synthetic benchmark: every method from one SFT start\n\nHeld-out accuracy (%) on "
              f"`{bench / 'qa_test.json'}` (short answers, oracle-judged; greedy decoding) and on `mcq_test.json` "
              f"(multiple choice), {spread}. Judge of the feedback stages: "
              f"{'the SFT model itself' if budget.self_judge else 'the oracle'}. Wall time of this invocation "
              f"(finished stages are reused): {minutes} min.\n\n")
    (out / "results.md").write_text(header + table + "\n")
    (out / "results.json").write_text(json.dumps(runs[0] if len(runs) == 1 else {"seeds": runs}, indent=2))
    _plots(out, runs, run_dirs)
    print("\n" + table + f"\n\nresults: {out / 'results.md'} ({minutes} min)", flush=True)


def _plots(out: Path, runs: list[dict], run_dirs: list[Path]) -> None:
    from vlmalign.plots import MissingMatplotlib, plot_pipeline

    try:
        written = plot_pipeline(runs, out / "img", run_dirs)
    except MissingMatplotlib as e:
        print(f"plots skipped: {e}", flush=True)
        return
    print(f"plots: {', '.join(str(p) for p in written)}", flush=True)
