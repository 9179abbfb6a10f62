"""make-prefs: sampling, contexts, judging and pairing on the 12-video benchmark with a tiny model."""

import json

import pytest
import torch

from vlmalign.cli import main
from vlmalign.config import PrefsConfig, load_config
from vlmalign.data.features import VisualInputs
from vlmalign.data.formats import read_preference_pairs
from vlmalign.feedback.context import load_captions
from vlmalign.feedback.oracle import Oracle
from vlmalign.feedback.judges import Judgment
from vlmalign.feedback.preferences import judge_stats, make_preferences, read_questions
from vlmalign.model.policy import load_model
from vlmalign.video import clip_inputs


def prefs_cfg(policy, bench, run_dir, **extra) -> PrefsConfig:
    base = {
        "run.dir": str(run_dir), "run.progress": "false", "policy": str(policy),
        "data.train": f"[{bench}/sft_easy.json]", "data.feature_cache": str(run_dir.parent / "feature_cache"),
        "sampling.max_new_tokens": "6", "sampling.batch_size": "16",
        "judge.bench": str(bench), "preferences.oracle": str(bench), "preferences.limit": "12",
        "context.captions": str(bench / "captions.json"),
    }
    base.update(extra)
    return load_config(PrefsConfig, "configs/tiny/prefs.yaml", [f"{k}={v}" for k, v in base.items()])


def _setup(cfg):
    model = load_model(cfg.policy).eval()
    visual = model.visual_inputs(cfg.data.feature_cache)
    return model, visual, read_questions(cfg.data.train, None, cfg.preferences.limit)


def test_ranked_agreement_is_tau_b_over_the_questions_the_oracle_orders(tiny_bench):
    """Ranked judgments against the oracle: tau-b per question (a tie in either ranking is neither
    agreement nor disagreement), a question whose answers the oracle ties all alike is left out, and
    a judge that ties answers the oracle orders gets 0 for that question."""
    from types import SimpleNamespace

    from vlmalign.feedback.oracle import Oracle
    from vlmalign.feedback.preferences import oracle_agreement

    oracle = Oracle.from_dir(tiny_bench)
    record = json.loads((tiny_bench / "sft_easy.json").read_text())[0]
    video, question = str(tiny_bench / record["video"]), record["conversations"][0]["value"].replace("<video>", "").strip()
    right = oracle.reference(video, question)
    wrong = next(a for a in ("Zero.", "Purple.", "Hexagon.", "Upward.") if oracle.score(video, question, a) < oracle.score(video, question, right))
    q = SimpleNamespace(video=video, question=question)
    group = [SimpleNamespace(text=t) for t in (right, wrong, right, wrong)]  # the oracle ranks 0, 2, 0, 2
    alike = [SimpleNamespace(text=t) for t in (wrong, wrong, wrong, wrong)]
    judged = [SimpleNamespace(status="ok", value=v) for v in ([0, 2, 1, 3], [0, 1, 2, 3], [0, 0, 0, 0], [0, 1, 2, 3])]
    stats = oracle_agreement(oracle, "ranked", [q] * 4, [group, group, group, alike], judged)
    # [0, 2, 1, 3] vs [0, 2, 0, 2]: 4 untied truth pairs, all agree; 6 untied judge pairs -> 4 / sqrt(24)
    # [0, 1, 2, 3]: 3 agree, 1 disagrees -> 2 / sqrt(24); [0, 0, 0, 0]: 0; the all-wrong group: left out
    assert stats["n"] == 3 and stats["kendall_tau"] == pytest.approx((4 + 2 + 0) / 24 ** 0.5 / 3)


