"""Held-out accuracy on the synthetic benchmark, judged by its oracle (no LLM judge needed).

Generates greedy answers to `qa_test.json` (or another QA file of the benchmark), scores each with the
oracle, and reports accuracy and mean score (1-5) per question type. Outputs in `out_dir`:
`predictions.jsonl` (Video-ChatGPT prediction fields plus the verdict), `report.json`, `report.md`.
"""

from __future__ import annotations

import json
from collections import defaultdict
from pathlib import Path

from vlmalign.data.features import VisualInputs
from vlmalign.data.formats import read_qa, write_jsonl
from vlmalign.feedback.oracle import Oracle
from vlmalign.model.generation import GenerationConfig, generate_answers
from vlmalign.model.video_lm import load_model


def accuracy_table(predictions: list[dict]) -> dict:
    """{qtype: {"n", "accuracy", "score"}} plus "all", from records with `qtype`, `correct`, `score`."""
    groups = defaultdict(list)
    for p in predictions:
        groups[p["qtype"]].append(p)
        groups["all"].append(p)
    return {
        name: {
            "n": len(rows),
            "accuracy": sum(r["correct"] for r in rows) / len(rows),
            "score": sum(r["score"] for r in rows) / len(rows),
        }
        for name, rows in sorted(groups.items(), key=lambda kv: (kv[0] == "all", kv[0]))
    }


def format_table(columns: dict[str, dict]) -> str:
    """Markdown table of accuracy (%) per question type, one column per model."""
    types = list(next(iter(columns.values())))
    lines = ["| question type | n | " + " | ".join(columns) + " |", "|---|---|" + "---|" * len(columns)]
    for t in types:
        n = next(iter(columns.values()))[t]["n"]
        cells = [f"{100 * col[t]['accuracy']:.1f}" for col in columns.values()]
        lines.append(f"| {t} | {n} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def evaluate_synthetic(
    model_dir, bench_dir, out_dir, qa_file: str = "qa_test.json", batch_size: int = 16, max_new_tokens: int = 32,
    limit: int | None = None, feature_cache: str | None = None, progress: bool = True,
) -> dict:
    bench_dir, out_dir = Path(bench_dir), Path(out_dir)
    items = read_qa(bench_dir / qa_file)[:limit]
    oracle = Oracle.from_dir(bench_dir)
    model = load_model(model_dir)
    answers = generate_answers(
        model, VisualInputs(model, feature_cache), [(q.video, q.question) for q in items],
        GenerationConfig(max_new_tokens=max_new_tokens, batch_size=batch_size), progress=progress,
    )
    predictions = []
    for item, (pred,) in zip(items, answers):
        v = oracle.verdict(item.video, item.question, pred)
        predictions.append({
            "id": item.id, "video_name": Path(item.video).name, "question": item.question, "answer": item.answer,
            "pred": pred, "qtype": v.qtype, "score": v.score, "correct": v.correct, "reason": v.reason,
        })
    table = accuracy_table(predictions)
    report = {
        "model": str(model_dir), "data": str(bench_dir / qa_file), "judge": "oracle", "decoding": "greedy",
        "max_new_tokens": max_new_tokens, "results": table, "table": format_table({"accuracy %": table}),
    }
    out_dir.mkdir(parents=True, exist_ok=True)
    write_jsonl(out_dir / "predictions.jsonl", predictions)
    (out_dir / "report.json").write_text(json.dumps(report, indent=2))
    (out_dir / "report.md").write_text(f"# Synthetic benchmark: {qa_file}\n\nModel: `{model_dir}`, judge: oracle\n\n{report['table']}\n")
    return report
