"""Held-out accuracy on the synthetic benchmark, judged by its oracle (no LLM judge needed).

The zero-shot QA evaluation (`vlmalign.eval.qa`) of one QA file of the benchmark (`qa_test.json` by
default) with greedy answers and the `oracle` judge: accuracy and mean oracle score (1-5) per question
type. The training stages call it after training; `vlmalign eval synthetic` is the same with any judge.
"""

from __future__ import annotations

from pathlib import Path

from vlmalign.config import JudgeConfig
from vlmalign.eval.common import Decoding
from vlmalign.eval.qa import evaluate_qa, format_table

__all__ = ["evaluate_synthetic", "evaluate_qa_file", "format_table"]


def evaluate_synthetic(
    model_dir, bench_dir, out_dir, qa_file: str = "qa_test.json", batch_size: int = 16, max_new_tokens: int = 32,
    limit: int | None = None, feature_cache: str | None = None, progress: bool = True,
) -> dict:
    """The report of `evaluate_qa`: `results` ({qtype: {"n", "accuracy", "score", ...}} plus "all"),
    `table` (markdown) and the settings; outputs written to `out_dir`."""
    bench_dir = Path(bench_dir)
    return evaluate_qa(
        "synthetic", out_dir, JudgeConfig(backend="oracle", bench=str(bench_dir)), data=bench_dir / qa_file,
        model_dir=model_dir, decoding=Decoding(max_new_tokens=max_new_tokens, batch_size=batch_size), limit=limit,
        feature_cache=feature_cache, progress=progress,
    )


def evaluate_qa_file(model_dir, qa_path, out_dir, limit: int | None = None, feature_cache: str | None = None) -> dict:
    """`evaluate_synthetic` on one QA file of a benchmark given by its path (its folder is the
    benchmark): what the training stages run after training, without progress bars."""
    qa = Path(qa_path)
    return evaluate_synthetic(model_dir, qa.parent, out_dir, qa_file=qa.name, limit=limit,
                              feature_cache=feature_cache, progress=False)
