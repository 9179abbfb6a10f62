import json
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from tests.conftest import sft_overrides
from vlmalign.config import CurriculumConfig, SFTConfig, load_config
from vlmalign.data.formats import InstructionSample, Turn
from vlmalign.errors import ConfigError
from vlmalign.train import sft
from vlmalign.train.common import epoch_batches

TINY = "configs/tiny/sft.yaml"


def sample(i, answer):
    return InstructionSample(f"s{i}", None, [Turn("user", "q"), Turn("assistant", answer)], "x:1")


def test_curriculum_split_by_answer_length():
    data = [[sample(0, "red."), sample(1, "a red square moves left then leaves"), sample(2, "two."), sample(3, "one blue circle")]]
    stages = sft.curriculum_stages(data, CurriculumConfig(criterion="answer_length", threshold=2))
    assert [(n, [s.id for s in ss]) for n, ss in stages] == [("easy", ["s0", "s2"]), ("hard", ["s1", "s3"])]
    median = sft.curriculum_stages(data, CurriculumConfig(criterion="answer_length"))  # median words = 2
    assert [len(ss) for _, ss in median] == [2, 2]
    reverse = sft.curriculum_stages(data, CurriculumConfig(criterion="answer_length", threshold=2, stages=["hard", "easy"]))
    assert [n for n, _ in reverse] == ["hard", "easy"]
    assert [n for n, _ in sft.curriculum_stages(data, CurriculumConfig(criterion="none"))] == ["mix"]
    with pytest.raises(ConfigError, match="one data.train file per stage"):
        sft.curriculum_stages(data, CurriculumConfig(criterion="files"))


def test_batch_order_is_deterministic_and_process_count_invariant():
    one = epoch_batches(20, 4, seed=3, tag=1)
    assert one == epoch_batches(20, 4, seed=3, tag=1)
    assert one != epoch_batches(20, 4, seed=3, tag=2)
    assert sorted(i for b in one for i in b) == list(range(20))
    r0, r1 = epoch_batches(20, 2, 3, 1, rank=0, world=2), epoch_batches(20, 2, 3, 1, rank=1, world=2)
    assert [a + b for a, b in zip(r0, r1)] == one  # 2 processes x batch 2 == 1 process x batch 4
    assert len(epoch_batches(21, 2, 3, 1, rank=0, world=2)) == 5  # incomplete global batch dropped


def _final_llm(run_dir):
    return load_file(run_dir / "final" / "llm" / "model.safetensors")


def test_interrupted_sft_resumes_to_the_same_weights(tiny_bench, tmp_path, monkeypatch, kill_at_step):
    overrides = {"train.save_every": "3", "train.max_steps": "7"}
    straight = tmp_path / "straight"
    sft.run(load_config(SFTConfig, TINY, sft_overrides(tiny_bench, straight, **overrides)))

    resumed = tmp_path / "resumed"
    cfg = load_config(SFTConfig, TINY, sft_overrides(tiny_bench, resumed, **overrides))
    kill_at_step(6)  # as if killed during step 6
    with pytest.raises(KeyboardInterrupt):
        sft.run(cfg)
    monkeypatch.undo()
    assert [p.name for p in (resumed / "checkpoints").iterdir()] == ["step-3"]
    assert not (resumed / "final").exists()

    sft.run(cfg)  # the same command again
    a, b = _final_llm(straight), _final_llm(resumed)
    assert a.keys() == b.keys()
    for name in a:
        assert torch.equal(a[name], b[name]), name
    steps = [json.loads(line)["step"] for line in (resumed / "metrics.jsonl").read_text().splitlines()]
    assert steps[-1] == 7


