"""Figures of a pipeline run (`vlmalign demo`, `scripts/replicate.py`): PNG files from results.json
and the stages' metrics.jsonl. matplotlib is an optional extra (`pip install -e '.[plots]'`).

    accuracy.png          held-out accuracy of every model (short answers and multiple choice), with
                          the standard deviation over seeds as error bars
    isr_iterations.png    ISR-DPO accuracy and chosen/rejected length ratio per iteration, per context
    judge_agreement.png   self-judge agreement with the oracle per context, each bar with the number
                          of pairs behind it (when the judges stage ran)
    training_curves.png   the training signal of each stage over its steps (first seed)
"""

from __future__ import annotations

import json
import re
from pathlib import Path


class MissingMatplotlib(RuntimeError):
    pass


# (stage folder inside a pipeline run, metric, label) of the training curves
CURVES = (
    ("sft", "loss", "SFT loss"),
    ("ppo/rm", "loss", "reward model loss"),
    ("ppo/ppo", "score", "PPO reward-model score"),
    ("dpo/train", "loss", "DPO loss"),
    ("grpo/grpo_rank", "kendall_tau", "GRPO_rank Kendall tau (policy vs oracle ranking)"),
    ("grpo/grpo", "score_mean", "GRPO oracle score"),
)


def _pyplot():
    try:
        import matplotlib
    except ImportError:
        raise MissingMatplotlib("matplotlib is not installed (pip install -e '.[plots]')") from None
    matplotlib.use("Agg")  # files only: no display needed
    import matplotlib.pyplot as plt

    return plt


def plot_pipeline(runs: list[dict], img_dir, run_dirs: list[Path] | None = None) -> list[Path]:
    """Write the figures of one or several seeds' results (dicts of `run_pipeline`); return their paths."""
    from vlmalign.pipeline import mean_std, model_rows

    plt = _pyplot()
    img_dir = Path(img_dir)
    img_dir.mkdir(parents=True, exist_ok=True)
    written = []

    # accuracy of every model
    rows = [model_rows(r) for r in runs]
    names = list(rows[0])
    fig, ax = plt.subplots(figsize=(9, 4.5))
    width = 0.4
    for k, (column, label) in enumerate((("all", "short answers (oracle)"), ("mcq", "multiple choice"))):
        stats = [mean_std([100 * r[n][column] for r in rows if n in r and column in r[n]] or [0.0]) for n in names]
        xs = [i + (k - 0.5) * width for i in range(len(names))]
        ax.bar(xs, [m for m, _ in stats], width, yerr=[s for _, s in stats] if len(runs) > 1 else None, capsize=3, label=label)
    short = [re.sub(r" context\), iteration (\d+)", r", it. \1)", n.replace(" (start of every method)", "")).replace(": ", "\n")
             for n in names]
    ax.set_xticks(range(len(names)), short, fontsize=7, rotation=20, ha="right")
    ax.set_ylabel("held-out accuracy %")
    ax.set_title(f"Every method from one SFT start ({len(runs)} seed{'s' if len(runs) > 1 else ''})")
    ax.legend(fontsize=8)
    fig.tight_layout()
    written.append(_save(fig, plt, img_dir / "accuracy.png"))

    # ISR-DPO per iteration
    if all("isr" in r for r in runs):
        fig, (acc_ax, ratio_ax) = plt.subplots(1, 2, figsize=(9, 3.5))
        for mode in runs[0]["isr"]:
            iterations = [row["iteration"] for row in runs[0]["isr"][mode]]
            for ax, key in ((acc_ax, "accuracy"), (ratio_ax, "length_ratio")):
                stats = []
                for i in range(len(iterations)):
                    values = [(100 * r["isr"][mode][i]["eval"]["all"]) if key == "accuracy" else r["isr"][mode][i]["length_ratio"]
                              for r in runs]
                    stats.append(mean_std([v for v in values if v is not None] or [float("nan")]))
                ax.errorbar(iterations, [m for m, _ in stats], yerr=[s for _, s in stats], marker="o", capsize=3, label=mode)
        acc_ax.set(xlabel="iteration", ylabel="held-out accuracy %", title="ISR-DPO accuracy")
        ratio_ax.set(xlabel="iteration", ylabel="chosen / rejected words", title="length ratio of the pairs")
        acc_ax.legend(title="context", fontsize=8)
        fig.tight_layout()
        written.append(_save(fig, plt, img_dir / "isr_iterations.png"))

    # judge agreement per context
    if all("judges" in r for r in runs):
        contexts = list(runs[0]["judges"])
        values = [[100 * r["judges"][c]["agreement"] for r in runs if r["judges"][c]["agreement"] is not None] for c in contexts]
        stats = [mean_std(v) if v else (0.0, 0.0) for v in values]
        fig, ax = plt.subplots(figsize=(max(8, 1.1 * len(contexts)), 4.5))
        ax.bar(contexts, [m for m, _ in stats], yerr=[s for _, s in stats] if len(runs) > 1 else None, capsize=3)
        for x, (v, (mean, std)) in enumerate(zip(values, stats)):
            if not v:  # e.g. every verdict failed the swap check: no agreement to show, not 0%
                ax.text(x, 2, "no verdict\nleft", ha="center", va="bottom", fontsize=8)
            else:  # a bar over 2 pairs and one over 200 look alike without their counts
                pairs = sum(r["judges"][contexts[x]]["n"] for r in runs)
                ax.text(x, mean + std + 1, f"n={pairs}", ha="center", va="bottom", fontsize=7)
        ax.tick_params(axis="x", labelrotation=30, labelsize=8)
        ax.axhline(50, color="grey", linestyle="--", linewidth=1, label="chance")
        ax.set(ylabel="agreement with the oracle %", title="Self-judge agreement by context")
        ax.legend(fontsize=8)
        fig.tight_layout()
        written.append(_save(fig, plt, img_dir / "judge_agreement.png"))

    # training curves of the first seed
    if run_dirs:
        curves = []
        for folder, key, label in CURVES:
            path = Path(run_dirs[0]) / folder / "metrics.jsonl"
            if path.is_file():
                points = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
                points = [(m["step"], m[key]) for m in points if isinstance(m.get(key), (int, float))]
                if points:
                    curves.append((label, points))
        if curves:
            cols = 3
            nrows = (len(curves) + cols - 1) // cols
            fig, axes = plt.subplots(nrows, cols, figsize=(11, 3 * nrows), squeeze=False)
            for ax, (label, points) in zip(axes.flat, curves):
                ax.plot([s for s, _ in points], [v for _, v in points])
                ax.set_title(label, fontsize=9)
                ax.set_xlabel("step", fontsize=8)
            for ax in list(axes.flat)[len(curves):]:
                ax.axis("off")
            fig.tight_layout()
            written.append(_save(fig, plt, img_dir / "training_curves.png"))
    return written


