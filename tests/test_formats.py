"""Tests for vlmalign.data.formats: every reader, its errors, and the JSONL writers."""

import json
import os
from pathlib import Path

import pytest

from vlmalign.data.formats import (
    GenerativeItem,
    InstructionSample,
    PreferencePair,
    QAItem,
    Turn,
    append_jsonl,
    iter_json_records,
    read_generative,
    read_instructions,
    read_json,
    read_preference_pairs,
    read_qa,
    resolve_video,
    write_json,
    write_jsonl,
)
from vlmalign.errors import DataError

LLAMAFACTORY_DEMO = (
    Path(__file__).resolve().parents[2] / "shared" / "fixtures" / "llamafactory" / "mllm_video_demo.json"
)


def jsonl(path: Path, *records) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    return path


def json_array(path: Path, *records) -> Path:
    path.write_text(json.dumps(list(records), indent=2), encoding="utf-8")
    return path


def llava(**extra):
    record = {
        "id": "vid_1",
        "video": "clips/a.mp4",
        "conversations": [
            {"from": "human", "value": "<video>\nWhat happens?"},
            {"from": "gpt", "value": "A dog runs."},
        ],
    }
    record.update(extra)
    return record


def data_error(fn, *args, **kwargs) -> str:
    with pytest.raises(DataError) as info:
        fn(*args, **kwargs)
    message = str(info.value)
    assert "\n" not in message
    return message


# ----------------------------------------------------------------------------- instructions


def test_llava_instruction(tmp_path):
    path = jsonl(tmp_path / "train.jsonl", llava())
    assert read_instructions(path) == [
        InstructionSample(
            id="vid_1",
            video=str(tmp_path / "clips" / "a.mp4"),
            turns=[Turn("user", "<video>\nWhat happens?"), Turn("assistant", "A dog runs.")],
            source=f"{path}:1",
        )
    ]


def test_llava_frames_image_token_user_roles_and_video_root(tmp_path):
    record = {
        "id": 7,
        "images": ["f/0.jpg", "/abs/1.jpg"],
        "conversations": [
            {"from": "user", "value": "Describe <image> please"},
            {"from": "assistant", "value": "Frames."},
            {"from": "human", "value": "More?"},
            {"from": "gpt", "value": "No."},
        ],
    }
    [sample] = read_instructions(jsonl(tmp_path / "d.jsonl", record), video_root=tmp_path / "root")
    assert sample.id == "7"
    assert sample.video == [str(tmp_path / "root" / "f" / "0.jpg"), "/abs/1.jpg"]
    assert [t.text for t in sample.turns] == ["Describe <video> please", "Frames.", "More?", "No."]


def test_placeholder_inserted_when_absent(tmp_path):
    record = llava(conversations=[{"from": "human", "value": "What?"}, {"from": "gpt", "value": "X."}])
    [sample] = read_instructions(jsonl(tmp_path / "d.jsonl", record))
    assert sample.turns[0].text == "<video>\nWhat?"


def test_text_only_and_missing_id(tmp_path):
    record = {"conversations": [{"from": "human", "value": "Hi"}, {"from": "gpt", "value": "Hello"}]}
    path = jsonl(tmp_path / "chat.jsonl", llava(), record)
    assert read_instructions(path)[1] == InstructionSample(
        id="chat-2", video=None, turns=[Turn("user", "Hi"), Turn("assistant", "Hello")], source=f"{path}:2"
    )


def test_llamafactory_instruction_drops_system(tmp_path):
    record = {
        "messages": [
            {"role": "system", "content": "Be brief."},
            {"role": "user", "content": "What is shown?"},
            {"role": "assistant", "content": "A cat."},
        ],
        "videos": ["v/cat.mp4"],
    }
    path = json_array(tmp_path / "lf.json", record)
    assert read_instructions(path) == [
        InstructionSample(
            id="lf-2",
            video=str(tmp_path / "v" / "cat.mp4"),
            turns=[Turn("user", "<video>\nWhat is shown?"), Turn("assistant", "A cat.")],
            source=f"{path}:2",
        )
    ]


