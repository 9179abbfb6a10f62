"""The rule-based oracle judge of the synthetic benchmark."""

import json

import numpy as np
import pytest

from vlmalign.data import synthetic as syn
from vlmalign.errors import DataError, VlmalignError
from vlmalign.feedback.oracle import (
    Oracle,
    OracleVerdict,
    consistency_score,
    description_claims,
    extract_values,
    generative_scores,
)

DESCRIBE = "Describe what happens in the video."


@pytest.fixture(scope="module")
def bench(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench")
    syn.generate_benchmark(out, num_videos=24, seed=3, progress=False)
    return out


@pytest.fixture(scope="module")
def oracle(bench):
    return Oracle.from_dir(bench)


def _obj(i, colour, shape, direction, start=0, end=16):
    return {"index": i, "colour": colour, "shape": shape, "direction": direction, "start_frame": start,
            "end_frame": end, "radius": 10.0, "speed": 1.5, "rgb": list(syn.COLOURS[colour]),
            "positions": [[32.0, 32.0] if start <= t < end else None for t in range(16)]}


@pytest.fixture(scope="module")
def hand():
    """vid_00001: a red square (frames 0-9, moves left), then a blue circle (from 4, moves down).
    vid_00002: one green triangle moving up the whole time."""
    metas = [
        {"id": "vid_00001", "num_frames": 16, "size": 64,
         "objects": [_obj(0, "red", "square", "left", 0, 10), _obj(1, "blue", "circle", "down", 4, 16)]},
        {"id": "vid_00002", "num_frames": 16, "size": 64, "objects": [_obj(0, "green", "triangle", "up")]},
    ]
    return Oracle(metas)


def _records(bench, name):
    return json.loads((bench / name).read_text())


def test_ground_truth_answers_score_5(bench, oracle):
    n = 0
    for name in ("sft_easy.json", "sft_hard.json"):
        for r in _records(bench, name):
            v = oracle.verdict(r["video"], r["conversations"][0]["value"], r["conversations"][1]["value"])
            assert (v.score, v.correct, v.qtype) == (5, True, r["question_type"]), (r, v)
            n += 1
    for name in ("qa_val.json", "qa_test.json"):
        for r in _records(bench, name):
            v = oracle.verdict(r["video_name"], r["question"], r["answer"])
            assert (v.score, v.correct, v.qtype) == (5, True, r["question_type"]), (r, v)
            n += 1
    for name, q in (("generative_test.json", "Q"), ("consistency_test.json", "Q2")):
        for r in _records(bench, name):
            assert oracle.score(r["video_name"], r[q], r["A"]) == 5
    captions = _records(bench, "captions.json")
    for vid, entry in captions.items():
        assert oracle.score(vid, DESCRIBE, entry["caption"]) == 5, entry["caption"]
    assert n > 100


def test_wrong_and_hedged_short_answers(bench, oracle):
    lines = (bench / "metadata.jsonl").read_text().splitlines()
    metas = {m["video"]: m for m in map(json.loads, lines)}
    rng = np.random.default_rng(0)
    for r in _records(bench, "qa_test.json"):
        meta = metas[r["video_name"]]
        parsed = syn.parse_question(r["question"])
        truth = syn.true_value(meta, parsed)
        wrong = syn.wrong_value(parsed.qtype, truth, meta["objects"], rng)
        assert wrong != truth
        subject = syn.subject_of(meta["objects"], parsed)
        v = oracle.verdict(r["video_name"], r["question"], syn.short_answer(parsed.qtype, wrong, subject, rng))
        assert (v.score, v.correct) == (1, False), v
        v = oracle.verdict(r["video_name"], r["question"], syn.hedged_answer(parsed.qtype, [wrong, truth]))
        assert (v.score, v.correct) == (2, False), v


@pytest.mark.parametrize("question, answer, score", [
    ("Which way does the green triangle move?", "Up.", 5),
    ("Which way does the green triangle move?", "It moves upward.", 5),
    ("Which way does the green triangle move?", "upwards", 5),
    ("Which way does the green triangle move?", "It goes towards the top.", 5),
    ("Which way does the green triangle move?", "It rises.", 5),
    ("Which way does the green triangle move?", "It starts at the bottom-left and moves up.", 5),
    ("Which way does the green triangle move?", "It comes from the left side and moves up.", 5),
    ("Which way does the green triangle move?", "It does not move down; it moves up.", 5),
    ("Which way does the green triangle move?", "Up or down.", 2),
    ("Which way does the green triangle move?", "Leftward.", 1),
    ("Which way does the green triangle move?", "It moves to the left.", 1),
    ("Which way does the green triangle move?", "I don't know.", 1),
    ("What colour is the triangle?", "Green.", 5),
    ("What colour is the triangle?", "It is GREEN", 5),
    ("What color is the triangle", "greenish", 5),
    ("What colour is the triangle?", "It is not red, it is green.", 5),
    ("What colour is the triangle?", "Green or blue.", 2),
    ("What colour is the triangle?", "Blue.", 1),
    ("What colour is the triangle?", "", 1),
    ("What shape is the green object?", "A triangle.", 5),
    ("What shape is the green object?", "It is triangular.", 5),
    ("What shape is the green object?", "A circle.", 1),
    ("What shape is the green object?", "A square or a triangle.", 2),
    ("How many objects appear in the video?", "One.", 5),
    ("How many objects appear in the video?", "1", 5),
    ("How many objects appear in the video?", "A single object.", 5),
    ("How many objects appear in the video?", "Two.", 1),
    ("How many objects appear in the video?", "One or two.", 2),
])
def test_short_answer_rules(hand, question, answer, score):
    v = hand.verdict("vid_00002", question, answer)
    assert isinstance(v, OracleVerdict)
    assert v.score == score, v
    assert v.correct == (score == 5)
    assert v.reason


@pytest.mark.parametrize("question, answer, score", [
    # vid_00001: a red square moving left, a blue circle moving down
    ("What colour is the circle?", "The circle is blue.", 5),
    ("What colour is the circle?", "Blue.", 5),
    ("What colour is the circle?", "The square is blue.", 1),  # blue, but said of the square
    ("What colour is the square?", "The circle is red.", 1),
    ("What shape is the blue object?", "The blue object is a circle.", 5),
    ("What shape is the blue object?", "The red object is a circle.", 1),
    ("Which way does the red square move?", "The red square moves left.", 5),
    ("Which way does the red square move?", "The blue square moves left.", 1),
    ("Which way does the red square move?", "The red circle moves left.", 1),
    ("Which way does the red square move?", "It moves left.", 5),
])
def test_short_answers_bind_the_value_to_the_asked_object(hand, question, answer, score):
    v = hand.verdict("vid_00001", question, answer)
    assert v.score == score, v
    if score == 1:
        assert "not the" in v.reason


def test_count_words_and_digits(hand):
    q = "How many objects appear in the video?"
    for answer in ("Two.", "2", "There are two objects.", "2 objects", "Two objects, one of them moving left."):
        assert hand.score("vid_00001", q, answer) == 5, answer
    assert hand.score("vid_00001", q, "Three.") == 1
    assert extract_values("count", "ten or 11") == [10, 11]


def test_describe_scores(hand):
    true = syn.describe(hand.metadata("vid_00001"))
    assert "red square" in true and "blue circle" in true
    assert hand.verdict("vid_00001", DESCRIBE, true).score == 5
    freeform = "A red square moves left and then vanishes. Meanwhile a blue circle shows up and goes down."
    assert hand.score("vid_00001", DESCRIBE, freeform) == 5
    wrong_colour = true.replace("blue circle", "green circle")
    wrong_direction = "A red square moves left and disappears. Then a blue circle appears and moves up."
    missing = "A red square moves left."
    reversed_order = "A blue circle moves down. A red square moves left and disappears."
    invented = true + " Then a yellow cross appears and moves right."
    false_exit = true + " Then the blue circle disappears."
    for answer in (wrong_colour, wrong_direction, missing, reversed_order, invented, false_exit):
        v = hand.verdict("vid_00001", DESCRIBE, answer)
        assert v.score < 5 and v.qtype == "describe", (answer, v)
    assert hand.score("vid_00001", DESCRIBE, wrong_colour) <= 3
    assert hand.score("vid_00001", DESCRIBE, missing) < hand.score("vid_00001", DESCRIBE, wrong_direction)
    assert "yellow cross" in hand.verdict("vid_00001", DESCRIBE, invented).reason
    for empty in ("", "Nothing happens.", "There is no red square."):
        v = hand.verdict("vid_00001", DESCRIBE, empty)
        assert (v.score, v.correct) == (1, False)
    assert hand.verdict("vid_00002", DESCRIBE, "A green triangle moves up.").score == 5


def test_generative_criteria_hand_computed(hand):
    """vid_00001's facts: 2 objects, 2 directions, the red square leaving, red before blue (6)."""
    meta = hand.metadata("vid_00001")
    answer = "A red square moves left and disappears. Then a blue circle moves up. A green cross moves right."
    red, blue, cross = ("red", "square"), ("blue", "circle"), ("green", "cross")
    assert description_claims(meta, answer) == {
        ("object", red): True, ("direction", red, "left"): True, ("disappears", red): True,
        ("object", blue): True, ("direction", blue, "up"): False,
        ("object", cross): False, ("direction", cross, "right"): False, ("before", red, blue): True}
    scores = generative_scores(meta, answer)
    assert scores["correctness"] == pytest.approx(5 * 5 / 8)  # 5 of its 8 claims are true
    assert scores["detail"] == pytest.approx(5 * 5 / 6)  # all facts but the blue circle's direction
    assert scores["context"] == pytest.approx(5 * 2 / 3)  # {red, blue} of {red, blue, cross}
    assert scores["temporal"] == pytest.approx(5 * 3 / 4)  # directions 1/2, leaving 1/1, order 1/1
    other = "A red square moves left. A blue circle moves down."
    # 9 distinct claims (other adds the blue circle moving down); both make 4 true ones: the two
    # objects, the red square's direction and the order
    assert consistency_score(meta, answer, other) == pytest.approx(5 * 4 / 9)
    assert consistency_score(meta, other, other) == 5
    assert consistency_score(meta, "Nothing happens.", "Nothing.") == 0
    assert generative_scores(meta, "Nothing happens.") == {"correctness": 0, "detail": 0, "context": 0, "temporal": 0}


def test_true_descriptions_score_5_on_every_criterion(bench, oracle):
    for r in _records(bench, "generative_test.json"):
        meta = oracle.metadata(r["video_name"])
        assert generative_scores(meta, r["A"]) == {c: 5 for c in ("correctness", "detail", "context", "temporal")}, r
        assert consistency_score(meta, r["A"], syn.describe(meta)) == 5


def test_rank_and_compare(hand):
    q = "What colour is the triangle?"
    answers = ["Blue.", "It is green.", "Green or red.", "Green.", ""]
    # both correct answers share rank 0 whatever their lengths; hedging beats wrong; the two wrong
    # ones (score 1) share the last rank: each rank counts the answers that score higher
    assert hand.rank("vid_00002", q, answers) == [3, 0, 2, 0, 3]
    assert hand.rank("vid_00002", q, ["Blue.", "Pink."]) == [0, 0]
    assert hand.rank("vid_00002", q, []) == []
    assert hand.compare("vid_00002", q, "Green.", "Blue.") == 0
    assert hand.compare("vid_00002", q, "Blue.", "Green.") == 1
    # equal scores: no preference, whatever the lengths
    assert hand.compare("vid_00002", q, "It is green.", "Green.") is None
    assert hand.compare("vid_00002", q, "Green.", "Green.") is None
    assert hand.compare("vid_00002", q, "Blue.", "") is None
    true = syn.describe(hand.metadata("vid_00001"))
    assert hand.compare("vid_00001", DESCRIBE, true.replace("red", "yellow"), true) == 1


def test_video_lookup_by_id_relative_and_absolute_path(bench, oracle):
    q = "How many objects appear in the video?"
    meta = json.loads((bench / "metadata.jsonl").read_text().splitlines()[0])
    n = len(meta["objects"])
    for video in (meta["id"], meta["video"], str(bench / meta["video"])):
        assert oracle.score(video, q, str(n)) == 5
    with pytest.raises(VlmalignError, match="vid_99999"):
        oracle.verdict("videos/vid_99999.mp4", q, "1")


def test_unknown_or_inapplicable_question(hand):
    with pytest.raises(VlmalignError, match="What is the meaning of life"):
        hand.verdict("vid_00002", "What is the meaning of life?", "42")
    with pytest.raises(VlmalignError, match="What colour is the circle"):
        hand.verdict("vid_00002", "What colour is the circle?", "Red.")  # no circle in this video
    with pytest.raises(VlmalignError):
        hand.rank("vid_00002", "Who made this video?", ["a", "b"])


def test_from_dir_errors(tmp_path):
    with pytest.raises(DataError, match="metadata.jsonl"):
        Oracle.from_dir(tmp_path)
    (tmp_path / "metadata.jsonl").write_text('{"id": "vid_00000", "num_frames": 16, "objects": []}\n{oops\n')
    with pytest.raises(DataError, match="metadata.jsonl:2: invalid JSON"):
        Oracle.from_dir(tmp_path)
    (tmp_path / "metadata.jsonl").write_text('{"id": "vid_00000", "objects": []}\n')
    with pytest.raises(DataError, match="num_frames"):
        Oracle.from_dir(tmp_path)


def test_reference_answers(hand):
    q = "What colour is the triangle?"
    assert hand.score("vid_00002", q, hand.reference("vid_00002", q)) == 5
    assert hand.score("vid_00001", DESCRIBE, hand.reference("vid_00001", DESCRIBE)) == 5