def test_ranked_preferences_carry_provenance_and_rerun_from_cache(tiny_policy, tiny_bench, tmp_path):
    cfg = prefs_cfg(tiny_policy, tiny_bench, tmp_path / "ranked", **{
        "preferences.method": "ranked", "sampling.num_samples": "4", "context.kind": "none"})
    model, visual, questions = _setup(cfg)
    path, stats = make_preferences(cfg, model, visual, questions, tmp_path / "ranked")
    records = [json.loads(line) for line in path.read_text().splitlines()]
    assert stats["questions"] == 12 and stats["judgments"] == 12
    assert stats["pairs"] + sum(stats["dropped"].values()) == 12  # every question kept or counted
    for r in records:
        ranks = r["ranks"]  # each rank counts the answers the oracle scores higher; ties share one
        assert ranks == [sum(other < mine for other in ranks) for mine in ranks] and min(ranks) == 0 < max(ranks)
        assert len(r["answers"]) == len(r["answer_logps"]) == 4
        assert r["chosen"] == r["answers"][ranks.index(0)] and r["rejected"] == r["answers"][ranks.index(max(ranks))]
        assert r["judge"].startswith("oracle:") and r["prompt_version"].startswith("oracle.rank@")
        assert r["policy"] == str(tiny_policy) and r["method"] == "ranked"
        assert r["video"].startswith("/")  # read back relative to the preference file otherwise
        assert all(lp < 0 for lp in r["answer_logps"])
    # agreement is counted over the questions whose answers the oracle does not tie all alike
    rankings = [row["judgments"][0]["value"] for row in map(json.loads, (tmp_path / "ranked" / "judgments.jsonl").open())]
    ordered = sum(len(set(r)) > 1 for r in rankings)  # the oracle judge agrees with the oracle: tau-b 1
    assert stats["oracle_agreement"] == {"kendall_tau": pytest.approx(1.0) if ordered else None, "n": ordered}
    assert len(read_preference_pairs(path)) == len(records)  # the DPO reader takes the file as is

    again = make_preferences(cfg, model, visual, questions, tmp_path / "ranked")[1]
    assert again["cached"] == again["judgments"] == 12  # the re-run asks the judge nothing new
    assert again["pairs"] == stats["pairs"]


def test_score_threshold_drops_questions_without_a_good_and_a_bad_answer(tiny_policy, tiny_bench, tmp_path):
    cfg = prefs_cfg(tiny_policy, tiny_bench, tmp_path / "scores", **{"sampling.num_samples": "3"})
    model, visual, questions = _setup(cfg)
    path, stats = make_preferences(cfg, model, visual, questions, tmp_path / "scores")
    oracle = Oracle.from_dir(tiny_bench)
    samples = [json.loads(line) for line in (tmp_path / "scores" / "samples.jsonl").read_text().splitlines()]
    expected = 0
    for q, row in zip(questions, samples):
        scores = [oracle.score(q.video, q.question, a["text"]) for a in row["answers"]]
        expected += any(s >= 3 for s in scores) and any(s <= 2 for s in scores)
    assert stats["judgments"] == 36
    other_drops = sum(v for k, v in stats["dropped"].items() if k != "no_pair")  # empty / identical answers
    assert stats["pairs"] + other_drops == expected and stats["dropped"].get("no_pair", 0) == 12 - expected
    for r in (json.loads(line) for line in path.read_text().splitlines()):
        assert r["chosen_score"] >= 3 and r["rejected_score"] <= 2 and r["scores"].count(r["chosen_score"]) >= 1


def test_self_judge_parse_failures_are_counted_never_scored(tiny_policy, tiny_bench, tmp_path):
    cfg = prefs_cfg(tiny_policy, tiny_bench, tmp_path / "self", **{
        "preferences.method": "pairwise", "sampling.num_samples": "2", "context.kind": "narrative",
        "context.clips": "3", "context.max_new_tokens": "8", "judge.backend": "hf", "judge.model": "policy",
        "judge.max_new_tokens": "4"})
    model, visual, questions = _setup(cfg)
    _, stats = make_preferences(cfg, model, visual, questions, tmp_path / "self")
    contexts = json.loads((tmp_path / "self" / "contexts.json").read_text())["contexts"]
    assert len(contexts) == len({q.video for q in questions})
    assert all(c.count("Part ") == 3 for c in contexts.values())  # three clip captions per narrative
    parse_errors = stats["by_status"].get("parse_error", 0)
    assert stats["pairs"] + sum(stats["dropped"].values()) == 12
    assert stats["dropped"].get("parse_error", 0) == parse_errors  # random replies: dropped, counted
    # judgments.jsonl keeps every question's verdict, the unreadable replies of dropped ones included
    rows = [json.loads(line) for line in (tmp_path / "self" / "judgments.jsonl").read_text().splitlines()]
    assert [r["id"] for r in rows] == [q.id for q in questions] and all(r["question"] for r in rows)
    verdicts = [j for r in rows for j in r["judgments"]]
    assert sum(j["status"] == "parse_error" for j in verdicts) == parse_errors
    assert all(isinstance(j["raw"], str) for j in verdicts)  # the reply as the judge wrote it


