"""scripts/probe_perception.py: the reader learns what the visual tokens carry, and its grid pooling
keeps each frame's quadrants apart."""

import importlib.util
import json
from pathlib import Path

import pytest
import torch

from tests.conftest import tiny_model_overrides
from vlmalign.config import SFTConfig, load_config
from vlmalign.model.policy import build_model

REPO = Path(__file__).resolve().parents[1]
_spec = importlib.util.spec_from_file_location("probe_perception", REPO / "scripts" / "probe_perception.py")
probe = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(probe)


def test_grid_pooling_keeps_each_frames_quadrants_then_the_spatial_tokens():
    # 1 video, 2 frames, 4 x 4 patches, 1 feature: patch value = its index, + 100 in frame 1
    features = torch.arange(16.0).view(1, 1, 16, 1).repeat(1, 2, 1, 1)
    features[:, 1] += 100
    tokens = probe.pool(features, "grid2")[0, :, 0]
    # quadrants of the 4 x 4 grid (row-major patches): top-left {0,1,4,5} -> 2.5, top-right 4.5,
    # bottom-left 10.5, bottom-right 12.5; then each patch's mean over the 2 frames (index + 50)
    assert tokens.tolist() == [2.5, 4.5, 10.5, 12.5, 102.5, 104.5, 110.5, 112.5, *[i + 50.0 for i in range(16)]]
    assert torch.equal(probe.pool(features, "video_chatgpt")[0, :, 0],
                       torch.tensor([7.5, 107.5, *[i + 50.0 for i in range(16)]]))


def test_the_reader_learns_colour_from_a_random_towers_tokens(word_corpus, tmp_path, capsys):
    cfg = load_config(SFTConfig, REPO / "configs" / "tiny" / "sft.yaml", tiny_model_overrides(word_corpus)).model
    build_model(cfg).save_pretrained(tmp_path / "model")
    probe.main(["--model", str(tmp_path / "model"), "--videos", "128", "--test-videos", "64", "--steps", "150",
                "--tasks", "colour"])
    (line,) = [json.loads(x) for x in capsys.readouterr().out.splitlines() if x.startswith("{")]
    assert line["task"] == "colour" and line["chance"] == 25.0
    assert line["test"] >= 80, line  # colour is in every patch: a reader that learns finds it


def test_an_unknown_task_is_refused_in_one_line(capsys):
    with pytest.raises(SystemExit):
        probe.main(["--model", "unused", "--tasks", "colour,size"])
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert "unknown task 'size'" in err and "colour, shape, direction" in err
