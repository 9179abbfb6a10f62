"""Evaluation suite: judged zero-shot QA (oracle and an OpenAI-compatible judge), existing predictions,
multiple choice, the generative benchmark, resuming a killed eval, and report comparison."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from tests.conftest import sft_overrides
from tests.judge_server import FakeJudgeServer
from vlmalign.cli import main
from vlmalign.config import JudgeConfig, SFTConfig, load_config
from vlmalign.errors import ConfigError, DataError, JudgeError, VlmalignError
from vlmalign.eval.common import Decoding, load_judge_config
from vlmalign.eval.compare import compare_reports
from vlmalign.eval.generative import evaluate_generative, prediction_sets, synthetic_sets
from vlmalign.eval.mcq import evaluate_mcq, extract_choice, read_mcq
from vlmalign.eval.qa import evaluate_qa, read_predictions
from vlmalign.eval.replies import parse_criterion_score, parse_qa_reply
from vlmalign.eval.synthetic import evaluate_synthetic
from vlmalign.feedback.cache import JudgmentCache
from vlmalign.feedback.oracle import Oracle
from vlmalign.model.policy import build_model

REPO = Path(__file__).resolve().parents[1]
FIXTURE = REPO / "tests" / "data" / "videochatgpt_qa_predictions.json"
KEY_ENV = "VLMALIGN_TEST_EVAL_KEY"  # unset: a server on 127.0.0.1 gets a placeholder key


class ScriptedJudgeServer(FakeJudgeServer):
    """The local OpenAI-compatible server, replying what `script(prompt)` says: a text, or an HTTP
    status to fail with. `delay` seconds before each reply (to kill an eval mid-judging)."""

    def __init__(self, script, delay: float = 0.0):
        super().__init__(model="judge-2024-01-01")
        self.script = script
        self.delay = delay

    def handle(self, handler, body):
        prompt = body["messages"][-1]["content"]
        with self.lock:
            self.requests += 1
            self.hits[prompt] += 1
        time.sleep(self.delay)
        reply = self.script(prompt)
        if isinstance(reply, int):
            return self._send(handler, reply, {"error": {"message": "scripted failure", "type": "invalid_request_error"}})
        with self.lock:
            self.answered[prompt] += 1
        self._send(handler, 200, {
            "id": "chatcmpl-1", "object": "chat.completion", "created": int(time.time()), "model": self.model,
            "choices": [{"index": 0, "message": {"role": "assistant", "content": reply}, "finish_reason": "stop"}],
        })


def _line(prompt: str, label: str) -> str:
    return next(line[len(label):].strip() for line in prompt.splitlines() if line.startswith(label))


# Replies for the fixture's predictions: the hand computation in test_predictions_mode_* reads these.
FIXTURE_REPLIES = {
    "The man is jumping.": "{'pred': 'yes', 'score': 5}",
    "A woman.": "{'pred': 'no', 'score': 1}",
    "An onion is being sliced.": "{'pred': 'yes', 'score': 4.8}",
    "She slices a tomato.": "Answer: no. Score: 2",
    "A puppy.": '```json\n{"pred": "yes", "score": 4}\n```',
    "On the grass.": "I am not sure about this one.",  # unparseable
    "It is red.": 400,  # a request the server rejects: the judgment fails
    "three": "{'pred': 'no', 'score': 0}",
}


def fixture_reply(prompt):
    return FIXTURE_REPLIES[_line(prompt, "Predicted answer:")]


def _judge_file(tmp_path, server, **extra) -> Path:
    cfg = {"backend": "openai", "model": "judge-model", "base_url": server.url, "api_key_env": KEY_ENV,
           "max_retries": 0, "timeout": 10.0, **extra}
    path = tmp_path / "judge.yaml"
    path.write_text(json.dumps({"judge": cfg}))  # JSON is YAML
    return path


@pytest.fixture(autouse=True)
def no_key(monkeypatch):
    monkeypatch.delenv(KEY_ENV, raising=False)


@pytest.fixture(scope="module")
def tiny_model(tiny_bench, tmp_path_factory):
    """A saved, untrained tiny model: it answers nonsense, which is all the evaluation needs."""
    out = tmp_path_factory.mktemp("model")
    torch.manual_seed(0)
    cfg = load_config(SFTConfig, "configs/tiny/sft.yaml", sft_overrides(tiny_bench, out / "unused"))
    build_model(cfg.model).save_pretrained(out / "final")
    return out / "final"


@pytest.fixture(scope="module")
def features(tmp_path_factory):
    return str(tmp_path_factory.mktemp("features"))


# ------------------------------------------------------------------------------------- parsers


@pytest.mark.parametrize("reply, expected, as_float", [
    ("{'pred': 'yes', 'score': 4}", (True, 4), (True, 4.0)),
    ("{'pred': 'yes', 'score': 4.8}", (True, 4), (True, 4.8)),  # integer part, as the published protocol
    ('{"pred": "no", "score": "2"}', (False, 2), (False, 2.0)),
    ('Here you go:\n```json\n{"pred": "Yes", "score": 5}\n```', (True, 5), (True, 5.0)),
    ("{'verdict': 'no', 'score': 0}", (False, 0), (False, 0.0)),
    ("Yes. Score: 3", (True, 3), (True, 3.0)),
    ("no, 1", (False, 1), (False, 1.0)),
    ("{'pred': 'yes', 'score': 7}", None, None),  # out of range: unparseable, not clipped
    ("yes or no? score 3", None, None),
    ("{'pred': 'maybe', 'score': 3}", None, None),
    ("Yes, it matches.", None, None),  # no score
    ("Hmm, hard to tell from here.", None, None),
    ("", None, None),
])
def test_parse_qa_reply(reply, expected, as_float):
    assert parse_qa_reply(reply) == expected
    assert parse_qa_reply(reply, float_scores=True) == as_float


@pytest.mark.parametrize("reply, expected", [
    ("{'score': 3}", 3), ('{"score": 4.5}', 4), ("Score: 2", 2), ("I would give it a 5.", 5),
    ("3 or 4", None), ("{'score': 9}", None), ("no idea", None),
])
def test_parse_criterion_score(reply, expected):
    assert parse_criterion_score(reply) == expected


COLOURS = {"A": "red", "B": "green", "C": "blue", "D": "yellow"}


@pytest.mark.parametrize("reply, expected", [
    ("B", "B"), ("(c)", "C"), ("D.", "D"), ("[A]", "A"),
    ("B. green", "B"), ("(A) red", "A"), ("C: blue", "C"), ("d) yellow", "D"),
    ("The answer is C", "C"), ("Answer: (b)", "B"), ("The correct option is D.", "D"), ("answer: d.", "D"), ("The answer is B, not C.", "B"),
    ("The answer is a blue circle.", "C"),
    ("It is green.", "B"), ("A red square.", "A"), ("A green square moves left.", "B"), ("**Blue**", "C"),
    ("I would go with D", "D"), ("A is right", "A"),
    ("red or blue", None), ("Option A or option C", None), ("A square.", None), ("", None), (None, None),
])
def test_extract_choice(reply, expected):
    assert extract_choice(reply, COLOURS) == expected


def test_extract_choice_matches_number_words_and_nested_options():
    counts = {"A": "1", "B": "2", "C": "3", "D": "4"}
    assert extract_choice("There are two objects.", counts) == "B"
    assert extract_choice("Three.", counts) == "C"
    nested = {"A": "red", "B": "dark red", "C": "blue"}
    assert extract_choice("It is dark red.", nested) == "B"
    assert extract_choice("It is red.", nested) == "A"


# -------------------------------------------------------------------------------- oracle path


def test_synthetic_eval_with_the_oracle_end_to_end(tiny_model, tiny_bench, features, tmp_path):
    out = tmp_path / "eval"
    report = evaluate_synthetic(tiny_model, tiny_bench, out, max_new_tokens=6, feature_cache=features, progress=False)
    n = len(json.loads((tiny_bench / "qa_test.json").read_text()))
    assert report["results"]["all"]["n"] == n and set(report["results"]) == {"colour", "count", "direction", "shape", "all"}
    assert 0 <= report["results"]["all"]["accuracy"] <= 1 and 1 <= report["results"]["all"]["score"] <= 5
    assert report["judge"]["id"] == "oracle" and report["generation"]["decoding"] == "greedy"
    for name in ("predictions.jsonl", "judgments.jsonl", "report.json", "report.md", "generations.jsonl"):
        assert (out / name).is_file(), name
    assert "oracle" in (out / "report.md").read_text() and report["table"] in (out / "report.md").read_text()
    judgment = json.loads((out / "judgments.jsonl").read_text().splitlines()[0])
    assert judgment["status"] == "ok" and judgment["model"] == "oracle" and judgment["date"] and judgment["raw"]

    # Same model and settings: the answers are reused, nothing is generated again.
    again = evaluate_synthetic(tiny_model, tiny_bench, out, max_new_tokens=6, feature_cache=features, progress=False)
    assert (again["generation"]["generated"], again["generation"]["reused"]) == (0, n)
    assert again["results"] == report["results"]
    # Sampling is recorded, and other decoding settings mean new answers.
    sampled = evaluate_qa("synthetic", out, JudgeConfig(backend="oracle"), data=tiny_bench / "qa_test.json",
                          model_dir=tiny_model, decoding=Decoding(temperature=0.7, max_new_tokens=6, seed=3),
                          feature_cache=features, progress=False)
    gen = sampled["generation"]
    assert (gen["decoding"], gen["temperature"], gen["seed"], gen["generated"]) == ("sampled", 0.7, 3, n)


def test_oracle_judges_existing_predictions(tiny_bench, tmp_path):
    """Predictions mode with the oracle: its own reference answers score 100 %, a wrong one does not."""
    oracle = Oracle.from_dir(tiny_bench)
    rows = json.loads((tiny_bench / "qa_test.json").read_text())
    preds = [{"id": r["question_id"], "video_name": r["video_name"], "question": r["question"], "answer": r["answer"],
              "pred": oracle.reference(r["video_name"], r["question"]) if i else "I do not know."}
             for i, r in enumerate(rows)]
    path = tmp_path / "preds.json"
    path.write_text(json.dumps(preds))
    report = evaluate_qa("synthetic", tmp_path / "out", JudgeConfig(backend="oracle", bench=str(tiny_bench)),
                         predictions=path, progress=False)
    assert report["results"]["all"]["accuracy"] == pytest.approx((len(rows) - 1) / len(rows))
    assert report["generation"] is None and report["model"] is None


# -------------------------------------------------------------------------------- openai path


def qa_reply(prompt):
    """A deterministic judge: yes (5) when the prediction contains the reference's first word, else no (1)."""
    reference = _line(prompt, "Reference answer:").lower().strip(".").split()[0]
    if reference in _line(prompt, "Predicted answer:").lower():
        return "{'pred': 'yes', 'score': 5}"
    return "{'pred': 'no', 'score': 1}"