def test_llamafactory_demo_fixture():
    if not LLAMAFACTORY_DEMO.exists():
        pytest.skip(f"LLaMA-Factory fixture not found at {LLAMAFACTORY_DEMO}")
    samples = read_instructions(LLAMAFACTORY_DEMO)
    assert len(samples) == 3
    assert all(os.path.exists(s.video) for s in samples)
    # Its placeholder has no newline after it; it is kept as written.
    assert samples[0].turns[0].text == "<video>Why is this video funny?"


# ----------------------------------------------------------------------------- preference pairs


def test_llava_hound_pair_with_provenance(tmp_path):
    record = {
        "id": "q1",
        "video": "v_abc",
        "prompt": "What is he doing?",
        "chosen": "Cooking.",
        "rejected": "Dancing.",
        "chosen_score": 5,
        "rejected_score": 2.0,
        "judge": "gpt-4o-2024-08-06",
        "prompt_version": "v2",
    }
    path = jsonl(tmp_path / "dpo.jsonl", record)
    assert read_preference_pairs(path, video_root="/videos") == [
        PreferencePair(
            id="q1",
            video="/videos/v_abc",
            prompt="<video>\nWhat is he doing?",
            chosen="Cooking.",
            rejected="Dancing.",
            chosen_score=5.0,
            rejected_score=2.0,
            meta={"judge": "gpt-4o-2024-08-06", "prompt_version": "v2"},
            source=f"{path}:1",
        )
    ]


def test_vlm_rlaif_pair(tmp_path):
    record = llava(
        conversations=[{"from": "human", "value": "<image>\nWhat?"}, {"from": "gpt", "value": ""}],
        output_1={"value": "Worse."},
        output_2={"value": "Better."},
        preference=2,
        split="train",
    )
    [pair] = read_preference_pairs(jsonl(tmp_path / "rm.jsonl", record))
    assert (pair.prompt, pair.chosen, pair.rejected) == ("<video>\nWhat?", "Better.", "Worse.")
    assert pair.video == str(tmp_path / "clips" / "a.mp4")
    assert pair.meta == {"split": "train"}


def test_llamafactory_pair(tmp_path):
    record = {
        "messages": [{"role": "user", "content": "<video>Why?"}],
        "chosen": {"role": "assistant", "content": "Because."},
        "rejected": {"role": "assistant", "content": "No idea."},
        "videos": ["x.mp4"],
    }
    path = jsonl(tmp_path / "lfdpo.jsonl", record)
    assert read_preference_pairs(path) == [
        PreferencePair(
            id="lfdpo-1",
            video=str(tmp_path / "x.mp4"),
            prompt="<video>Why?",
            chosen="Because.",
            rejected="No idea.",
            source=f"{path}:1",
        )
    ]


@pytest.mark.parametrize("value", [0, 3, "1", True])
def test_bad_preference_value(tmp_path, value):
    record = llava(output_1={"value": "a"}, output_2={"value": "b"}, preference=value)
    path = jsonl(tmp_path / "rm.jsonl", record)
    message = data_error(read_preference_pairs, path)
    assert message.startswith(f"{path}:1: record 'vid_1' field 'preference'")


def test_unknown_preference_format(tmp_path):
    path = jsonl(tmp_path / "p.jsonl", {"id": "z", "question": "?"})
    assert "matches no preference format" in data_error(read_preference_pairs, path)


# ----------------------------------------------------------------------------- benchmarks


def test_qa_probes_extensions(tmp_path):
    (tmp_path / "vids").mkdir()
    (tmp_path / "vids" / "vid2.avi").touch()
    (tmp_path / "vids" / "vid3").mkdir()  # a frame folder
    records = [
        {"video_name": "vid1", "question_id": 11, "question": "Who?", "answer": "man", "question_type": "what"},
        {"video_id": "vid2", "id": "q2", "question": "How many?", "answer": 3},
        {"video": "vid3", "question": "Where?", "answer": "park"},
        {"video_name": "vid4.webm", "question": "When?", "answer": "now"},
    ]
    path = json_array(tmp_path / "qa.json", *records)
    root = tmp_path / "vids"
    assert read_qa(path, video_root=root) == [
        QAItem("11", str(root / "vid1"), "Who?", "man", "what", f"{path}:2"),
        QAItem("q2", str(root / "vid2.avi"), "How many?", "3", None, f"{path}:9"),
        QAItem("vid3-2", str(root / "vid3"), "Where?", "park", None, f"{path}:15"),
        QAItem("vid4.webm-3", str(root / "vid4.webm"), "When?", "now", None, f"{path}:20"),
    ]
    # A fixed extension is appended without looking at the disk.
    assert read_qa(path, video_root=root, video_ext="mp4")[1].video == str(root / "vid2.mp4")
    assert read_qa(path, video_root=root, video_ext=None)[1].video == str(root / "vid2")


