"""Two processes (gloo on CPU) x batch b train to the same weights as one process x batch 2b."""

import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from tests.conftest import sft_overrides


def _run(args, cwd):
    res = subprocess.run(args, capture_output=True, text=True, cwd=cwd, timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    return res


def _cli(*args):
    return [sys.executable, "-m", "vlmalign.cli", *args]


@pytest.mark.e2e
def test_two_processes_match_one_process_with_twice_the_batch(tiny_bench, tmp_path):
    repo = __import__("pathlib").Path(__file__).resolve().parents[1]
    common = {"train.max_steps": "4", "train.save_every": "2", "curriculum.epochs_per_stage": "1"}
    single = tmp_path / "one"
    args = ["train-sft", "--config", "configs/tiny/sft.yaml"]
    for item in sft_overrides(tiny_bench, single, **common, **{"train.batch_size": "8"}):
        args += ["--set", item]
    _run(_cli(*args), repo)

    double = tmp_path / "two"
    args = ["train-sft", "--config", "configs/tiny/sft.yaml", "--launch", "cpu_2proc"]
    for item in sft_overrides(tiny_bench, double, **common, **{"train.batch_size": "4"}):
        args += ["--set", item]
    _run(_cli(*args), repo)

    a = load_file(single / "final" / "llm" / "model.safetensors")
    b = load_file(double / "final" / "llm" / "model.safetensors")
    for name in a:  # same global batches, gradients all-reduced: equal up to float summation order
        torch.testing.assert_close(a[name], b[name], rtol=1e-4, atol=1e-5)
    one = [line for line in (single / "metrics.jsonl").read_text().splitlines()]
    two = [line for line in (double / "metrics.jsonl").read_text().splitlines()]
    assert len(one) == len(two)  # written once, by rank 0
    assert [p.name for p in (double / "checkpoints").iterdir()] == ["step-2"]