def test_synthetic_eval_with_an_openai_judge_end_to_end_and_resumed(tiny_model, tiny_bench, features, tmp_path, capsys):
    out = tmp_path / "eval"
    with ScriptedJudgeServer(qa_reply) as server:
        args = ["eval", "synthetic", "--model", str(tiny_model), "--data", str(tiny_bench), "--judge",
                str(_judge_file(tmp_path, server)), "--out", str(out), "--max-new-tokens", "6",
                "--feature-cache", features]
        assert main(args) == 0
        first = server.requests
        prompts = [json.loads(line) for line in (out / "predictions.jsonl").read_text().splitlines()]
        assert first == len({(p["question"], p["answer"], p["pred"]) for p in prompts}) > 0
        report = json.loads((out / "report.json").read_text())
        assert report["judge"]["id"] == "openai:judge-model" and report["judge"]["answered_by"] == ["judge-2024-01-01"]
        assert report["judge"]["prompts"] == ["eval.qa@v1"] and report["judge"]["endpoint"] == server.url
        assert report["judging"] == {"items": len(prompts), "cached": 0, "sent": first, "failed": 0, "parse_errors": 0,
                                     "failure_rate": 0.0, "reasked": 0, "reask_fixed": 0}
        assert {"colour", "all"} <= set(report["results"]) and report["results"]["all"]["judged"] == len(prompts)
        md = (out / "report.md").read_text()
        assert "openai:judge-model" in md and "judge-2024-01-01" in md and "eval.qa@v1" in md
        judgment = json.loads((out / "judgments.jsonl").read_text().splitlines()[0])
        assert judgment["raw"].startswith("{'pred'") and judgment["model"] == "judge-2024-01-01" and judgment["date"]

        # Re-running sends nothing: every judgment comes from the cache, the answers from the journal.
        capsys.readouterr()
        assert main(args) == 0
        assert server.requests == first
        again = json.loads((out / "report.json").read_text())
        assert again["judging"]["cached"] == len(prompts) and again["judging"]["sent"] == 0
        assert again["results"] == report["results"]
        assert f"{len(prompts)} judgments from the cache, 0 prompts sent" in capsys.readouterr().out


