"""`vlmalign eval compare RUN_A RUN_B ...`: evaluation reports side by side (SFT vs RLAIF, ...).

Each argument is a `report.json` written by `vlmalign eval` or the folder holding it. The table has a
row per result group and metric (accuracy % and score for QA, accuracy % for multiple choice, the
0-5 score per criterion for the generative benchmark, R@1 and R@5 per direction for retrieval, top-1
and top-5 for action recognition) and a column per report. Numbers made by
different judges, prompt versions or benchmarks are not comparable; the comparison says so under the
table rather than refusing, since looking at them side by side is sometimes the point.

Writes `compare.md` and, when matplotlib is installed (it is not a dependency), `compare.png`: a
grouped bar chart of the headline metric per group.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from vlmalign.errors import DataError, VlmalignError
from vlmalign.eval.common import fmt

__all__ = ["load_report", "compare_reports"]

# task -> (metric, label, shown as a percentage)
_METRICS = {
    "qa": [("accuracy", "accuracy %", True), ("score", "score", False)],
    "mcq": [("accuracy", "accuracy %", True)],
    "generative": [("score", "score (0-5)", False)],
    "retrieval": [("R@1", "R@1 %", True), ("R@5", "R@5 %", True)],
    "action": [("top1", "top-1 %", True), ("top5", "top-5 %", True)],
}


def load_report(spec) -> tuple[str, dict]:
    """(label, report) of a report.json or a folder holding one; the label is the folder as given."""
    path = Path(spec)
    if path.is_dir():
        path = path / "report.json"
    if not path.is_file():
        raise DataError(f"{path}: no such report (give a report.json or the eval folder that holds it)")
    try:
        report = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise DataError(f"{path}:{e.lineno}: invalid JSON ({e.msg})") from None
    for key in ("task", "results"):
        if not isinstance(report, dict) or key not in report:
            raise DataError(f"{path}: not a vlmalign eval report (no {key!r} field)")
    if report["task"] not in _METRICS:
        raise DataError(f"{path}: unknown task {report['task']!r} (known: {', '.join(_METRICS)})")
    return str(path.parent), report


def _judge_name(report: dict) -> str:
    judge = report.get("judge")
    if report.get("text_encoder"):  # CLIP-score: the text tower plays the judge's part
        return f"CLIP text tower {report['text_encoder']}"
    if not judge:
        return "no judge"
    return f"{judge['id']} ({', '.join(judge.get('prompts') or [])})"


def _chart(labels: list[str], groups: list[str], values: list[list[float]], ylabel: str, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")  # files only: no display needed
    import matplotlib.pyplot as plt

    width = 0.8 / len(labels)
    fig, ax = plt.subplots(figsize=(max(6.0, 1.2 * len(groups) * len(labels)), 4))
    for i, (label, row) in enumerate(zip(labels, values)):
        xs = [g + (i - (len(labels) - 1) / 2) * width for g in range(len(groups))]
        ax.bar(xs, row, width, label=label)
    ax.set_xticks(range(len(groups)), groups)
    ax.set_ylabel(ylabel)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def compare_reports(specs: list[str], out_dir=None) -> dict:
    """Compare reports; write compare.md (and compare.png) to `out_dir` (default: `compare/` in the
    reports' common parent folder). Returns {"table", "notes", "markdown", "out", "chart"} (chart:
    the PNG path, or None)."""
    if len(specs) < 2:
        raise VlmalignError("eval compare: give at least two reports (report.json files or eval folders)")
    loaded = [load_report(s) for s in specs]
    if out_dir is None:
        out_dir = Path(os.path.commonpath([os.path.abspath(label) for label, _ in loaded])) / "compare"
    labels = [label for label, _ in loaded]
    reports = [r for _, r in loaded]
    tasks = sorted({r["task"] for r in reports})
    notes = []
    if len(tasks) > 1:
        raise VlmalignError(f"eval compare: the reports are of different kinds ({', '.join(tasks)}); compare like with like")
    task = tasks[0]
    benchmarks = sorted({str(r.get("benchmark")) for r in reports})
    if len(benchmarks) > 1:
        notes.append(f"The reports are of different benchmarks ({', '.join(benchmarks)}).")
    judges = [_judge_name(r) for r in reports]
    if len(set(judges)) > 1:
        notes.append("Different judges made these numbers, so they are not comparable: "
                     + "; ".join(f"{label}: {j}" for label, j in zip(labels, judges)) + ".")
    elif reports[0].get("judge") or reports[0].get("text_encoder"):
        notes.append(f"Judge: {judges[0]}.")
    for label, r in zip(labels, reports):
        j = r.get("judging") or {}
        if j.get("failed") or j.get("parse_errors"):
            notes.append(f"{label}: {j.get('failed', 0)} failed and {j.get('parse_errors', 0)} unparseable judgments "
                         "left out of its numbers.")

    groups = list(dict.fromkeys(g for r in reports for g in r["results"]))
    lines = ["| group | metric | " + " | ".join(labels) + " |", "|---|---|" + "---|" * len(labels)]
    for group in groups:
        for key, name, percent in _METRICS[task]:
            if not any(key in r["results"].get(group, {}) for r in reports):
                continue
            cells = [fmt(r["results"].get(group, {}).get(key), percent) for r in reports]
            lines.append(f"| {group} | {name} | " + " | ".join(cells) + " |")
    table = "\n".join(lines)

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    chart = None
    key, name, percent = _METRICS[task][0]
    try:
        import matplotlib  # noqa: F401  (only probing whether the optional chart can be drawn)
    except ImportError:
        notes.append("No chart: matplotlib is not installed (pip install matplotlib to get compare.png).")
    else:
        values = [[(r["results"].get(g, {}).get(key) or 0) * (100 if percent else 1) for g in groups] for r in reports]
        chart = out / "compare.png"
        _chart(labels, groups, values, name, chart)
    markdown = "\n".join(["# Comparison", "", table, "", *notes]) + "\n"
    (out / "compare.md").write_text(markdown)
    return {"table": table, "notes": notes, "markdown": markdown, "out": str(out), "chart": str(chart) if chart else None}
