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


@pytest.mark.e2e
def test_two_process_dpo_matches_one_process(tiny_bench, tmp_path):
    from vlmalign.config import SFTConfig, load_config
    from vlmalign.data.formats import read_instructions, write_jsonl
    from vlmalign.feedback.oracle import Oracle
    from vlmalign.model.video_lm import build_model

    repo = __import__("pathlib").Path(__file__).resolve().parents[1]
    torch.manual_seed(0)
    build_model(load_config(SFTConfig, "configs/tiny/sft.yaml", sft_overrides(tiny_bench, tmp_path / "x")).model).save_pretrained(tmp_path / "policy")
    oracle = Oracle.from_dir(tiny_bench)
    samples = read_instructions(tiny_bench / "sft_easy.json")[:32]
    rows = [{"id": s.id, "video": s.video, "prompt": s.turns[0].text,
             "chosen": oracle.reference(s.video, s.turns[0].text.replace("<video>", "").strip()),
             "rejected": samples[(i + 5) % 32].turns[1].text} for i, s in enumerate(samples)]
    write_jsonl(tmp_path / "pairs.jsonl", rows)

    def dpo_args(run_dir, batch, *launch):
        args = ["dpo", "--config", "configs/tiny/dpo.yaml", *launch]
        for k, v in {"run.dir": run_dir, "run.progress": "false", "model.init_from": tmp_path / "policy",
                     "data.train": f"[{tmp_path / 'pairs.jsonl'}]", "data.feature_cache": tmp_path / "fc",
                     "train.batch_size": batch, "train.max_steps": 3, "train.lr": "1e-3"}.items():
            args += ["--set", f"{k}={v}"]
        return _cli(*args)

    _run(dpo_args(tmp_path / "one", 8), repo)
    _run(dpo_args(tmp_path / "two", 4, "--launch", "cpu_2proc"), repo)
    a = load_file(tmp_path / "one" / "final" / "llm" / "model.safetensors")
    b = load_file(tmp_path / "two" / "final" / "llm" / "model.safetensors")
    for name in a:
        torch.testing.assert_close(a[name], b[name], rtol=1e-4, atol=1e-5)