def test_sft_logs_the_loss_of_each_question_type_its_records_name(tiny_bench, tmp_path):
    """One step on every short question at once: the step's loss is a token-weighted mean of the
    per-type losses logged beside it, so it lies between them; with one type it is that type's."""
    records = json.loads((tiny_bench / "sft_easy.json").read_text())
    colour = tmp_path / "colour.json"
    colour.write_text(json.dumps([{**r, "video": str(tiny_bench / r["video"])} for r in records if r["question_type"] == "colour"]))
    logged = {}
    for name, data in (("all", tiny_bench / "sft_easy.json"), ("colour", colour)):
        sft.run(load_config(SFTConfig, TINY, sft_overrides(
            tiny_bench, tmp_path / name, **{"data.train": f"[{data}]", "curriculum.criterion": "none",
                                            "train.batch_size": len(records), "train.max_steps": 1, "train.log_every": 1})))
        logged[name] = json.loads((tmp_path / name / "metrics.jsonl").read_text().splitlines()[-1])
    by_type = {k.split("/", 1)[1]: v for k, v in logged["all"].items() if k.startswith("loss/")}
    assert set(by_type) == {r["question_type"] for r in records} == {"colour", "count", "direction", "shape"}
    assert min(by_type.values()) < logged["all"]["loss"] < max(by_type.values())
    assert logged["colour"]["loss/colour"] == pytest.approx(logged["colour"]["loss"], rel=1e-5)
    assert [k for k in logged["colour"] if k.startswith("loss/")] == ["loss/colour"]


def test_sft_trains_on_the_llamafactory_fixture(fixtures, tmp_path):
    data = fixtures / "llamafactory" / "mllm_video_demo.json"
    overrides = [
        f"run.dir={tmp_path / 'run'}", "run.progress=false", f"data.train=[{data}]", "curriculum.criterion=none",
        f"data.feature_cache={tmp_path / 'cache'}", f"model.tokenizer.word_corpus=[{data}]",
        "model.num_frames=4", "train.batch_size=3", "train.max_steps=1", "train.log_every=1",
    ]
    final = sft.run(load_config(SFTConfig, TINY, overrides))
    record = json.loads((tmp_path / "run" / "metrics.jsonl").read_text().splitlines()[-1])
    assert record["step"] == 1 and record["loss"] > 0 and record["tokens"] > 0
    assert (final / "model.json").is_file()
    assert len(list((tmp_path / "cache").rglob("*.safetensors"))) == 3  # one feature file per real video


def run_cli(*args, cwd=None):
    return subprocess.run([sys.executable, "-m", "vlmalign.cli", *args], capture_output=True, text=True, cwd=cwd, timeout=300)


def test_help_lists_every_subcommand():
    out = run_cli("--help").stdout
    for cmd in ["train-sft", "generate", "make-instructions", "make-prefs", "train-rm", "ppo", "dpo", "grpo-rank",
                "eval", "make-synthetic", "gym", "demo"]:
        assert cmd in out
    assert "--iterations" in run_cli("dpo", "--help").stdout


def test_gym_refuses_unknown_methods_and_seeds_in_one_line(tmp_path):
    res = run_cli("gym", "--out", str(tmp_path / "gym"), "--methods", "dpo,sft")
    assert res.returncode == 2 and res.stderr.strip() == "error: --methods: unknown sft; choose from dpo, grpo, grpo_rank, grpo_rank_monotone, ppo, ppo_oracle, isr_dpo, vlm_rlaif"
    res = run_cli("gym", "--out", str(tmp_path / "gym"), "--seeds", "0,x")
    assert res.returncode == 2 and res.stderr.strip() == "error: --seeds: comma-separated integers, got '0,x'"
    res = run_cli("gym", "--out", str(tmp_path / "gym"), "--design", "cubes")
    assert res.returncode == 2 and "argument --design: invalid choice: 'cubes'" in res.stderr
    res = run_cli("gym", "--out", str(tmp_path / "gym"), "--family", "qwen2_5_vl")  # the default design is VideoLM's grid
    assert res.returncode == 2 and res.stderr.strip() == (
        "error: frame_grid, visual_positions: vlmalign's VideoLM's pooling (the grid and perception designs'); "
        "qwen2_5_vl pools and places each frame as its checkpoint does: give --design pooled or quick")
    assert not (tmp_path / "gym").exists()


