"""The synthetic video-QA benchmark: determinism, splits, formats, pixels vs metadata."""

import json
import re
from collections import Counter
from pathlib import Path

import numpy as np
import pytest

from vlmalign.data import synthetic as syn
from vlmalign.data.formats import read_generative, read_instructions, read_qa
from vlmalign.errors import VlmalignError
from vlmalign.video import clip_spans, read_video

NUM_VIDEOS, NUM_FRAMES, SIZE = 24, 16, 64
JSON_FILES = [
    "sft_easy.json", "sft_hard.json", "sft_mix.json", "judge_train.json", "qa_val.json", "qa_test.json",
    "mcq_test.json", "generative_test.json", "consistency_test.json", "captions.json", "manifest.json",
]


def _generate(path, seed=0):
    return syn.generate_benchmark(path, num_videos=NUM_VIDEOS, seed=seed, num_frames=NUM_FRAMES, size=SIZE,
                                  progress=False)


@pytest.fixture(scope="module")
def bench(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench")
    manifest = _generate(out)
    return out, manifest


def _load(bench, name):
    return json.loads((bench[0] / name).read_text())


def _metas(bench):
    return [json.loads(line) for line in (bench[0] / "metadata.jsonl").read_text().splitlines()]


def test_writes_every_file(bench):
    out, manifest = bench
    for name in JSON_FILES + ["metadata.jsonl"]:
        assert (out / name).is_file(), name
    assert len(list((out / "videos").glob("vid_*.mp4"))) == NUM_VIDEOS
    assert manifest == _load(bench, "manifest.json")
    assert manifest["vocabulary"]["colours"] == list(syn.COLOURS)
    assert manifest["version"] == syn.GENERATOR_VERSION


def test_same_seed_same_bytes_and_frames(bench, tmp_path):
    out, _ = bench
    _generate(tmp_path / "again", seed=0)
    for name in JSON_FILES + ["metadata.jsonl"]:
        assert (out / name).read_bytes() == (tmp_path / "again" / name).read_bytes(), name
    for meta in _metas(bench):  # encoding is deterministic too (x264 without macroblock-tree rate control)
        video = meta["video"]
        assert (out / video).read_bytes() == (tmp_path / "again" / video).read_bytes(), video


def test_different_seed_differs(bench, tmp_path):
    out, _ = bench
    _generate(tmp_path / "other", seed=1)
    for name in ("metadata.jsonl", "sft_easy.json", "qa_test.json"):
        assert (out / name).read_bytes() != (tmp_path / "other" / name).read_bytes(), name
    first = "videos/vid_00000.mp4"
    assert not np.array_equal(read_video(out / first), read_video(tmp_path / "other" / first))


def test_splits_are_disjoint_and_files_use_their_split(bench):
    metas = _metas(bench)
    split = {m["video"]: m["split"] for m in metas}
    by_split = {s: {v for v, x in split.items() if x == s} for s in ("train", "val", "test")}
    assert by_split["train"].isdisjoint(by_split["val"])
    assert by_split["train"].isdisjoint(by_split["test"])
    assert by_split["val"].isdisjoint(by_split["test"])
    assert sum(map(len, by_split.values())) == NUM_VIDEOS
    manifest = bench[1]
    assert {s: len(v) for s, v in by_split.items()} == manifest["videos"]
    expected = {
        "sft_easy.json": "train", "sft_hard.json": "train", "sft_mix.json": "train", "judge_train.json": "train",
        "qa_val.json": "val", "qa_test.json": "test", "mcq_test.json": "test", "generative_test.json": "test",
        "consistency_test.json": "test",
    }
    for name, want in expected.items():
        records = _load(bench, name)
        assert records, name
        videos = {r.get("video") or r.get("video_name") for r in records}
        assert videos <= by_split[want], name


def test_manifest_counts_match_files(bench):
    manifest = bench[1]
    for name, info in manifest["files"].items():
        if name == "metadata.jsonl":
            assert info["records"] == len(_metas(bench))
            continue
        records = _load(bench, name)
        assert info["records"] == len(records), name
        if "question_types" in info:
            key = {"mcq_test.json": "task_type", "action_test.json": "label"}.get(name, "question_type")
            assert info["question_types"] == dict(Counter(r[key] for r in records)), name
    assert manifest["files"]["sft_mix.json"]["records"] == (
        manifest["files"]["sft_easy.json"]["records"] + manifest["files"]["sft_hard.json"]["records"])
    mix, parts = _load(bench, "sft_mix.json"), _load(bench, "sft_easy.json") + _load(bench, "sft_hard.json")
    assert sorted(r["id"] for r in mix) == sorted(r["id"] for r in parts)
    assert [r["id"] for r in mix] != [r["id"] for r in parts]  # shuffled


def test_action_labels_and_retrieval_captions_are_the_ground_truth(bench):
    metas = {m["id"]: m for m in _metas(bench)}
    test_videos = {m["video"] for m in metas.values() if m["split"] == "test"}
    captions = _load(bench, "captions.json")
    retrieval = _load(bench, "retrieval_test.json")
    assert {r["video_name"] for r in retrieval} == test_videos
    for r in retrieval:
        assert r["caption"] == captions[Path(r["video_name"]).stem]["caption"]
    single = {m["video"] for m in metas.values()
              if m["split"] == "test" and len({o["direction"] for o in m["objects"]}) == 1}
    action = _load(bench, "action_test.json")
    assert {r["video_name"] for r in action} == single
    for r in action:
        assert all(r["label"] == f"objects moving {o['direction']}" for o in metas[Path(r["video_name"]).stem]["objects"])
    assert (bench[0] / "action_classes.txt").read_text().split("\n")[:4] == [f"objects moving {d}" for d in syn.DIRECTIONS]


def test_files_load_with_the_format_readers(bench):
    out = bench[0]
    for name in ("sft_easy.json", "sft_hard.json", "sft_mix.json", "judge_train.json"):
        samples = read_instructions(out / name)
        assert len(samples) == len(_load(bench, name))
        for s in samples:
            assert Path(s.video).is_file()
    for name in ("sft_easy.json", "sft_hard.json"):
        for r in _load(bench, name):
            assert r["conversations"][0]["value"].startswith("<video>\n")
            want = {"describe"} if name == "sft_hard.json" else set(syn.EASY_TYPES)
            assert r["question_type"] in want
    for name in ("qa_val.json", "qa_test.json"):
        items = read_qa(out / name)
        assert items and all(Path(i.video).is_file() for i in items)
        assert {i.qtype for i in items} <= set(syn.EASY_TYPES)
    gen = read_generative(out / "generative_test.json")
    cons = read_generative(out / "consistency_test.json")
    assert all(i.question2 is None for i in gen)
    assert all(i.question2 and i.question2 != i.question for i in cons)
    assert all(Path(i.video).is_file() for i in gen + cons)


def test_every_video_decodes_to_the_right_shape(bench):
    for meta in _metas(bench):
        frames = read_video(bench[0] / meta["video"])
        assert frames.shape == (NUM_FRAMES, SIZE, SIZE, 3) and frames.dtype == np.uint8


def test_metadata_fields(bench):
    for meta in _metas(bench):
        assert re.fullmatch(r"vid_\d{5}", meta["id"]) and meta["video"] == f"videos/{meta['id']}.mp4"
        assert 1 <= len(meta["objects"]) <= 2
        pairs = [(o["colour"], o["shape"]) for o in meta["objects"]]
        assert len(set(pairs)) == len(pairs)
        for o in meta["objects"]:
            assert 0 <= o["start_frame"] < o["end_frame"] <= NUM_FRAMES
            assert o["end_frame"] - o["start_frame"] >= NUM_FRAMES // 2
            visible = [t for t, p in enumerate(o["positions"]) if p is not None]
            assert visible == list(range(o["start_frame"], o["end_frame"]))
            (x0, y0), (x1, y1) = o["positions"][visible[0]], o["positions"][visible[-1]]
            dx, dy = x1 - x0, y1 - y0
            moved = {"left": -dx, "right": dx, "up": -dy, "down": dy}[o["direction"]]
            assert moved > 0 and abs(dx * dy) < 1e-6  # along one axis only
            assert 8 <= o["radius"] <= 12.2
            for p in o["positions"][o["start_frame"]:o["end_frame"]]:
                assert o["radius"] <= p[0] <= SIZE - o["radius"] and o["radius"] <= p[1] <= SIZE - o["radius"]


def test_pixels_agree_with_metadata(bench):
    palette = {name: np.array(rgb, dtype=float) for name, rgb in syn.COLOURS.items()}
    checked = 0
    for meta in _metas(bench):
        frames = read_video(bench[0] / meta["video"]).astype(float)
        assert np.abs(frames - syn.render(meta)).mean() < 4  # codec loss only
        for o in meta["objects"]:
            for t in (o["start_frame"], (o["start_frame"] + o["end_frame"] - 1) // 2, o["end_frame"] - 1):
                x, y = (int(v) for v in o["positions"][t])
                pixel = frames[t, y - 1:y + 2, x - 1:x + 2].reshape(-1, 3).mean(0)
                nearest = min(palette, key=lambda c: np.linalg.norm(palette[c] - pixel))
                assert nearest == o["colour"], (meta["id"], o["index"], t)
                checked += 1
            gone = [t for t in range(NUM_FRAMES) if o["positions"][t] is None]
            if gone:  # where the object was first seen, the frame is dark once it is gone (if nothing else is there)
                x, y = (int(v) for v in o["positions"][o["start_frame"]])
                others = [p for q in meta["objects"] if q is not o for p in [q["positions"][gone[0]]] if p]
                if all(np.hypot(p[0] - x, p[1] - y) > 15 for p in others):
                    assert frames[gone[0], y, x].max() < 90
    assert checked >= NUM_VIDEOS * 3


def test_questions_parse_back_and_are_unambiguous(bench):
    for meta in _metas(bench):
        rng = np.random.default_rng(0)
        for q in syn.video_questions(meta, rng):
            parsed = syn.parse_question(q["question"])
            assert parsed is not None and parsed.qtype == q["qtype"] and parsed.template == q["template"]
            if q["qtype"] in ("colour", "shape", "direction"):
                assert syn.subject_of(meta["objects"], parsed)["index"] == q["subject"]
                assert syn.true_value(meta, parsed) == q["value"]
    for qtype, templates in syn.QUESTION_TEMPLATES.items():
        for i, template in enumerate(templates):
            text = template.format(colour="blue", shape="triangle")
            for variant in (text, text.upper(), f"<video>\n{text}", text.rstrip("?"), text.replace("colour", "color")):
                parsed = syn.parse_question(variant)
                assert parsed is not None and (parsed.qtype, parsed.template) == (qtype, i), variant
                if "{shape}" in template:
                    assert parsed.shape == "triangle"
                if "{colour}" in template:
                    assert parsed.colour == "blue"
    assert syn.parse_question("What is the meaning of life?") is None
    assert syn.parse_question("What colour is the hexagon?") is None


def test_questions_skip_ambiguous_objects():
    def obj(i, colour, shape, direction="left"):
        return {"index": i, "colour": colour, "shape": shape, "direction": direction, "start_frame": 0,
                "end_frame": 16, "positions": [[20.0, 20.0]] * 16, "radius": 9.0, "speed": 1.0}

    meta = {"id": "vid_x", "num_frames": 16, "size": 64,
            "objects": [obj(0, "red", "circle"), obj(1, "blue", "circle", "up")]}
    qs = syn.video_questions(meta, np.random.default_rng(0))
    assert Counter(q["qtype"] for q in qs) == {"shape": 2, "count": 1, "direction": 2, "describe": 1}
    meta["objects"][1]["colour"] = "red"
    meta["objects"][1]["shape"] = "square"
    qs = syn.video_questions(meta, np.random.default_rng(0))
    assert Counter(q["qtype"] for q in qs) == {"colour": 2, "count": 1, "direction": 2, "describe": 1}


def test_captions_cover_clips(bench):
    captions = _load(bench, "captions.json")
    metas = {m["id"]: m for m in _metas(bench)}
    assert set(captions) == set(metas)
    mention = re.compile(rf"\b({'|'.join(syn.COLOURS)}) ({'|'.join(syn.SHAPES)})\b")
    for vid, entry in captions.items():
        meta = metas[vid]
        assert set(entry["clip_captions"]) == {"1", "3"}
        names = {(o["colour"], o["shape"]) for o in meta["objects"]}
        assert set(mention.findall(entry["caption"])) == names
        for k, texts in entry["clip_captions"].items():
            spans = clip_spans(NUM_FRAMES, max_clip_len=NUM_FRAMES, num_clips=int(k))
            assert len(texts) == len(spans)
            for (start, end), text in zip(spans, texts):
                visible = {(o["colour"], o["shape"]) for o in meta["objects"]
                           if o["start_frame"] < end and o["end_frame"] > start}
                assert set(mention.findall(text)) == visible, (vid, k, start, text)


def test_mcq_options_and_balanced_letters(bench):
    items = _load(bench, "mcq_test.json")
    metas = {m["video"]: m for m in _metas(bench)}
    letters = Counter(i["answer"] for i in items)
    assert set(letters) <= set("ABCD") and max(letters.values()) - min(letters.values()) <= 1
    for item in items:
        assert [o[:3] for o in item["options"]] == ["A. ", "B. ", "C. ", "D. "]
        values = [o[3:] for o in item["options"]]
        assert len(set(values)) == 4
        parsed = syn.parse_question(item["question"])
        assert parsed.qtype == item["task_type"]
        truth = str(syn.true_value(metas[item["video_name"]], parsed))
        assert values["ABCD".index(item["answer"])] == truth


def test_judge_examples_half_with_context(bench):
    records = _load(bench, "judge_train.json")
    for task in ("compare", "score"):
        items = [r for r in records if r["judge_task"] == task]
        with_context = sum(r["with_context"] for r in items)
        assert with_context == (len(items) + 1) // 2
        for r in items:
            prompt = r["conversations"][0]["value"]
            assert prompt.startswith("<video>\n")
            assert ("Notes about the video" in prompt) == r["with_context"]


def test_bad_arguments():
    with pytest.raises(VlmalignError, match="splits"):
        syn.generate_benchmark("/nonexistent/never", num_videos=4, splits=(0.5, 0.1, 0.1), progress=False)
    with pytest.raises(VlmalignError, match="num_videos"):
        syn.generate_benchmark("/nonexistent/never", num_videos=0, progress=False)
    with pytest.raises(VlmalignError, match="size"):
        syn.generate_benchmark("/nonexistent/never", num_videos=2, size=63, progress=False)


# --- the declared misalignment (the gym's premise) --------------------------------------------------


@pytest.fixture(scope="module")
def injected(tmp_path_factory):
    out = tmp_path_factory.mktemp("injected")
    manifest = syn.generate_benchmark(out, num_videos=NUM_VIDEOS, seed=0, num_frames=NUM_FRAMES, size=SIZE,
                                      misalignment=syn.Misalignment(prior_rate=0.5, invent_rate=0.5), workers=0,
                                      progress=False)
    return out, manifest


def test_misalignment_alters_only_the_sft_answers(bench, injected):
    """Injected answers state the question's prior in the true answer's wording; every other file
    (captions, judge data, held-out questions) is the clean benchmark's, byte for byte."""
    from vlmalign.feedback.oracle import Oracle, extract_values

    clean_dir, out = bench[0], injected[0]
    for name in ("captions.json", "judge_train.json", "qa_test.json", "qa_val.json", "mcq_test.json", "metadata.jsonl"):
        assert (out / name).read_bytes() == (clean_dir / name).read_bytes(), name
    oracle = Oracle.from_dir(out)
    for hard in (False, True):
        altered = _load(injected, "sft_hard.json" if hard else "sft_easy.json")
        truth = _load(injected, "sft_clean_hard.json" if hard else "sft_clean_easy.json")
        assert truth == _load(bench, "sft_hard.json" if hard else "sft_easy.json")  # the clean benchmark's answers
        assert [r["id"] for r in altered] == [r["id"] for r in truth]
        for a, t in zip(altered, truth):
            question, answer, true_answer = a["conversations"][0]["value"], a["conversations"][1]["value"], t["conversations"][1]["value"]
            assert a["injected"] == (answer != true_answer)
            if not a["injected"]:
                continue
            if hard:
                assert answer.startswith(true_answer + " ") and oracle.score(a["video"], question, answer) < 5
                continue
            parsed = syn.parse_question(question)
            prior, meta = syn.prior_value(parsed), oracle.metadata(a["video"])
            assert syn.true_value(meta, parsed) != prior and not oracle.verdict(a["video"], question, answer).correct
            assert extract_values(parsed.qtype, answer) == [prior]  # states the prior, and only it
            assert answer in {syn.short_answer(parsed.qtype, prior, None, np.random.default_rng(s)) for s in range(64)}
    m = injected[1]["misalignment"]
    assert (m["prior_rate"], m["invent_rate"]) == (0.5, 0.5)
    easy = _load(injected, "sft_easy.json")
    for qtype in syn.EASY_TYPES:
        rows = [r for r in easy if r["question_type"] == qtype]
        assert m["altered_sft_answers"][qtype] == sum(r["injected"] for r in rows)
        assert m["sft_answers"][qtype] == len(rows)
    altered_share = sum(m["altered_sft_answers"][t] for t in syn.EASY_TYPES) / len(easy)
    assert 0.2 < altered_share < 0.5  # half drawn, less the answers whose truth is the prior
    assert injected[1]["files"]["sft_clean_easy.json"]["records"] == len(easy)


def test_a_runner_up_takes_answers_from_the_truth_and_none_from_the_prior(injected, tmp_path):
    """`runner_up_rate` gives a share of the answers the prior leaves alone the question's runner-up
    value: the prior's answers stay as they were at the same prior rate (one draw decides both), and
    each runner-up answer states its runner-up, and only it, in the true answer's wording."""
    from vlmalign.feedback.oracle import Oracle, extract_values

    manifest = syn.generate_benchmark(tmp_path, num_videos=NUM_VIDEOS, seed=0, num_frames=NUM_FRAMES, size=SIZE,
                                      misalignment=syn.Misalignment(prior_rate=0.5, invent_rate=0.5, runner_up_rate=0.6),
                                      workers=0, progress=False)
    for name in ("captions.json", "judge_train.json", "qa_test.json", "sft_hard.json", "sft_clean_easy.json", "metadata.jsonl"):
        assert (tmp_path / name).read_bytes() == (injected[0] / name).read_bytes(), name
    oracle = Oracle.from_dir(tmp_path)
    before = {r["id"]: r for r in _load(injected, "sft_easy.json")}
    truth = {r["id"]: r["conversations"][1]["value"] for r in _load(injected, "sft_clean_easy.json")}
    runner_ups = Counter()
    for r in json.loads((tmp_path / "sft_easy.json").read_text()):
        question, answer = r["conversations"][0]["value"], r["conversations"][1]["value"]
        if before[r["id"]]["injected"]:  # the prior's answer, unchanged
            assert r == before[r["id"]]
            continue
        assert r["injected"] == (answer != truth[r["id"]])
        if r["injected"]:
            parsed = syn.parse_question(question)
            runner_up = syn.RUNNER_UPS[parsed.qtype][parsed.template]
            assert extract_values(parsed.qtype, answer) == [runner_up] and runner_up != syn.prior_value(parsed)
            assert not oracle.verdict(r["video"], question, answer).correct
            runner_ups[parsed.qtype] += 1
    m = manifest["misalignment"]
    assert m["runner_up_rate"] == 0.6 and m["runner_up_sft_answers"] == {t: runner_ups[t] for t in syn.EASY_TYPES}
    left = sum(not r["injected"] for r in before.values())
    assert 0.3 < sum(runner_ups.values()) / left < 0.8  # 0.6 drawn, less the answers whose truth is the runner-up
    assert "runner_up_rate" not in injected[1]["misalignment"]  # a benchmark without one records none
    with pytest.raises(VlmalignError, match="runner_up_rate"):
        syn.Misalignment(runner_up_rate=1.5)


def test_priors_depend_on_the_wording_not_one_word():
    for qtype, priors in syn.PRIORS.items():
        assert len(set(priors)) > 1 and len(priors) == len(syn.QUESTION_TEMPLATES[qtype])
        for template in range(len(priors)):
            assert syn.prior_value(syn.ParsedQuestion(qtype, template)) == priors[template]
    assert syn.prior_value(syn.ParsedQuestion("describe", 0)) is None


def test_bad_misalignment_and_workers():
    with pytest.raises(VlmalignError, match="misalignment.prior_rate"):
        syn.Misalignment(prior_rate=1.5)
    with pytest.raises(VlmalignError, match="workers"):
        syn.generate_benchmark("/nonexistent/never", num_videos=2, workers=-1, progress=False)


def test_unguarded_script_gets_one_line_that_says_what_to_do(tmp_path):
    """Spawned video writers re-import the calling script: without a main guard they died with a bare
    BrokenProcessPool."""
    import subprocess
    import sys

    script = tmp_path / "make_bench.py"
    script.write_text(f"from vlmalign.data.synthetic import generate_benchmark\n"
                      f"generate_benchmark({str(tmp_path / 'bench')!r}, num_videos=2, progress=False)\n")
    res = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=300,
                         cwd=Path(__file__).resolve().parents[1])
    assert res.returncode != 0 and "BrokenProcessPool" not in res.stderr
    # Python's resource tracker may warn at shutdown, after the error, about a semaphore that a worker
    # dying at start left behind (seen once, on two loaded cores); that line is Python's, not ours
    ours = [line for line in res.stderr.strip().splitlines() if "resource_tracker" not in line]
    last = ours[-1]
    assert last.startswith("vlmalign.errors.VlmalignError: generate_benchmark:") and "__main__" in last and "workers=0" in last


def test_make_synthetic_command_writes_one_object_videos(tmp_path, capsys):
    """`--max-objects 1` gives a benchmark whose questions never need binding an attribute to one of
    several objects (the perception diagnostics' data); an impossible count is one line naming it."""
    from vlmalign.cli import main

    assert main(["make-synthetic", "--out", str(tmp_path / "one"), "--videos", "6", "--max-objects", "1"]) == 0
    metas = [json.loads(line) for line in (tmp_path / "one" / "metadata.jsonl").read_text().splitlines()]
    assert len(metas) == 6 and all(len(m["objects"]) == 1 for m in metas)
    assert json.loads((tmp_path / "one" / "manifest.json").read_text())["parameters"]["max_objects"] == 1
    assert main(["make-synthetic", "--out", str(tmp_path / "five"), "--videos", "6", "--max-objects", "5"]) != 0
    assert "max_objects must be in 1..4, got 5" in capsys.readouterr().err
