"""scripts/probe_perception.py: the reader learns what the visual tokens carry (the grid pooling it
uses is the model's, tested in test_model.py)."""

import importlib.util
import json
from pathlib import Path

import pytest

from tests.conftest import tiny_model_overrides
from vlmalign.config import SFTConfig, load_config
from vlmalign.model.policy import build_model

REPO = Path(__file__).resolve().parents[1]
_spec = importlib.util.spec_from_file_location("probe_perception", REPO / "scripts" / "probe_perception.py")
probe = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(probe)


@pytest.mark.parametrize("reader", ["encoder", "llm"])
def test_the_reader_learns_colour_from_a_random_towers_tokens(reader, word_corpus, tmp_path, capsys):
    cfg = load_config(SFTConfig, REPO / "configs" / "tiny" / "sft.yaml", tiny_model_overrides(word_corpus)).model
    build_model(cfg).save_pretrained(tmp_path / "model")
    probe.main(["--model", str(tmp_path / "model"), "--videos", "128", "--test-videos", "64", "--steps", "150",
                "--tasks", "colour", "--reader", reader])
    (line,) = [json.loads(x) for x in capsys.readouterr().out.splitlines() if x.startswith("{")]
    assert (line["task"], line["reader"], line["chance"]) == ("colour", reader, 25.0)
    assert line["test"] >= 80, line  # colour is in every patch: a reader that learns finds it


def test_an_unknown_task_is_refused_in_one_line(capsys):
    with pytest.raises(SystemExit):
        probe.main(["--model", "unused", "--tasks", "colour,size"])
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert "unknown task 'size'" in err and "colour, shape, direction" in err