def test_a_rerun_reuses_contexts_only_when_made_with_the_same_settings(tiny_policy, tiny_bench, tmp_path, monkeypatch):
    """Changing the context settings and re-running in the same folder must not judge with the old
    contexts (they were reused whatever the settings before)."""
    from vlmalign.feedback import preferences

    out = tmp_path / "ctx"
    cfg = prefs_cfg(tiny_policy, tiny_bench, out, **{"context.kind": "caption", "sampling.num_samples": "2"})
    model, visual, questions = _setup(cfg)
    make_preferences(cfg, model, visual, questions, out)
    captions = load_captions(tiny_bench / "captions.json")
    saved = json.loads((out / "contexts.json").read_text())
    assert saved["settings"]["kind"] == "caption" and set(saved["contexts"].values()) <= set(captions.values())

    narrative = prefs_cfg(tiny_policy, tiny_bench, out, **{
        "context.kind": "narrative", "context.clips": "2", "context.max_new_tokens": "4", "sampling.num_samples": "2",
        "preferences.method": "ranked"})
    make_preferences(narrative, model, visual, questions, out)
    contexts = json.loads((out / "contexts.json").read_text())["contexts"]
    assert all(c.count("Part ") == 2 for c in contexts.values())  # written again, not the captions
    judged = [json.loads(line) for line in (out / "judgments.jsonl").open()]
    assert judged and all(row["context"].count("Part ") == 2 for row in judged)  # what the judge read

    def no_rebuild(*args, **kwargs):
        raise AssertionError("contexts made with these settings exist: they should be reused")

    monkeypatch.setattr(preferences, "build_contexts", no_rebuild)
    make_preferences(narrative, model, visual, questions, out)


def test_clips_cover_the_frames_in_order_at_the_model_frame_count():
    frames = torch.arange(16).view(16, 1, 1).float()
    clips = clip_inputs(frames, clips=3, max_clip_len=20)
    assert [c.shape[0] for c in clips] == [16, 16, 16]
    assert [sorted(set(c.flatten().int().tolist())) for c in clips] == [list(range(0, 6)), list(range(6, 11)), list(range(11, 16))]
    assert all(bool((c.flatten().diff() >= 0).all()) for c in clips)  # temporal order kept
    with pytest.raises(ValueError, match="max_clip_len"):
        clip_inputs(torch.zeros(50, 1), clips=2, max_clip_len=20)  # 25-frame clips exceed 20


def test_synthetic_captions_load_as_proxy_and_as_narrative(tiny_bench):
    whole = load_captions(tiny_bench / "captions.json")
    three = load_captions(tiny_bench / "captions.json", clips=3)
    assert whole.keys() == three.keys() and len(whole) == 12
    assert all(v.startswith("Part 1 of 3:") for v in three.values())


def test_make_prefs_command(tiny_policy, tiny_bench, tmp_path, capsys):
    run_dir = tmp_path / "cli"
    args = ["make-prefs", "--config", "configs/tiny/prefs.yaml"]
    for k, v in {"run.dir": run_dir, "run.progress": "false", "policy": tiny_policy, "data.train": f"[{tiny_bench}/sft_easy.json]",
                 "data.feature_cache": tmp_path / "fc", "judge.bench": tiny_bench, "preferences.oracle": tiny_bench,
                 "preferences.limit": 4, "sampling.max_new_tokens": 4, "context.captions": tiny_bench / "captions.json"}.items():
        args += ["--set", f"{k}={v}"]
    assert main(args) == 0
    out = capsys.readouterr().out
    assert "questions 4" in out and "preferences written to" in out
    stats = json.loads((run_dir / "stats.json").read_text())
    assert stats["context"] == "caption" and stats["judgments"] == 4 * 6