def test_generative_and_consistency(tmp_path):
    path = jsonl(
        tmp_path / "gen.jsonl",
        {"video_name": "v_1", "Q": "Describe it.", "A": "A park."},
        {"video_name": "v_2", "Q1": "What color?", "Q2": "Which color?", "A": "Red."},
    )
    assert read_generative(path, video_ext=".mp4") == [
        GenerativeItem("v_1-0", str(tmp_path / "v_1.mp4"), "Describe it.", "A park.", None, f"{path}:1"),
        GenerativeItem("v_2-1", str(tmp_path / "v_2.mp4"), "What color?", "Red.", "Which color?", f"{path}:2"),
    ]


def test_qa_missing_video_name(tmp_path):
    path = jsonl(tmp_path / "qa.jsonl", {"question_id": "q", "question": "?", "answer": "a"})
    assert "missing field 'video_name'" in data_error(read_qa, path)


def test_resolve_video_keeps_absolute_paths(tmp_path):
    assert resolve_video("/abs/v.mp4", tmp_path / "d.json", video_root="/root") == "/abs/v.mp4"
    assert resolve_video("v.mp4", tmp_path / "d.json") == str(tmp_path / "v.mp4")


# ----------------------------------------------------------------------------- record reading and errors


def test_json_array_line_numbers(tmp_path):
    path = tmp_path / "d.json"
    path.write_text('[\n  {"a": 1},\n\n  {"b": 2,\n   "c": 3}, {"d": 4}\n]\n')
    assert list(iter_json_records(path)) == [(2, {"a": 1}), (4, {"b": 2, "c": 3}), (5, {"d": 4})]


def test_json_array_record_on_line_9_reports_line_9(tmp_path):
    path = tmp_path / "train.json"
    path.write_text(
        "[\n"
        '  {"id": "vid_1",\n'
        '   "video": "a.mp4",\n'
        '   "conversations": [\n'
        '     {"from": "human", "value": "What?"},\n'
        '     {"from": "gpt", "value": "A."}\n'
        "   ]\n"
        "  },\n"
        '  {"id": "vid_3",\n'  # line 9
        '   "video": "b.mp4"}\n'
        "]\n"
    )
    assert data_error(read_instructions, path) == (
        f"{path}:9: record 'vid_3' is missing field 'conversations' (or 'messages' for LLaMA-Factory data)"
    )


