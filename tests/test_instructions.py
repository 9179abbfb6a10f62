"""`vlmalign make-instructions`: the Q/A reply parser, and captions -> instruction data end to end
against a local OpenAI-compatible server with canned replies."""

import json
from pathlib import Path

import pytest

from tests import judge_server
from tests.judge_server import GARBAGE, FakeJudgeServer
from vlmalign.cli import main
from vlmalign.config import InstructionsConfig, config_from_dict, load_config
from vlmalign.data.formats import read_instructions
from vlmalign.feedback import instructions
from vlmalign.feedback.instructions import parse_qa_pairs

REPO = Path(__file__).resolve().parents[1]


# ----------------------------------------------------------------------------------------- parser


def test_parser_reads_plain_pairs_with_extra_whitespace():
    reply = "\n  Q:   What colour is the square?  \nA:  Red.\n\n\nQ: How many objects?\n   A: Two.   \nQ: Where does it go?\nA: Left.\n"
    assert parse_qa_pairs(reply, 3) == [("What colour is the square?", "Red."), ("How many objects?", "Two."),
                                        ("Where does it go?", "Left.")]


def test_parser_reads_numbering_markdown_and_long_answers():
    reply = (
        "Here are the pairs:\n"
        "1. **Q1:** What moves first?\n"
        "   **A1:** The red circle,\n"
        "   then the square.\n"
        "2) **Question 2:** Which way?\n"
        "**Answer 2:** Up.\n"
        "- q: Anything else?\n"
        "- a: No.\n"
    )
    assert parse_qa_pairs(reply, 3) == [("What moves first?", "The red circle, then the square."),
                                        ("Which way?", "Up."), ("Anything else?", "No.")]
    # More pairs than asked: the first ones are kept.
    assert parse_qa_pairs(reply, 2) == [("What moves first?", "The red circle, then the square."), ("Which way?", "Up.")]


def test_parser_does_not_take_sentences_for_labels():
    # "A large ..." starts with the article, not an answer label.
    assert parse_qa_pairs("Q: What is there?\nA: A large square.\nA large circle too.", 1) == [
        ("What is there?", "A large square. A large circle too.")]


@pytest.mark.parametrize("reply", [
    "Q: What colour?\nQ: How many?\nA: Two.\nQ: Where?\nA: Left.",  # the first question has no answer
    "Q: What colour?\nA: Red.\nQ: How many?\nA: Two.\nQ: Where?",  # the last one has none
    "Q: What colour?\nA:\nQ: How many?\nA: Two.\nQ: Where?\nA: Left.",  # an empty answer
    "A: Red.\nQ: How many?\nA: Two.\nQ: Where?\nA: Left.",  # an answer without a question
    GARBAGE,
    "",
    None,
])
def test_parser_fails_when_fewer_complete_pairs_than_asked(reply):
    assert parse_qa_pairs(reply, 3) is None


# ------------------------------------------------------------------------------------ end to end

CAPTIONS = {
    "vid_00000": "A red square moves left.",
    "vid_00001": "A blue circle moves up, then a green square appears.",
    "vid_00002": "Two objects stay still.",
    "vid_00003": "A green circle moves right.",
}


def _canned(prompt: str) -> str:
    """Three numbered pairs in markdown, except one caption gets garbage and one only two pairs."""
    if "Two objects stay still." in prompt:
        return GARBAGE
    if "A green circle" in prompt:
        return "Q: What moves?\nA: A green circle.\nQ: Which way?\nA: Right."
    assert "exactly 3 question-answer pairs" in prompt and "<video>" not in prompt
    return "\n".join(f"{k}. **Q:** Question {k}?\n**A:** Answer {k}." for k in (1, 2, 3))


def _cfg(tmp_path, server, **kw) -> InstructionsConfig:
    captions = tmp_path / "captions.json"
    captions.write_text(json.dumps(CAPTIONS))
    data = {
        "run": {"dir": str(tmp_path / "run"), "progress": False},
        "captions": str(captions),
        "judge": {"backend": "openai", "model": "writer", "base_url": server.url, "timeout": 10.0,
                  "api_key_env": "VLMALIGN_TEST_INSTRUCTIONS_KEY"},
        **kw,
    }
    return config_from_dict(InstructionsConfig, data)


def test_make_instructions_end_to_end_and_rerun_asks_nothing(tmp_path, monkeypatch, capsys):
    monkeypatch.delenv("VLMALIGN_TEST_INSTRUCTIONS_KEY", raising=False)  # localhost needs no key
    monkeypatch.setattr(judge_server, "judge_reply", _canned)
    with FakeJudgeServer() as server:
        cfg = _cfg(tmp_path, server, video_root="videos")
        path = instructions.run(cfg)
        assert server.requests == 4
        out = capsys.readouterr().out
        assert "pairs written 6" in out and "parse failures 2" in out

        stats = json.loads((tmp_path / "run" / "stats.json").read_text())
        assert {k: stats[k] for k in ("captions", "pairs", "parse_failures", "failed_calls", "calls")} == {
            "captions": 4, "pairs": 6, "parse_failures": 2, "failed_calls": 0, "calls": 4}
        records = json.loads(path.read_text())
        assert records[0] == {"id": "vid_00000_0", "video": "videos/vid_00000.mp4", "conversations": [
            {"from": "human", "value": "<video>\nQuestion 1?"}, {"from": "gpt", "value": "Answer 1."}]}
        samples = read_instructions(path)
        assert [s.id for s in samples] == [f"vid_0000{v}_{k}" for v in (0, 1) for k in range(3)]
        assert samples[4].video == str(tmp_path / "run" / "videos" / "vid_00001.mp4")
        assert samples[4].turns[0].text.replace("<video>", "").strip() == "Question 2?"

        again = instructions.run(cfg)  # everything is cached: no request reaches the server
        assert server.requests == 4
        assert again.read_text() == path.read_text()
        stats = json.loads((tmp_path / "run" / "stats.json").read_text())
        assert (stats["calls"], stats["cache_hits"], stats["pairs"]) == (0, 4, 6)


def test_limit_and_videos_without_root(tmp_path, monkeypatch):
    monkeypatch.setattr(judge_server, "judge_reply", _canned)
    with FakeJudgeServer() as server:
        path, stats = instructions.make_instructions(_cfg(tmp_path, server, limit=1), progress=False)
    assert (stats["captions"], stats["pairs"], server.requests) == (1, 3, 1)
    assert {r["video"] for r in json.loads(path.read_text())} == {"vid_00000.mp4"}


def test_oracle_backend_is_a_config_error(tmp_path, capsys):
    code = main(["make-instructions", "--config", str(REPO / "configs/tiny/instructions.yaml"),
                 "--set", "judge.backend=oracle", "--set", f"run.dir={tmp_path / 'run'}"])
    err = capsys.readouterr().err
    assert code == 2 and "judge.backend" in err and "oracle" in err
    assert not (tmp_path / "run").exists()


def test_tiny_config_loads():
    cfg = load_config(InstructionsConfig, REPO / "configs/tiny/instructions.yaml")
    assert (cfg.judge.backend, cfg.pairs_per_caption, cfg.judge.max_new_tokens) == ("openai", 3, 512)