def test_pairs_with_an_empty_or_identical_answer_are_dropped_and_counted():
    from types import SimpleNamespace

    from vlmalign.config import PrefsConfig
    from vlmalign.feedback.preferences import Question, build_records
    from vlmalign.model.generation import Sample

    cfg = PrefsConfig()  # pairwise
    questions = [Question(f"q{i}", f"/v/{i}.mp4", "what colour?") for i in range(3)]
    samples = [[Sample("red", [], [-1.0], True), Sample("", [], [-0.5], True)],
               [Sample("blue", [], [-1.0], True), Sample("blue", [], [-1.0], True)],
               [Sample("green", [], [-1.0], True), Sample("red", [], [-2.0], True)]]
    judged = [SimpleNamespace(status="ok", value=0, judge="j", model="m", prompt="p@v1", raw="A")] * 3
    records, dropped = build_records(cfg, questions, samples, judged, {}, seed=0)
    assert dropped == {"empty_answer": 1, "identical_answers": 1}
    assert [(r["chosen"], r["rejected"]) for r in records] == [("green", "red")]


def test_make_prefs_input_errors_name_the_key(tiny_policy, tiny_bench, tmp_path):
    from vlmalign.errors import ConfigError, DataError
    from vlmalign.feedback import preferences

    cfg = prefs_cfg(tiny_policy, tiny_bench, tmp_path / "a", **{"preferences.method": "pairwise", "sampling.num_samples": "3"})
    model, visual, questions = _setup(cfg)
    with pytest.raises(ConfigError, match="sampling.num_samples"):
        make_preferences(cfg, model, visual, questions, tmp_path / "a")
    with pytest.raises(ConfigError, match="policy"):
        preferences.run(prefs_cfg("", tiny_bench, tmp_path / "b"))
    with pytest.raises(ConfigError, match="context.captions"):
        cfg = prefs_cfg(tiny_policy, tiny_bench, tmp_path / "c", **{"context.captions": "null"})
        make_preferences(cfg, model, visual, questions[:2], tmp_path / "c")
    with pytest.raises(DataError, match="missing.json"):
        read_questions([str(tmp_path / "missing.json")])


def test_judge_stats_count_statuses_and_position_bias():
    def j(value, status="ok", kind="compare"):
        return Judgment(kind, value, status, "raw", "judge", "judge.compare@v1", "m", False, None)

    stats = judge_stats([j(0), j(1), j(1), j(None, "inconsistent"), j(None, "parse_error")])
    assert stats["by_status"] == {"ok": 3, "inconsistent": 1, "parse_error": 1} and stats["judgments"] == 5
    assert stats["failure_rate"] == pytest.approx(2 / 5)
    assert stats["first_answer_chosen"] == pytest.approx(1 / 3)  # A in one of the three verdicts
    assert "first_answer_chosen" not in judge_stats([[j(4, kind="score")]])  # scores have no position