def test_jsonl_skips_blank_lines_and_keeps_physical_lines(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_text('{"a": 1}\n\n   \n{"b": 2}\n')
    assert list(iter_json_records(path)) == [(1, {"a": 1}), (4, {"b": 2})]


def test_missing_file(tmp_path):
    path = tmp_path / "nope.jsonl"
    assert data_error(read_instructions, path) == f"{path}: file not found"


@pytest.mark.parametrize(
    "name, text, line",
    [
        ("d.jsonl", '{"a": 1}\n{"a": 2,}\n', 2),
        ("d.json", '[\n  {"a": 1},\n  {"a": \n}\n]', 4),
        ("d.json", '[\n  {"a": 1}\n  {"a": 2}\n]', 3),
        ("d.json", '{"a": 1}', 1),
    ],
)
def test_invalid_json_reports_line(tmp_path, name, text, line):
    path = tmp_path / name
    path.write_text(text)
    assert data_error(lambda: list(iter_json_records(path))).startswith(f"{path}:{line}: ")


def test_record_must_be_object(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_text('[1, 2]\n')
    assert "expected a record" in data_error(lambda: list(iter_json_records(path)))


def test_missing_conversations_message(tmp_path):
    bad = llava()
    del bad["conversations"]
    path = jsonl(tmp_path / "train.jsonl", llava(), llava(), bad)
    message = data_error(read_instructions, path)
    assert message.startswith(f"{path}:3: record 'vid_1' is missing field 'conversations'")


@pytest.mark.parametrize(
    "conversations, video, expected",
    [
        (  # two placeholders
            [{"from": "human", "value": "<video>\n<image> what?"}, {"from": "gpt", "value": "A."}],
            "a.mp4",
            "has 2 '<video>' placeholders",
        ),
        (  # placeholder outside the first user turn
            [{"from": "human", "value": "What?"}, {"from": "gpt", "value": "A."},
             {"from": "human", "value": "<video> and?"}, {"from": "gpt", "value": "B."}],
            "a.mp4",
            "field 'conversations[2]' holds the '<video>' placeholder",
        ),
        (  # placeholder with no video
            [{"from": "human", "value": "<video>\nWhat?"}, {"from": "gpt", "value": "A."}],
            None,
            "field 'conversations[0]' has a '<video>' placeholder but the record has no video",
        ),
        (  # not alternating
            [{"from": "human", "value": "What?"}, {"from": "human", "value": "And?"}],
            "a.mp4",
            "field 'conversations[1]' is a 'user' turn where 'assistant' was expected",
        ),
        (  # starts with the assistant
            [{"from": "gpt", "value": "A."}],
            "a.mp4",
            "field 'conversations[0]' is a 'assistant' turn where 'user' was expected",
        ),
        (  # ends with a question
            [{"from": "human", "value": "What?"}],
            "a.mp4",
            "field 'conversations[0]' is the last turn but not an assistant answer",
        ),
        (  # empty answer
            [{"from": "human", "value": "What?"}, {"from": "gpt", "value": "  "}],
            "a.mp4",
            "field 'conversations[1]' is empty",
        ),
        (  # unknown role
            [{"from": "bot", "value": "What?"}],
            "a.mp4",
            "field 'conversations[0]' must be an object with 'from'",
        ),
    ],
)
def test_instruction_errors(tmp_path, conversations, video, expected):
    path = jsonl(tmp_path / "d.jsonl", llava(video=video, conversations=conversations))
    assert data_error(read_instructions, path).startswith(f"{path}:1: record 'vid_1' {expected}")


def test_llamafactory_two_videos(tmp_path):
    record = {
        "messages": [{"role": "user", "content": "Q"}, {"role": "assistant", "content": "A"}],
        "videos": ["a.mp4", "b.mp4"],
    }
    path = jsonl(tmp_path / "d.jsonl", record)
    assert "field 'videos' has 2 videos" in data_error(read_instructions, path)


def test_empty_chosen(tmp_path):
    record = {"id": "q", "video": "v", "prompt": "Q?", "chosen": "", "rejected": "B"}
    path = jsonl(tmp_path / "d.jsonl", record)
    assert data_error(read_preference_pairs, path) == f"{path}:1: record 'q' field 'chosen' is empty"


# ----------------------------------------------------------------------------- writers


def test_write_jsonl_round_trip_and_atomic(tmp_path):
    path = tmp_path / "out" / "deep" / "prefs.jsonl"
    records = [{"id": "1", "text": "café ✓"}, {"id": "2", "scores": [1, 2.5], "meta": None}]
    write_jsonl(path, records)
    assert "café ✓" in path.read_text(encoding="utf-8")  # ensure_ascii=False
    assert [r for _, r in iter_json_records(path)] == records
    assert os.listdir(path.parent) == ["prefs.jsonl"]

    def failing():
        yield {"id": "3"}
        raise RuntimeError("interrupted")

    with pytest.raises(RuntimeError):
        write_jsonl(path, failing())
    # The old file is untouched and no temp file is left behind.
    assert [r for _, r in iter_json_records(path)] == records
    assert os.listdir(path.parent) == ["prefs.jsonl"]


def test_write_json_is_whole_or_absent_even_with_writers_side_by_side(tmp_path):
    """The gym's seeds write the same shared file side by side: each write lands whole."""
    import threading

    path = tmp_path / "bench" / "rows.json"
    rows = [{"id": str(i), "text": "é" * 50} for i in range(2000)]
    threads = [threading.Thread(target=write_json, args=(path, rows)) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert json.loads(path.read_text(encoding="utf-8")) == rows and os.listdir(path.parent) == ["rows.json"]
    write_json(path, {"a": 1}, indent=1)
    assert path.read_text(encoding="utf-8") == '{\n "a": 1\n}\n'
    with pytest.raises(TypeError):
        write_json(path, {"a": object()})  # fails mid-write: the old file stays, no temp file is left
    assert json.loads(path.read_text(encoding="utf-8")) == {"a": 1} and os.listdir(path.parent) == ["rows.json"]


def test_read_json_round_trips_and_names_the_file_in_one_line(tmp_path):
    """A truncated summary (a run killed while an old version wrote it) or a missing report is
    one line naming the file, not a JSONDecodeError's traceback from deep inside the gym."""
    path = tmp_path / "run" / "summary.json"
    write_json(path, {"accuracy": 0.5, "name": "é"}, indent=2)
    assert read_json(path) == {"accuracy": 0.5, "name": "é"}
    path.write_text('{\n  "accuracy": 0.5,\n  "name"', encoding="utf-8")
    with pytest.raises(DataError, match=r"summary\.json:3: invalid JSON") as e:
        read_json(path)
    assert "\n" not in str(e.value)
    with pytest.raises(DataError, match=r"report\.json: file not found"):
        read_json(tmp_path / "run" / "report.json")
    path.write_bytes(b'{"name": "\xff"}')
    with pytest.raises(DataError, match=r"summary\.json: not UTF-8 text"):
        read_json(path)


def test_append_jsonl(tmp_path):
    path = tmp_path / "new" / "judgments.jsonl"
    append_jsonl(path, {"id": "a", "score": 4})
    append_jsonl(path, {"id": "b", "text": "ü"})
    with pytest.raises(TypeError):
        append_jsonl(path, {"id": "c", "bad": object()})
    assert path.read_text(encoding="utf-8") == '{"id": "a", "score": 4}\n{"id": "b", "text": "ü"}\n'


def test_hub_data_file_is_read_from_the_local_hub_cache(tmp_path, monkeypatch):
    """`hf://datasets/ORG/NAME/PATH` resolves through huggingface_hub; tests run offline, so the
    file is put in a hub cache the way a download leaves it, and an uncached one is a clear error."""
    import huggingface_hub.constants

    from vlmalign.data import formats
    from vlmalign.eval.retrieval import read_retrieval

    commit = "a" * 40
    repo = tmp_path / "hub" / "datasets--someone--video-sft"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(commit)
    data = repo / "snapshots" / commit / "train" / "sft.jsonl"
    data.parent.mkdir(parents=True)
    data.write_text(json.dumps({"id": "a", "video": "clips/a.mp4", "conversations": [
        {"from": "human", "value": "<video>\nWhat happens?"}, {"from": "gpt", "value": "A dog runs."}]}) + "\n")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    formats._hub_file.cache_clear()

    (data.parent / "test.csv").write_text("video_id,sentence\nvideo1,a dog runs\n")
    (item,) = read_retrieval("hf://datasets/someone/video-sft/train/test.csv", video_root=tmp_path)
    assert (item.video_name, item.texts) == ("video1", ["a dog runs"])
    (sample,) = read_instructions("hf://datasets/someone/video-sft/train/sft.jsonl")
    assert sample.turns[1].text == "A dog runs."
    assert sample.video == str(data.parent / "clips" / "a.mp4")  # relative to the file's cached folder
    (again,) = read_instructions("hf://datasets/someone/video-sft/train/sft.jsonl", video_root=tmp_path / "videos")
    assert again.video == str(tmp_path / "videos" / "clips" / "a.mp4")
    with pytest.raises(DataError, match=r"hf://datasets/someone/video-sft/train/other.jsonl: cannot get train/other.jsonl"):
        read_instructions("hf://datasets/someone/video-sft/train/other.jsonl")
    with pytest.raises(DataError, match="is named hf://datasets/ORG/NAME/PATH"):
        read_instructions("hf://datasets/someone/video-sft")
    formats._hub_file.cache_clear()