def test_missing_input_is_one_error_line_and_no_output():
    res = run_cli("eval", "retrieval", "--model", "x")
    assert res.returncode == 2 and "--model needs --data" in res.stderr and not res.stdout


def _one_line_error(result, *needles):
    code, err = result
    assert code == 2, err
    lines = [l for l in err.splitlines() if l.startswith("error:")]
    assert len(lines) == 1, err
    for n in needles:
        assert n in lines[0], lines[0]
    assert "Traceback" not in err


def _write_sft_data(path, video):
    record = {"id": "v1", "video": str(video), "conversations": [{"from": "human", "value": "<video>\nwhat colour?"},
                                                                  {"from": "gpt", "value": "red."}]}
    path.write_text(json.dumps([record]))
    return path


def _sft_cli(capsys, tmp_path, data, *extra):
    from vlmalign.cli import main

    capsys.readouterr()
    code = main(["train-sft", "--config", "configs/tiny/sft.yaml", "--set", f"run.dir={tmp_path / 'run'}",
                   "--set", f"data.train=[{data}]", "--set", "curriculum.criterion=none",
                   "--set", f"model.tokenizer.word_corpus=[{data}]", "--set", f"data.feature_cache={tmp_path / 'fc'}", "--set", "run.progress=false", *extra])
    return code, capsys.readouterr().err


def test_bad_inputs_give_one_line_errors(tmp_path, capsys):
    _one_line_error(_sft_cli(capsys, tmp_path, tmp_path / "none.json", "--set", "train.lrr=1"), "train.lrr", "did you mean 'train.lr'")
    _one_line_error(_sft_cli(capsys, tmp_path, _write_sft_data(tmp_path / "a.json", tmp_path / "missing.mp4")), "missing.mp4", "not found")
    corrupt = tmp_path / "corrupt.mp4"
    corrupt.write_bytes(b"\x00\x00\x00\x18ftypmp42" + bytes(range(256)) * 8)
    _one_line_error(_sft_cli(capsys, tmp_path, _write_sft_data(tmp_path / "b.json", corrupt)), "corrupt.mp4")
    empty_dir = tmp_path / "frames"
    empty_dir.mkdir()
    _one_line_error(_sft_cli(capsys, tmp_path, _write_sft_data(tmp_path / "c.json", empty_dir)), "frames", "no frame images")
    no_conv = tmp_path / "d.jsonl"
    no_conv.write_text(json.dumps({"id": "x", "video": "v.mp4"}) + "\n")
    _one_line_error(_sft_cli(capsys, tmp_path, no_conv), "d.jsonl:1", "conversations")


@pytest.mark.e2e
def test_killed_sft_process_resumes(tiny_bench, tmp_path):
    """A real SIGKILL mid-run, then the same command: it resumes from the last checkpoint and finishes."""
    import signal
    import time

    run_dir = tmp_path / "run"
    args = ["train-sft", "--config", TINY]
    # 54 steps, a checkpoint every 2. Kill at the first checkpoint seen, whichever it is: only the
    # newest two are kept, so waiting for one step's folder can miss it and outwait a fast run.
    for o in sft_overrides(tiny_bench, run_dir, **{"train.save_every": "2", "curriculum.epochs_per_stage": "6"}):
        args += ["--set", o]
    proc = subprocess.Popen([sys.executable, "-m", "vlmalign.cli", *args], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 240
    while proc.poll() is None and time.time() < deadline and not list((run_dir / "checkpoints").glob("step-*")):
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (run_dir / "final").exists()
    res = run_cli(*args)
    assert res.returncode == 0, res.stderr
    assert "resuming from" in res.stdout
    assert (run_dir / "final" / "model.json").is_file()