def test_score_agreement_orders_pairs_the_oracle_separates():
    """Hand-computed: three answers per question, oracle scores (5, 1, 3) and (2, 2, 4)."""
    from types import SimpleNamespace

    from vlmalign.feedback.preferences import Question, oracle_agreement
    from vlmalign.model.generation import Sample

    truth = {"a": 5, "b": 1, "c": 3, "d": 2, "e": 2, "f": 4}
    oracle = SimpleNamespace(score=lambda video, question, answer: truth[answer])

    def j(value, status="ok"):
        return Judgment("score", value, status, "raw", "judge", "judge.score@v1", "m", False, None)

    questions = [Question("q1", "v1.mp4", "?"), Question("q2", "v2.mp4", "?")]
    samples = [[Sample(t, [], [], True) for t in "abc"], [Sample(t, [], [], True) for t in "def"]]
    judgments = [[j(4), j(2), j(4)], [j(1), j(5), j(None, "parse_error")]]
    result = oracle_agreement(oracle, "score_threshold", questions, samples, judgments)
    # q1: (a, b) ordered right, (a, c) tied, (b, c) ordered right; q2: (d, e) equal for the oracle,
    # (d, f) and (e, f) lose f to a parse error
    assert (result["pair_agreement"], result["pairs_ordered"], result["pairs_tied"]) == (1.0, 2, 1)
    # sides of 3: a 4/5 yes, b 2/1 yes, c 4/3 yes, d 1/2 yes, e 5/2 no; f not judged
    assert (result["agreement"], result["n"]) == (pytest.approx(4 / 5), 5)
    judgments[0] = [j(4), j(5), j(3)]  # (a, b) and (b, c) now reversed, (a, c) still right
    result = oracle_agreement(oracle, "score_threshold", questions, samples, judgments)
    assert (result["pair_agreement"], result["pairs_ordered"], result["pairs_tied"]) == (pytest.approx(1 / 3), 3, 0)


def test_saved_contexts_round_trip_their_settings_and_read_older_bare_files(tmp_path):
    from pathlib import Path

    from vlmalign.feedback.preferences import load_contexts, save_contexts

    path = tmp_path / "contexts.json"
    settings = {"kind": "narrative", "clips": 3, "prompts": Path("configs/tiny/prompts"), "stages": ("a", "b")}
    save_contexts(path, settings, {"v1.mp4": "one", "f1.jpg|f2.jpg": "two"})
    # Paths and tuples come back from JSON as strings and lists: still the same settings
    assert load_contexts(path, settings, ["v1.mp4", ["f1.jpg", "f2.jpg"]]) == {"v1.mp4": "one", "f1.jpg|f2.jpg": "two"}
    assert load_contexts(path, {**settings, "clips": 1}, ["v1.mp4"]) is None  # other settings: build again
    assert load_contexts(path, settings, ["v1.mp4", "v2.mp4"]) is None  # a video without one: build again
    path.write_text(json.dumps({"v1.mp4": "one"}))  # as runs written before the settings were kept
    assert load_contexts(path) == {"v1.mp4": "one"} and load_contexts(path, settings, ["v1.mp4"]) is None


def test_swapped_preferences_invert_every_pair_and_still_read(tmp_path):
    """The negative control of DPO and the reward model."""
    from vlmalign.feedback.preferences import swap_preferences

    rows = [{"id": "q1", "video": "/v/1.mp4", "prompt": "<video>\nWhat colour is the square?", "chosen": "Red.",
             "rejected": "Blue.", "chosen_score": 5, "rejected_score": 1},
            {"id": "q2", "video": "/v/2.mp4", "prompt": "<video>\nHow many objects appear in the video?", "chosen": "Two.",
             "rejected": "One or two.", "chosen_score": None, "rejected_score": None, "choice": 1}]
    src = tmp_path / "prefs.jsonl"
    src.write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = swap_preferences(src, tmp_path / "control" / "swapped.jsonl")
    swapped = [json.loads(line) for line in out.read_text().splitlines()]
    assert [(r["chosen"], r["rejected"], r["chosen_score"], r["rejected_score"]) for r in swapped] == [
        ("Blue.", "Red.", 1, 5), ("One or two.", "Two.", None, None)]
    assert all(r["control"] == "swapped" for r in swapped) and swapped[1]["choice"] == 0
    pairs = read_preference_pairs(out)
    assert [(p.chosen, p.rejected) for p in pairs] == [("Blue.", "Red."), ("One or two.", "Two.")]