# ---------------------------------------------------------------------------- predictions mode


def test_predictions_mode_reproduces_hand_computed_accuracy_and_score(tmp_path):
    with ScriptedJudgeServer(fixture_reply) as server:
        judge = _judge_file(tmp_path, server)
        out = tmp_path / "out"
        assert main(["eval", "msvd-qa", "--predictions", str(FIXTURE), "--judge", str(judge), "--out", str(out)]) == 0
        # 8 prompts, and the unreadable reply asked again once (the script answers the re-ask unreadably too)
        assert server.requests == 9
        report = json.loads((out / "report.json").read_text())
        assert (report["judging"]["reasked"], report["judging"]["reask_fixed"]) == (1, 0)
        assert report["judging"]["failure_rate"] == pytest.approx(2 / 8)
        # Judged: 6 of 8 (one unparseable reply, one failed request); yes: 3 -> accuracy 3/6.
        # Scores, integer part: 5, 1, int(4.8) = 4, 2, 4, 0 -> 16 / 6.
        assert report["results"] == {"all": {"n": 8, "judged": 6, "yes": 3, "no": 3, "failed": 1, "parse_errors": 1,
                                             "accuracy": 0.5, "score": pytest.approx(16 / 6)}}
        statuses = [json.loads(line)["status"] for line in (out / "judgments.jsonl").read_text().splitlines()]
        assert statuses == ["ok"] * 5 + ["parse_error", "failed", "ok"]
        assert "1 judgments failed and 1 replies could not be parsed" in (out / "report.md").read_text()
        # Repeated video names become unique ids.
        ids = [json.loads(line)["id"] for line in (out / "predictions.jsonl").read_text().splitlines()]
        assert ids[:2] == ["v_jump01", "v_jump01#2"]

        # A re-run asks again only for the failed judgment; with float scores 4.8 counts as 4.8.
        assert main(["eval", "msvd-qa", "--predictions", str(FIXTURE), "--judge", str(judge), "--out", str(out),
                     "--float-scores"]) == 0
        assert server.requests == 10
        report = json.loads((out / "report.json").read_text())
        assert report["results"]["all"]["score"] == pytest.approx((5 + 1 + 4.8 + 2 + 4 + 0) / 6)
        assert report["judging"]["cached"] == 7 and report["judging"]["sent"] == 1