# the rank runs of a gym seed (`vlmalign gym`): folder -> label
RANK_RUNS = {"grpo_rank": "paper's advantage", "grpo_rank-control": "paper's, random ranks",
             "grpo_rank_monotone": "monotone advantage", "grpo_rank_monotone-control": "monotone, random ranks"}


def plot_gym_tau(gym_dir, path) -> Path | None:
    """gym_tau.png: Kendall tau between the policy's log-prob ranking and the judge's over the
    rollouts of every GRPO_rank run of a gym folder, one panel per seed; None when there is none."""
    seeds = sorted(Path(gym_dir).glob("seed-*"), key=lambda p: int(p.name.split("-")[1]))
    found = [(seed, name) for seed in seeds for name in RANK_RUNS if (seed / name / "metrics.jsonl").is_file()]
    if not found:
        return None
    plt = _pyplot()
    panels = list(dict.fromkeys(seed for seed, _ in found))
    fig, axes = plt.subplots(1, len(panels), figsize=(4 * len(panels), 3.2), squeeze=False, sharey=True)
    for ax, seed in zip(axes.flat, panels):
        for name, label in RANK_RUNS.items():
            metrics = seed / name / "metrics.jsonl"
            if not metrics.is_file():
                continue
            rows = [r for r in map(json.loads, metrics.read_text().splitlines()) if r.get("kendall_tau") is not None]
            ax.plot([r["step"] for r in rows], [r["kendall_tau"] for r in rows], label=label,
                    linestyle="--" if name.endswith("control") else "-")
        ax.axhline(0, color="grey", linewidth=0.5)
        ax.set_title(seed.name, fontsize=9)
        ax.set_xlabel("rollout", fontsize=8)
    axes.flat[0].set_ylabel("Kendall tau (policy vs judge)", fontsize=8)
    axes.flat[0].legend(fontsize=7)
    fig.tight_layout()
    return _save(fig, plt, Path(path))


def _save(fig, plt, path: Path) -> Path:
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