def test_score_judge_reads_the_reference_answer_and_explains_its_score(tmp_path, monkeypatch):
    """LLaVA-Hound's judge: the QA file's reference answer goes into the score prompt, the judge
    explains before "Score: N", and the explanations reach the preference records."""
    from tests.test_eval import ScriptedJudgeServer
    from vlmalign.config import JudgeConfig
    from vlmalign.feedback.judges import build_judge
    from vlmalign.feedback.preferences import build_records, judge_candidates
    from vlmalign.model.generation import Sample

    monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    qa = tmp_path / "qa.json"
    qa.write_text(json.dumps([{"video_name": "v1", "question_id": "q1", "question": "What colour is the ball?",
                               "answer": "Blue."}]))
    questions = read_questions([str(qa)], video_root=str(tmp_path))
    assert questions[0].reference == "Blue."

    def script(prompt):  # grades against the reference it was shown
        answer = prompt.split("\nAnswer: ")[1].split("\n")[0]
        if "Reference answer (written by a person who watched the video): Blue." not in prompt:
            return "Score: 3"
        return (f"The answer says {answer} and the reference says blue.\n"
                f"Score: {5 if answer == 'Blue.' else 1}")

    samples = [[Sample(text, [1], [-0.5], True) for text in ("Red.", "Blue.")]]
    with ScriptedJudgeServer(script) as server:
        cfg = JudgeConfig(backend="openai", model="judge", base_url=server.url, max_retries=0, explain=True)
        judge = build_judge(cfg, tmp_path / "cache.sqlite", progress=False)
        judged = judge_candidates(judge, "score_threshold", questions, samples, {})
        sent = list(server.hits)
    assert all("First explain your grade" in p and "Reference answer" in p for p in sent) and len(sent) == 2
    assert [j.value for j in judged[0]] == [1, 5] and all(j.prompt == "judge.score_explained@v1" for j in judged[0])
    records, _ = build_records(PrefsConfig(), questions, samples, judged, {}, seed=0)
    (record,) = records
    assert (record["chosen"], record["rejected"], record["reference"]) == ("Blue.", "Red.", "Blue.")
    assert record["judge_replies"][0].startswith("The answer says Red. and the reference says blue.")
    # without a reference the score prompt shows none
    from vlmalign.prompts import load_prompt, reference_block

    assert reference_block("") == "" and "Reference answer" not in load_prompt("judge.score").render(
        context_block="", question="q", reference_block=reference_block(""), answer="a")


def test_every_pair_expands_scored_answers_into_all_good_against_poor_pairs(tmp_path):
    """The reward model's pairs from score_threshold records: each answer scoring >= 3 against each
    scoring <= 2, distinct non-empty texts once; the record's provenance kept."""
    from vlmalign.errors import DataError
    from vlmalign.feedback.preferences import every_pair

    record = {"id": "q1", "video": "/v.mp4", "prompt": "<video>\nWhat colour?", "method": "score_threshold",
              "answers": ["Red.", "Blue.", "Red.", "", "Green.", "Red or blue."], "scores": [5, 1, 5, 1, 2, 3],
              "chosen": "Red.", "rejected": "Blue.", "chosen_score": 5, "rejected_score": 1, "judge": "oracle:x"}
    src = tmp_path / "prefs.jsonl"
    src.write_text(json.dumps(record) + "\n")
    rows = [json.loads(line) for line in every_pair(src, tmp_path / "all.jsonl", 3, 2).read_text().splitlines()]
    assert [(r["chosen"], r["rejected"], r["chosen_score"], r["rejected_score"]) for r in rows] == [
        ("Red.", "Blue.", 5, 1), ("Red.", "Green.", 5, 2), ("Red or blue.", "Blue.", 3, 1), ("Red or blue.", "Green.", 3, 2)]
    assert all(r["id"] == "q1" and r["judge"] == "oracle:x" for r in rows)
    assert len(read_preference_pairs(tmp_path / "all.jsonl")) == 4
    src.write_text(json.dumps({**record, "method": "pairwise"}) + "\n")
    with pytest.raises(DataError, match=f"{src}: record 'q1' is no score_threshold record"):
        every_pair(src, tmp_path / "all.jsonl", 3, 2)