def test_killed_eval_resumes_without_resending_judged_items(tmp_path):
    with ScriptedJudgeServer(fixture_reply, delay=0.3) as server:
        judge = _judge_file(tmp_path, server, concurrency=1, reask=0)  # re-asks resume as tested in test_judges
        out = tmp_path / "out"
        cmd = [sys.executable, "-m", "vlmalign.cli", "eval", "msvd-qa", "--predictions", str(FIXTURE), "--judge",
               str(judge), "--out", str(out)]
        proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                env={**os.environ, "TOKENIZERS_PARALLELISM": "false"})
        deadline = time.time() + 60
        while sum(server.answered.values()) < 3 and time.time() < deadline and proc.poll() is None:
            time.sleep(0.02)
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
        assert not (out / "report.json").exists()  # killed mid-judging
        with JudgmentCache(out / "judge_cache.sqlite") as cache:
            judged = len(cache)
        assert 2 <= judged < 8
        before = dict(server.hits)
        assert main(["eval", "msvd-qa", "--predictions", str(FIXTURE), "--judge", str(judge), "--out", str(out)]) == 0
        resent = {p: n - before.get(p, 0) for p, n in server.hits.items() if n > before.get(p, 0)}
        assert len(resent) == 8 - judged and all(n == 1 for n in resent.values())
        report = json.loads((out / "report.json").read_text())
        assert report["judging"]["cached"] == judged and report["judging"]["sent"] == 8 - judged


def test_prediction_file_errors_name_file_line_and_field(tmp_path):
    bad = tmp_path / "preds.jsonl"
    bad.write_text('{"id": "v1", "question": "q?", "answer": "a", "pred": "p"}\n'
                   '{"id": "v2", "question": "q?", "answer": "a"}\n')
    with pytest.raises(DataError, match=rf"{bad}:2: missing field 'pred'"):
        read_predictions(bad)
    bad.write_text('{"question": "q?", "answer": "a", "pred": "p"}\n')
    with pytest.raises(DataError, match=rf"{bad}:1: missing field 'video_name' \(or 'id', 'video'\)"):
        read_predictions(bad)
    bad.write_text('{"id": "v1", "question": ["q?"], "answer": "a", "pred": "p"}\n')
    with pytest.raises(DataError, match=rf"{bad}:1: field 'question' must be a string"):
        read_predictions(bad)


def test_judge_config_errors_name_the_file_and_key(tmp_path, capsys):
    path = tmp_path / "judge.yaml"
    path.write_text("judge:\n  backend: openai\n  modle: gpt-4o\n")
    with pytest.raises(ConfigError, match=rf"{path}.*unknown key 'judge.modle'.*did you mean 'judge.model'"):
        load_judge_config(str(path))
    path.write_text("backend: openai\n")
    with pytest.raises(ConfigError, match=rf"{path}.*unknown key 'backend'"):
        load_judge_config(str(path))
    with pytest.raises(ConfigError, match="bundled: .*gpt-3.5-turbo-0613.*oracle"):
        load_judge_config("no-such-judge")
    cfg, source = load_judge_config("gpt-3.5-turbo-0613", ["judge.concurrency=2"])
    assert (cfg.backend, cfg.model, cfg.concurrency, cfg.temperature) == ("openai", "gpt-3.5-turbo-0613", 2, 0.0)
    assert source.endswith("configs/judges/gpt-3.5-turbo-0613.yaml")

    def one_error(args):
        capsys.readouterr()
        assert main(args) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith("error: ")
        return err[0]

    assert "needs --judge" in one_error(["eval", "msvd-qa", "--predictions", str(FIXTURE)])
    assert "CLIP-score needs no judge" in one_error(["eval", "retrieval", "--predictions", str(FIXTURE), "--judge", "x"])
    assert "drop --model" in one_error(["eval", "msvd-qa", "--predictions", str(FIXTURE), "--model", "m",
                                        "--judge", "oracle"])
    assert "judge.bench" in one_error(["eval", "msvd-qa", "--predictions", str(FIXTURE), "--judge", "oracle",
                                       "--out", str(tmp_path / "o")])


# ------------------------------------------------------------------------------ multiple choice


def test_mcq_model_and_predictions(tiny_model, tiny_bench, features, tmp_path):
    mcq = tiny_bench / "mcq_test.json"
    report = evaluate_mcq("video-mme", tmp_path / "model", data=mcq, model_dir=tiny_model,
                          decoding=Decoding(max_new_tokens=4), feature_cache=features, progress=False)
    items = read_mcq(mcq)
    assert report["results"]["all"]["n"] == len(items) and report["judge"] is None
    assert (tmp_path / "model" / "predictions.jsonl").is_file() and (tmp_path / "model" / "report.md").is_file()

    # Replies in several forms; every third one wrong (the next letter).
    rows = json.loads(mcq.read_text())
    styles = ["{letter}", "The answer is ({letter}).", "{text}"]
    expected_right = {}
    for i, (row, item) in enumerate(zip(rows, items)):
        letter = item.answer if i % 3 else "ABCD"[("ABCD".index(item.answer) + 1) % 4]
        row["pred"] = styles[i % 3].format(letter=letter, text=item.options[letter].capitalize() + ".")
        expected_right.setdefault(row["task_type"], []).append(letter == item.answer)
    row_bad = dict(rows[0], pred="Hmm.")
    preds = tmp_path / "preds.json"
    preds.write_text(json.dumps(rows + [row_bad]))
    report = evaluate_mcq("video-mme", tmp_path / "preds", predictions=preds, progress=False)
    expected_right[rows[0]["task_type"]].append(False)
    for category, right in expected_right.items():
        assert report["results"][category]["accuracy"] == pytest.approx(sum(right) / len(right)), category
    assert report["results"]["all"]["unparsed"] == 1 and report["results"]["all"]["n"] == len(rows) + 1


def test_mcq_reader_errors(tmp_path):
    path = tmp_path / "mcq.json"
    path.write_text(json.dumps([{"video_name": "v1", "question": "q?", "options": ["A. x", "B. y"], "answer": "C"}]))
    with pytest.raises(DataError, match=rf"{path}:1: field 'answer' 'C' is neither an option letter \(A, B\)"):
        read_mcq(path)
    path.write_text(json.dumps([{"video_name": "v1", "question": "q?", "options": "A. x", "answer": "A"}]))
    with pytest.raises(DataError, match=rf"{path}:1: field 'options'"):
        read_mcq(path)
    path.write_text(json.dumps([{"videoID": "v1", "question": "q?", "options": {"A": "x", "B": "y"}, "answer": "y",
                                 "duration": "short"}]))
    (item,) = read_mcq(path)
    assert (item.answer, item.duration, item.options) == ("B", "short", {"A": "x", "B": "y"})


# --------------------------------------------------------------------------- generative benchmark


CRITERION_SCORES = {"correctness": 4, "detail": 2, "context": 5, "temporal": 3, "consistency": 1}


def criterion_reply(prompt):
    for criterion, marker in (("correctness", "correctness of information"), ("detail", "detail orientation"),
                              ("context", "contextual understanding"), ("temporal", "temporal understanding"),
                              ("consistency", "Criterion: consistency")):
        if marker in prompt:
            return f"{{'score': {CRITERION_SCORES[criterion]}}}"
    raise AssertionError(prompt)


def test_generative_benchmark_five_criteria(tiny_model, tiny_bench, features, tmp_path):
    with pytest.raises(JudgeError, match="judge.bench"):
        evaluate_generative(tmp_path, JudgeConfig(backend="oracle"), synthetic_sets(tiny_bench), model_dir=tiny_model)
    with ScriptedJudgeServer(criterion_reply) as server:
        cfg, _ = load_judge_config(str(_judge_file(tmp_path, server)))
        report = evaluate_generative(tmp_path / "gen", cfg, synthetic_sets(tiny_bench), model_dir=tiny_model,
                                     decoding=Decoding(max_new_tokens=6), feature_cache=features, progress=False)
        general = len(json.loads((tiny_bench / "generative_test.json").read_text()))
        consistency = len(json.loads((tiny_bench / "consistency_test.json").read_text()))
        assert server.requests == 4 * general + consistency
        consistency_prompt = next(p for p in server.hits if "Criterion: consistency" in p)
        rows = [json.loads(line) for line in (tmp_path / "gen" / "predictions.jsonl").read_text().splitlines()]
        cons = next(r for r in rows if r["set"] == "consistency")
        assert f"Question 2: {cons['Q2']}" in consistency_prompt and cons["Q1"] != cons["Q2"]
        # Our own predictions.jsonl holds every set; re-judging it in place is all cache hits.
        sent = server.requests
        again = evaluate_generative(tmp_path / "gen", cfg, prediction_sets(tmp_path / "gen" / "predictions.jsonl"),
                                    predictions=True, progress=False)
        assert server.requests == sent and again["judging"]["sent"] == 0
    results = report["results"]
    assert {c: results[c]["score"] for c in CRITERION_SCORES} == CRITERION_SCORES
    assert results["average"] == {"n": 5, "score": pytest.approx(sum(CRITERION_SCORES.values()) / 5)}
    assert report["judge"]["prompts"] == [f"eval.{c}@v1" for c in CRITERION_SCORES]
    assert again["results"] == results

    # Existing predictions: only the general set given, so temporal and consistency are not evaluated.
    preds = tmp_path / "general_preds.json"
    general_rows = [{k: r[k] for k in ("id", "video_name", "Q", "A", "pred")} for r in rows if r["set"] == "general"]
    preds.write_text(json.dumps(general_rows))
    with ScriptedJudgeServer(criterion_reply) as server:
        cfg, _ = load_judge_config(str(_judge_file(tmp_path, server)))
        report = evaluate_generative(tmp_path / "gen-preds", cfg, {"general": preds}, predictions=True, progress=False)
    assert set(report["results"]) == {"correctness", "detail", "context", "average"}
    assert "temporal | - | - | not evaluated" in report["table"]


def test_generative_benchmark_with_the_oracle(tiny_model, tiny_bench, features, tmp_path, capsys):
    """True descriptions score 5 on every criterion and "Nothing." 0, so each mean is hand-computed."""
    gen = json.loads((tiny_bench / "generative_test.json").read_text())[0]
    cons = json.loads((tiny_bench / "consistency_test.json").read_text())[0]
    rows = [dict(gen, set=name, question_id=f"{name}-{i}", pred=pred) for name in ("general", "temporal")
            for i, pred in enumerate((gen["A"], "Nothing."))] + [
            dict(cons, set="consistency", pred1=cons["A"], pred2=cons["A"]),
            dict(cons, set="consistency", question_id="again", pred1=cons["A"], pred2="Nothing.")]
    preds = tmp_path / "preds.jsonl"
    preds.write_text("".join(json.dumps(r) + "\n" for r in rows))
    cfg = JudgeConfig(backend="oracle", bench=str(tiny_bench))
    report = evaluate_generative(tmp_path / "oracle", cfg, prediction_sets(preds), predictions=True, progress=False)
    assert report["results"]["average"] == {"n": 5, "score": pytest.approx(2.5)}
    for criterion in ("correctness", "detail", "context", "temporal", "consistency"):
        assert report["results"][criterion] == {"n": 2, "judged": 2, "failed": 0, "parse_errors": 0,
                                                "score": pytest.approx(2.5)}, criterion
    assert report["judge"]["id"] == "oracle" and report["scores"] == "continuous (oracle)"
    judged = [json.loads(line) for line in (tmp_path / "oracle" / "judgments.jsonl").read_text().splitlines()]
    assert len(judged) == 10 and all(r["raw"] and r["judge"] == "oracle" for r in judged)

    # A video the benchmark does not know is named with its set and item.
    rows[1]["video_name"] = "vid_99999"  # general-1
    preds.write_text("".join(json.dumps(r) + "\n" for r in rows))
    with pytest.raises(VlmalignError, match=r"general set, item 'general-1'.*vid_99999"):
        evaluate_generative(tmp_path / "bad", cfg, prediction_sets(preds), predictions=True, progress=False)

    # The command line: a synthetic benchmark folder is judged by its oracle unless --judge says otherwise.
    assert main(["eval", "generative", "--model", str(tiny_model), "--data", str(tiny_bench), "--out",
                 str(tmp_path / "cli"), "--max-new-tokens", "8", "--feature-cache", str(features)]) == 0
    report = json.loads((tmp_path / "cli" / "report.json").read_text())
    assert report["judge"]["backend"] == "oracle" and report["results"]["average"]["n"] == 5
    assert f"| consistency | {report['results']['consistency']['n']} | " in capsys.readouterr().out


# ----------------------------------------------------------------------------------- compare


def test_compare_reports_side_by_side(tmp_path, capsys):
    def report(folder, accuracy, judge_id):
        folder.mkdir(parents=True)
        (folder / "report.json").write_text(json.dumps({
            "benchmark": "msvd-qa", "task": "qa", "judge": {"id": judge_id, "prompts": ["eval.qa@v1"]},
            "judging": {"failed": 0, "parse_errors": 0},
            "results": {"all": {"n": 10, "accuracy": accuracy, "score": 3.0}}}))
        return str(folder)

    sft = report(tmp_path / "sft" / "eval", 0.5, "openai:m")
    rlaif = report(tmp_path / "rlaif" / "eval", 0.625, "openai:m")
    other = report(tmp_path / "other" / "eval", 0.7, "openai:other")
    assert main(["eval", "compare", sft, rlaif]) == 0
    printed = capsys.readouterr().out
    assert f"| group | metric | {sft} | {rlaif} |" in printed and "| all | accuracy % | 50.0 | 62.5 |" in printed
    assert (tmp_path / "compare" / "compare.md").is_file()
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        assert "No chart: matplotlib is not installed" in printed
    else:
        assert (tmp_path / "compare" / "compare.png").is_file()
    result = compare_reports([sft, other], tmp_path / "cmp")
    assert any("not comparable" in n for n in result["notes"])
    with pytest.raises(DataError, match="no such report"):
        compare_reports([sft, str(tmp_path / "missing")])


def test_generation_journal_resumes_and_drops_a_torn_last_line(tmp_path):
    """Answers already in the journal are reused without loading the model; a line cut by a kill is dropped."""
    from vlmalign.eval.common import JOURNAL, Request, generate, model_signature

    model = tmp_path / "model"
    model.mkdir()
    (model / "model.json").write_text("{}")  # never loaded: nothing is left to generate
    decoding = Decoding(max_new_tokens=4)
    settings = {"model": model_signature(model), "decoding": {"temperature": 0.0, "top_p": 1.0, "max_new_tokens": 4,
                                                               "batch_size": 16, "seed": 0}}
    journal = tmp_path / JOURNAL
    lines = [{"settings": settings}, {"key": "a", "video": "v.mp4", "question": "q1?", "pred": "one"},
             {"key": "b", "video": "v.mp4", "question": "q2?", "pred": "two"}]
    journal.write_text("".join(json.dumps(x) + "\n" for x in lines) + '{"key": "c", "vid')
    answers, stats = generate(model, [Request("a", "v.mp4", "q1?"), Request("b", "v.mp4", "q2?")], decoding, tmp_path,
                              progress=False)
    assert answers == {"a": "one", "b": "two"} and (stats.generated, stats.reused) == (0, 2)
    assert journal.read_text().splitlines() == [json.dumps(x) for x in lines]


# ---------------------------------------------------------------------- caption-grounded QA (LLaVA-Hound)


def test_caption_grounded_qa_reports_acc_and_score_as_llava_hound(tmp_path):
    """The released test file carries captions; the judge reads caption, question, reference and
    prediction and scores 1-5; accuracy is the share of scores >= 3. Hand-computed: scores 5, 2, 3 and
    one reply without a score (asked again once, still unreadable): acc 2/3, score 10/3."""
    data = tmp_path / "msrvtt.qa.jsonl"
    data.write_text("\n".join(json.dumps(r) for r in [
        {"id": "a", "video": "frames/v1", "caption": "A man jumps into a pool.",
         "conversations": [{"from": "human", "value": "<video>\nWhat does the man do?"}, {"from": "gpt", "value": "He jumps."}]},
        {"id": "b", "video": "frames/v2", "caption": "A cat sleeps on a sofa.", "question": "What animal is shown?",
         "answer": "A cat."},
        {"id": "c", "video": "frames/v3", "caption": "Two cars race.", "question": "How many cars?", "answer": "Two."},
        {"id": "d", "video": "frames/v4", "caption": "A dog runs.", "question": "What runs?", "answer": "A dog."},
    ]))
    preds = tmp_path / "preds.json"
    preds.write_text(json.dumps([
        {"id": "a", "video_name": "v1", "question": "What does the man do?", "answer": "He jumps.", "pred": "He jumps in."},
        {"id": "b", "video_name": "v2", "question": "What animal is shown?", "answer": "A cat.", "pred": "A dog."},
        {"id": "c", "video_name": "v3", "question": "How many cars?", "answer": "Two.", "pred": "Some cars."},
        {"id": "d", "video_name": "v4", "question": "What runs?", "answer": "A dog.", "pred": "An animal."},
    ]))
    replies = {"He jumps in.": "Explanation: right.\nScore: 5", "A dog.": "Explanation: wrong animal.\nScore: 2",
               "Some cars.": "Explanation: vague.\nScore: 3", "An animal.": "I cannot tell."}

    def script(prompt):
        assert "Caption: " in prompt and "Reference answer: " in prompt
        return replies[_line(prompt, "Predicted answer:")]

    with ScriptedJudgeServer(script) as server:
        judge = _judge_file(tmp_path, server)
        out = tmp_path / "out"
        assert main(["eval", "msrvtt-caption-qa", "--predictions", str(preds), "--data", str(data), "--judge", str(judge),
                     "--out", str(out)]) == 0
        sent = list(server.hits)
    report = json.loads((out / "report.json").read_text())
    assert report["acc/score"] == f"{100 * 2 / 3:.2f}/{10 / 3:.2f}"
    a = report["results"]["all"]
    assert (a["judged"], a["yes"], a["parse_errors"]) == (3, 2, 1)
    assert any("Caption: A man jumps into a pool." in p and "Question: What does the man do?" in p for p in sent)
    assert report["judging"]["reasked"] == 1 and "acc/score (as LLaVA-Hound reports it)" in (out / "report.md").read_text()
    records = [json.loads(line) for line in (out / "judgments.jsonl").read_text().splitlines()]
    assert records[1]["raw"].startswith("Explanation: wrong animal.")  # the explanation is kept
    # the command line offers every QA benchmark the evaluation knows (the CLI keeps its own list)
    from vlmalign.cli import EVAL_BENCHMARKS
    from vlmalign.eval.command import QA_BENCHMARKS

    assert set(QA_BENCHMARKS) <= set(EVAL_BENCHMARKS)
    # without --data there are no captions: the command says what it needs
    assert main(["eval", "msrvtt-caption-qa", "--predictions", str(preds), "--judge", str(judge),
                 "--out", str(tmp_path / "x")]) == 2
