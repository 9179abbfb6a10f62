"""Judges and their cache: oracle, OpenAI-compatible (against a local faulty server) and hf backends."""

import asyncio
import json
import logging
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from tests.conftest import sft_overrides
from tests.judge_server import GARBAGE, FakeJudgeServer, judge_reply
from vlmalign.config import JudgeConfig, PrefsConfig, SFTConfig, load_config
from vlmalign.errors import JudgeError
from vlmalign.feedback.cache import CachedJudgment, JudgmentCache, judgment_key
from vlmalign.feedback.judges import JudgeRequest, OracleJudge, build_judge
from vlmalign.feedback.oracle import Oracle
from vlmalign.feedback.preferences import Question, build_records, judge_stats
from vlmalign.model.generation import Sample
from vlmalign.prompts import parse_score

REPO = Path(__file__).resolve().parents[1]
KEY_ENV = "VLMALIGN_TEST_JUDGE_KEY"


# ------------------------------------------------------------------------------------------ cache


def _record(value=1, raw="B", parse_ok=True):
    return CachedJudgment("openai:m", "judge.compare@v1", "compare", raw, value, parse_ok, "m-2024")


def test_cache_round_trip_and_persistence(tmp_path):
    path = tmp_path / "sub" / "cache.sqlite"
    values = {"a": 1, "b": [2, 0, 1], "c": "a caption", "d": None}
    with JudgmentCache(path) as cache:
        for k, v in values.items():
            cache.put(k, _record(v, parse_ok=v is not None))
        assert cache.get("missing") is None
        assert cache.get("b").value == [2, 0, 1]
        assert len(cache) == 4
    with JudgmentCache(path) as again:  # a new instance reads what the first one committed
        assert len(again) == 4
        got = {k: again.get(k) for k in values}
        assert {k: r.value for k, r in got.items()} == values
        assert got["d"].parse_ok is False and got["a"].parse_ok is True
        assert (got["a"].raw, got["a"].model, got["a"].judge, got["a"].prompt) == ("B", "m-2024", "openai:m", "judge.compare@v1")
        assert got["a"].created.endswith("+00:00")
        stats = again.stats()
        assert (stats["judgments"], stats["parse_errors"], stats["hits"], stats["misses"]) == (4, 1, 4, 0)


def test_cache_key_depends_on_every_input():
    base = ("openai:m", "judge.compare@v1", "text", "videos/a.mp4", {"temperature": 0.0})
    key = judgment_key(*base)
    assert key == judgment_key(*base) and len(key) == 64
    changed = [
        ("openai:other", *base[1:]),
        (base[0], "judge.compare@v2", *base[2:]),  # a prompt version bump misses the cache
        (*base[:2], "text!", *base[3:]),
        (*base[:3], "videos/b.mp4", base[4]),
        (*base[:3], ["f1.png", "f2.png"], base[4]),
        (*base[:4], {"temperature": 0.7}),
    ]
    assert len({judgment_key(*c) for c in changed} | {key}) == len(changed) + 1
    assert judgment_key(*base[:4], {"b": 1, "a": 2}) == judgment_key(*base[:4], {"a": 2, "b": 1})


def test_corrupt_or_foreign_cache_file_is_a_clear_error(tmp_path):
    junk = tmp_path / "junk.sqlite"
    junk.write_bytes(b"this is not a database at all " * 200)
    with pytest.raises(JudgeError, match=f"{junk}.*not a usable SQLite database"):
        JudgmentCache(junk)
    import sqlite3

    foreign = tmp_path / "foreign.sqlite"
    with sqlite3.connect(foreign) as db:
        db.execute("CREATE TABLE users (name TEXT)")
    with pytest.raises(JudgeError, match=f"{foreign}.*something else"):
        JudgmentCache(foreign)


def test_cache_is_shared_by_threads_and_processes(tmp_path):
    path = tmp_path / "shared.sqlite"
    cache = JudgmentCache(path)

    def write(prefix):
        for i in range(50):
            cache.put(f"{prefix}{i}", _record(i))

    threads = [threading.Thread(target=write, args=(f"t{n}-",)) for n in range(4)]
    script = (
        "import sys; from vlmalign.feedback.cache import JudgmentCache, CachedJudgment\n"
        "c = JudgmentCache(sys.argv[1])\n"
        "for i in range(50): c.put(f'p{sys.argv[2]}-{i}', CachedJudgment('j', 'p@1', 'score', 'Score: 3', 3, True, 'm'))\n"
    )
    procs = [subprocess.Popen([sys.executable, "-c", script, str(path), str(n)], cwd=REPO) for n in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert [p.wait(timeout=60) for p in procs] == [0, 0]
    assert len(cache) == 4 * 50 + 2 * 50
    assert JudgmentCache(path).get("p1-49").value == 3


# ----------------------------------------------------------------------------------------- oracle


@pytest.fixture(scope="module")
def bench_items(tiny_bench):
    """(video, question, right answer, wrong answer) for the benchmark's test questions."""
    oracle = Oracle.from_dir(tiny_bench)
    items = []
    for r in json.loads((tiny_bench / "qa_test.json").read_text()):
        right = oracle.reference(r["video_name"], r["question"])
        items.append((r["video_name"], r["question"], right, "I am not sure."))
    return items


def _oracle_cfg(bench, **kw):
    return JudgeConfig(backend="oracle", bench=str(bench), **kw)


def test_oracle_judge_agrees_with_the_oracle(tiny_bench, bench_items, tmp_path):
    oracle = Oracle.from_dir(tiny_bench)
    judge = build_judge(_oracle_cfg(tiny_bench), tmp_path / "cache.sqlite", progress=False)
    assert isinstance(judge, OracleJudge) and judge.id.startswith("oracle:")
    pairs = [JudgeRequest(v, q, (w, r) if i % 2 else (r, w)) for i, (v, q, r, w) in enumerate(bench_items)]
    compared = judge.compare(pairs)
    assert [j.value for j in compared] == [oracle.compare(p.video, p.question, *p.answers) for p in pairs]
    assert [j.value for j in compared] == [i % 2 for i in range(len(pairs))]
    assert all((j.status, j.model, j.cached, j.kind) == ("ok", "oracle", False, "compare") for j in compared)
    assert compared[0].prompt.startswith("oracle.compare@") and "score 5" in compared[0].raw

    scores = judge.score([JudgeRequest(v, q, (a,)) for v, q, r, w in bench_items for a in (r, w)])
    assert [j.value for j in scores] == [oracle.score(v, q, a) for v, q, r, w in bench_items for a in (r, w)]
    ranks = judge.rank([JudgeRequest(v, q, (w, r, r + " Really.")) for v, q, r, w in bench_items])
    assert [j.value for j in ranks] == [oracle.rank(v, q, [w, r, r + " Really."]) for v, q, r, w in bench_items]

    # The oracle ignores context, so a request with a narrative is the same judgment, from the cache.
    again = judge.compare([JudgeRequest(p.video, p.question, p.answers, context="A red square.") for p in pairs])
    assert all(j.cached for j in again) and [j.value for j in again] == [j.value for j in compared]
    stats = judge.stats()
    assert stats["cache_hits"] == len(pairs) and stats["parse_errors"] == stats["failures"] == 0

    unknown = judge.score([JudgeRequest(bench_items[0][0], "Who directed this film?", ("Nobody.",))])[0]
    assert unknown.status == "failed" and "matches no template" in unknown.error
    with pytest.raises(JudgeError, match="cannot generate free text"):
        judge.complete([(None, "Describe the video.")])


def test_oracle_swap_check(tiny_bench, bench_items, tmp_path):
    judge = build_judge(_oracle_cfg(tiny_bench, swap_check=True), tmp_path / "cache.sqlite", progress=False)
    video, question, right, wrong = bench_items[0]
    clear, tie = judge.compare([
        JudgeRequest(video, question, (wrong, right)),
        # equally wrong, the second longer: a tie both ways round, not a preference for the shorter
        JudgeRequest(video, question, ("Hmm.", "Umm, no idea.")),
    ])
    assert (clear.status, clear.value) == ("ok", 1) and isinstance(clear.raw, tuple) and len(clear.raw) == 2
    assert (tie.status, tie.value) == ("tie", None) and "score 1" in tie.raw[0]
    assert judge.stats()["inconsistent"] == 0 and judge.stats()["prompts"] == 4


def test_oracle_tie_is_no_pair(tiny_bench, bench_items, tmp_path):
    """Two answers the oracle scores the same are a tie, cached as one, and make no preference pair."""
    judge = build_judge(_oracle_cfg(tiny_bench), tmp_path / "cache.sqlite", progress=False)
    video, question, right, wrong = bench_items[0]
    requests = [JudgeRequest(video, question, (wrong, wrong + " " + wrong)), JudgeRequest(video, question, (right, wrong))]
    tie, clear = judge.compare(requests)
    assert (tie.status, tie.value, clear.status, clear.value) == ("tie", None, "ok", 0)
    again = build_judge(_oracle_cfg(tiny_bench), tmp_path / "cache.sqlite", progress=False).compare(requests)
    assert [(j.status, j.value, j.cached) for j in again] == [("tie", None, True), ("ok", 0, True)]

    cfg = PrefsConfig()  # pairwise
    questions = [Question(str(i), video, question) for i in range(2)]
    samples = [[Sample(a, [], [-1.0], True) for a in r.answers] for r in requests]
    records, dropped = build_records(cfg, questions, samples, [tie, clear], {}, seed=0)
    assert dropped == {"tie": 1} and [(r["chosen"], r["rejected"]) for r in records] == [(right, wrong)]
    stats = judge_stats([tie, clear])
    assert stats["by_status"] == {"tie": 1, "ok": 1} and stats["failure_rate"] == 0.0


# ----------------------------------------------------------------------------------------- openai


@pytest.fixture(scope="module", autouse=True)
def warm_openai_client():
    """The client's first request pays for lazy imports (~0.3 s), a share of the short timeouts
    the fault tests use; pay it once here, against a throwaway server."""
    import openai

    async def one(url):
        async with openai.AsyncOpenAI(api_key="EMPTY", base_url=url, max_retries=0) as client:
            await client.chat.completions.create(model="m", messages=[{"role": "user", "content": "hi"}])

    with FakeJudgeServer() as server:
        asyncio.run(one(server.url))


def _openai_cfg(server, **kw):
    # A timeout well above a loaded machine's reply time: a reply that misses it is asked again and
    # answered twice, which the tests would read as a judge asking twice. Slow faults sleep past it.
    base = dict(backend="openai", model="judge-model", base_url=server.url, api_key_env=KEY_ENV, max_retries=8,
                backoff_base=0.005, timeout=1.0, concurrency=8)
    return JudgeConfig(**{**base, **kw})


def _compare_requests(n, tag="q"):
    return [JudgeRequest(f"videos/v{i}.mp4", f"What happens in clip {tag}{i}?", (f"answer {i * 7 % 5}", f"answer {i % 3}"),
                         context=f"Notes {i}." if i % 2 else "") for i in range(n)]


def _score_requests(n, tag="s"):
    return [JudgeRequest(f"videos/v{i}.mp4", f"What colour is item {tag}{i}?", ("Red." + " really" * i,)) for i in range(n)]


def test_openai_judge_survives_faults_and_never_judges_twice(tmp_path, monkeypatch):
    monkeypatch.delenv(KEY_ENV, raising=False)  # local server: a placeholder key is used
    with FakeJudgeServer(seed=3, rate_limit=0.2, server_error=0.15, slow=0.08, garbage=0.15) as server:
        cfg = _openai_cfg(server, reask=0)  # unreadable replies stay unread here; re-asking is tested below
        judge = build_judge(cfg, tmp_path / "cache.sqlite", progress=False)
        compares, scores = _compare_requests(30), _score_requests(15)
        out_c, out_s = judge.compare(compares), judge.score(scores)

        assert len(out_c) == len(compares) and len(out_s) == len(scores)
        results = out_c + out_s
        assert {j.status for j in results} <= {"ok", "parse_error"}  # none lost, none failed
        # every fault kind happened and was survived
        assert all(server.faults[k] > 0 for k in ("429", "500", "slow", "garbage")), server.faults
        # each prompt was answered exactly once (retries only repeat requests that got no answer)
        sent = [b["messages"][-1]["content"] for b in server.bodies]
        assert set(server.answered) == set(sent) and set(server.answered.values()) == {1}
        assert len(set(sent)) == len(results)
        # the video never travels; the context stands in for it
        assert not any("<video>" in s for s in sent)
        assert any("Notes 1." in s for s in sent) and not any("Notes 0." in s for s in sent)
        assert all(b["model"] == "judge-model" and b["temperature"] == 0.0 for b in server.bodies)
        assert server.headers[0]["authorization"] == "Bearer EMPTY"

        assert all(j.model == server.model for j in results)  # the model that answered, not the one asked
        for j in results:
            if j.status == "ok":
                assert j.raw != GARBAGE
            else:
                assert (j.raw, j.value) == (GARBAGE, None)
        for req, j in zip(compares, out_c):
            if j.status == "ok":
                assert j.value == (0 if req.answers[0] <= req.answers[1] else 1)
        parse_errors = sum(j.status == "parse_error" for j in results)
        stats = judge.stats()
        assert parse_errors > 0 and stats["parse_errors"] == parse_errors
        assert stats["failures"] == 0 and stats["retries"] > 0 and stats["calls"] == len(results)

        # a second run over the same items asks the server nothing
        requests_before = server.requests
        rerun = build_judge(cfg, tmp_path / "cache.sqlite", progress=False)
        again = rerun.compare(compares) + rerun.score(scores)
        assert server.requests == requests_before
        assert all(j.cached for j in again)
        assert [(j.status, j.value, j.raw, j.model) for j in again] == [(j.status, j.value, j.raw, j.model) for j in results]
        assert rerun.stats()["parse_errors"] == parse_errors and rerun.stats()["calls"] == 0


def test_unreadable_replies_are_asked_again_with_a_format_reminder(tmp_path, monkeypatch):
    monkeypatch.delenv(KEY_ENV, raising=False)
    compares, scores = _compare_requests(30), _score_requests(15)
    with FakeJudgeServer(seed=5, garbage=0.4) as server:
        once = build_judge(_openai_cfg(server, reask=0), tmp_path / "none.sqlite", progress=False)
        unread_without = sum(j.status == "parse_error" for j in once.compare(compares) + once.score(scores))
        judge = build_judge(_openai_cfg(server, reask=2), tmp_path / "cache.sqlite", progress=False)
        results = judge.compare(compares) + judge.score(scores)
        stats = judge.stats()
        unread = sum(j.status == "parse_error" for j in results)
        assert unread_without >= 10 and unread <= unread_without / 2
        assert stats["parse_errors"] == unread and stats["reasked"] >= unread_without
        assert 0 < stats["reask_fixed"] <= stats["reasked"]
        # a re-ask carries the original prompt, the unreadable reply and the reminder; the server answers
        # it as it answers the prompt itself, and the verdict is read from that reply
        reasks = [b["messages"][-1]["content"] for b in server.bodies if "Your reply was:" in b["messages"][-1]["content"]]
        assert reasks and all(GARBAGE in r and "Answer again, exactly in the format" in r for r in reasks)
        assert all(r.split("\nYour reply was:")[0].startswith(("Two assistants", "Grade an answer", "Notes")) for r in reasks)
        for req, j in zip(compares, results):
            if j.status == "ok":
                assert j.value == (0 if req.answers[0] <= req.answers[1] else 1) and j.prompt == "judge.compare@v1"
        # every reply is cached under its own prompt: a re-run asks nothing and reads the same verdicts
        before = server.requests
        again = build_judge(_openai_cfg(server, reask=2), tmp_path / "cache.sqlite", progress=False)
        rerun = again.compare(compares) + again.score(scores)
        assert server.requests == before
        assert [(j.status, j.value, j.raw) for j in rerun] == [(j.status, j.value, j.raw) for j in results]


def test_eval_replies_the_caller_cannot_read_are_asked_again(tmp_path, monkeypatch):
    """`complete` with a reader: eval prompts (free text) get the same re-asks as verdicts."""
    monkeypatch.delenv(KEY_ENV, raising=False)
    texts = [(None, f"Is answer {i} right? Reply yes or no.") for i in range(20)]

    def read(raw):  # the fake server echoes non-judge prompts: "Echo: ..." is readable, its garbage is not
        return raw if raw.startswith("Echo:") else None

    with FakeJudgeServer(seed=1, garbage=0.5) as server:
        plain = build_judge(_openai_cfg(server, reask=0), tmp_path / "a.sqlite", progress=False).complete(texts, "eval.x@v1")
        assert all(j.status == "ok" for j in plain)  # without a reader every reply counts as read
        judge = build_judge(_openai_cfg(server, reask=3), tmp_path / "b.sqlite", progress=False)
        read_back = judge.complete(texts, "eval.x@v1", parse=read)
        assert judge.stats()["reasked"] > 0
        assert all(j.status == "ok" and j.value.startswith("Echo:") for j in read_back if j.status == "ok")
        assert sum(j.status == "parse_error" for j in read_back) == judge.stats()["parse_errors"] < judge.stats()["reasked"]


def test_openai_failed_requests_are_reported_and_retried_next_run(tmp_path, monkeypatch):
    monkeypatch.delenv(KEY_ENV, raising=False)
    with FakeJudgeServer(seed=5, server_error=0.5, rate_limit=0.1) as server:
        cfg = _openai_cfg(server, max_retries=1)
        requests = _score_requests(24)
        first = build_judge(cfg, tmp_path / "cache.sqlite", progress=False)
        out = first.score(requests)
        failed = [r.question for r, j in zip(requests, out) if j.status == "failed"]
        done = [r.question for r, j in zip(requests, out) if j.status != "failed"]
        assert failed and done, "the seed should give both outcomes"
        assert all("gave up after 2 attempts" in j.error and j.value is None for j in out if j.status == "failed")
        assert all(server.hits_for(q) == 2 for q in failed)
        assert first.stats()["failures"] == len(failed)

        hits = {r.question: server.hits_for(r.question) for r in requests}
        second = build_judge(cfg, tmp_path / "cache.sqlite", progress=False).score(requests)
        asked = {q for q in hits if server.hits_for(q) > hits[q]}
        assert asked == set(failed)  # only the failed ones were asked again
        assert all(j.cached for r, j in zip(requests, second) if r.question in done)


def test_openai_prompt_version_change_misses_the_cache(tmp_path, monkeypatch):
    monkeypatch.delenv(KEY_ENV, raising=False)
    import yaml

    from vlmalign.prompts import load_prompt

    override = tmp_path / "judge.yaml"
    override.write_text(yaml.safe_dump({"compare": {"version": "v2", "template": load_prompt("judge.compare").template}}))
    requests = _compare_requests(4)
    with FakeJudgeServer() as server:
        packaged = build_judge(_openai_cfg(server), tmp_path / "cache.sqlite", progress=False)
        assert [j.prompt for j in packaged.compare(requests)] == ["judge.compare@v1"] * 4
        bumped = build_judge(_openai_cfg(server, prompts=str(override)), tmp_path / "cache.sqlite", progress=False)
        out = bumped.compare(requests)
        assert [j.prompt for j in out] == ["judge.compare@v2"] * 4 and not any(j.cached for j in out)
        assert server.requests == 8
        assert all(j.cached for j in bumped.compare(requests)) and server.requests == 8


def test_openai_swap_check_and_deduplication(tmp_path, monkeypatch):
    monkeypatch.delenv(KEY_ENV, raising=False)
    with FakeJudgeServer() as server:
        judge = build_judge(_openai_cfg(server, swap_check=True), tmp_path / "cache.sqlite", progress=False)
        request = JudgeRequest(None, "Which is it?", ("alpha", "beta"))
        out = judge.compare([request, request])  # the same item twice: asked once per order
        assert server.requests == 2 and [j.value for j in out] == [0, 0]
        assert out[0].raw == ("A", "B") and out[0].status == "ok"


def test_openai_complete_and_calls_from_inside_an_event_loop(tmp_path, monkeypatch):
    monkeypatch.delenv(KEY_ENV, raising=False)
    with FakeJudgeServer() as server:
        judge = build_judge(_openai_cfg(server), tmp_path / "cache.sqlite", progress=False)

        async def from_a_notebook():  # asyncio.run is refused inside a running loop
            return judge.complete([(["f1.png", "f2.png"], "<video>\nTurn this caption into a question.")], prompt_id="qa@v1")

        (out,) = asyncio.run(from_a_notebook())
        assert (out.status, out.kind, out.prompt) == ("ok", "complete", "qa@v1")
        assert out.value == "Echo: Turn this caption into a question."
        assert server.bodies[0]["messages"][-1]["content"] == "Turn this caption into a question."


def test_api_key_never_leaks(tmp_path, monkeypatch, caplog, capsys):
    key = "sk-test-CANARY-9f1c2e7a55d04b"
    monkeypatch.setenv(KEY_ENV, key)
    caplog.set_level(logging.DEBUG)
    cache_path = tmp_path / "cache.sqlite"
    with FakeJudgeServer(seed=2, rate_limit=0.3, server_error=0.2, garbage=0.2) as server:
        judge = build_judge(_openai_cfg(server, max_retries=2), cache_path, progress=True)
        results = judge.compare(_compare_requests(40)) + judge.complete([(None, "Write a question about a red ball.")])
        # a server that echoes the key in its 401 message: our error must not repeat it
        with FakeJudgeServer(reject_auth=True) as rejecting:
            bad = build_judge(_openai_cfg(rejecting), tmp_path / "other.sqlite", progress=False)
            with pytest.raises(JudgeError, match="HTTP 401") as err:
                bad.score(_score_requests(2))
        assert f"Bearer {key}" in rejecting.headers[0]["authorization"]
    assert server.headers and all(h["authorization"] == f"Bearer {key}" for h in server.headers)  # it came from the env
    assert any(j.status == "failed" for j in results)  # error texts are among the things checked
    captured = capsys.readouterr()
    texts = {
        "logs": caplog.text + "\n".join(r.getMessage() for r in caplog.records),
        "stdout/stderr": captured.out + captured.err,
        "judgments": "\n".join(repr(j) for j in results),
        "judge": repr(judge) + judge.id + repr(judge.stats()) + repr(vars(judge)) + repr(bad) + bad.id,
        "error": str(err.value),
        "cache files": b"".join(p.read_bytes() for p in tmp_path.glob("*.sqlite*")).decode("latin-1"),
    }
    for where, text in texts.items():
        assert key not in text, f"the API key leaked into {where}"
    assert caplog.records  # logging was really captured
    assert "***" in str(err.value)


def test_missing_key_for_a_remote_endpoint_names_the_variable(tmp_path, monkeypatch):
    monkeypatch.delenv(KEY_ENV, raising=False)
    cfg = JudgeConfig(backend="openai", model="gpt-4o-2024-08-06", base_url="https://api.example.com/v1", api_key_env=KEY_ENV)
    with pytest.raises(JudgeError, match=KEY_ENV):
        build_judge(cfg, tmp_path / "cache.sqlite")
    with pytest.raises(JudgeError, match=KEY_ENV):
        build_judge(JudgeConfig(backend="openai", model="gpt-4o", api_key_env=KEY_ENV), tmp_path / "cache.sqlite")
    with pytest.raises(JudgeError, match="judge.model"):
        build_judge(JudgeConfig(backend="openai", base_url="http://localhost:8000/v1"), tmp_path / "cache.sqlite")


def test_judge_server_replies_follow_the_prompts():
    from vlmalign.prompts import context_block, format_numbered, load_prompt, parse_choice, parse_ranking

    compare = load_prompt("judge.compare").render(context_block=context_block(""), question="q", answer_a="b", answer_b="a")
    assert parse_choice(judge_reply(compare)) == 1
    score = load_prompt("judge.score").render(context_block="", question="q", reference_block="", answer="abc")
    assert parse_score(judge_reply(score)) == 4
    rank = load_prompt("judge.rank").render(context_block="", question="q", answers=format_numbered(["c", "a", "b"]), num_answers=3)
    assert parse_ranking(judge_reply(rank), 3) == [2, 0, 1]


# --------------------------------------------------------------------------------------------- hf


@pytest.fixture(scope="module")
def tiny_policy(tiny_bench, tmp_path_factory):
    from vlmalign.data.features import VisualInputs
    from vlmalign.model.policy import build_model

    run = tmp_path_factory.mktemp("hf-judge")
    cfg = load_config(SFTConfig, "configs/tiny/sft.yaml", sft_overrides(tiny_bench, run / "run"))
    model = build_model(cfg.model)
    return model, model.visual_inputs(str(run / "features"))


def test_hf_judge_batches_caches_and_reports_parse_errors(tiny_bench, bench_items, tiny_policy, tmp_path, monkeypatch):
    import torch

    from vlmalign.model import generation

    model, visual = tiny_policy
    calls = []
    real_generate = generation.generate_answers

    def counting_generate(m, v, requests, gen, progress=False):
        calls.append((len(requests), gen.batch_size, gen.do_sample))
        return real_generate(m, v, requests, gen, progress)

    monkeypatch.setattr(generation, "generate_answers", counting_generate)
    cfg = JudgeConfig(backend="hf", batch_size=2, max_new_tokens=6, reask=0)  # one call per batch, no re-asks
    judge = build_judge(cfg, tmp_path / "cache.sqlite", model=model, visual=visual, progress=False)
    assert judge.id.startswith("hf:policy#")

    requests = [JudgeRequest(str(tiny_bench / v), q, (a,)) for v, q, r, w in bench_items[:2] for a in (r, w)]
    requests.append(JudgeRequest(None, bench_items[0][1], ("Red.",), context="A red square moves left."))  # text only
    out = judge.score(requests)
    assert calls == [(2, 2, False), (2, 2, False), (1, 2, False)]  # greedy, one batch per call
    assert all(j.model == "policy" and j.prompt == "judge.score@v1" and not j.cached for j in out)
    for j in out:  # a random model says anything: whatever parses is a score, the rest a parse error
        assert j.status in ("ok", "parse_error") and j.value == parse_score(j.raw)
    assert judge.stats()["parse_errors"] == sum(j.status == "parse_error" for j in out)

    calls.clear()
    again = judge.score(requests)
    assert calls == [] and all(j.cached for j in again)
    assert [(j.value, j.status, j.raw) for j in again] == [(j.value, j.status, j.raw) for j in out]

    # Replies no parser accepts come back as parse errors, counted, never as a score.
    monkeypatch.setattr(generation, "generate_answers", lambda m, v, reqs, gen, progress=False: [["it is nice"] for _ in reqs])
    odd = judge.compare([JudgeRequest(str(tiny_bench / v), q, (r, w)) for v, q, r, w in bench_items[:3]])
    assert [(j.status, j.value, j.raw) for j in odd] == [("parse_error", None, "it is nice")] * 3
    # counted per returned judgment: the cached re-run's parse errors count again
    assert judge.stats()["parse_errors"] == 2 * sum(j.status == "parse_error" for j in out) + 3

    # After a training step the policy is another judge: nothing of its former self is reused.
    old_id = judge.id
    with torch.no_grad():
        model.projector[0].bias.add_(0.5)
    assert all(not j.cached for j in judge.compare([JudgeRequest(str(tiny_bench / v), q, (r, w)) for v, q, r, w in bench_items[:3]]))
    assert judge.id != old_id


def test_hf_judge_with_a_saved_model_judges_with_that_model_not_the_policy(tiny_bench, tiny_policy, tmp_path):
    """make-prefs, the ISR-DPO loop and grpo-rank hand their policy to build_judge; a judge.model path
    must still win (it used to be ignored, the id naming a model that never judged)."""
    import torch

    from vlmalign.model.policy import build_model

    policy, visual = tiny_policy
    torch.manual_seed(123)
    other = build_model(policy.cfg)
    other.save_pretrained(tmp_path / "judge-model")
    own = build_judge(JudgeConfig(backend="hf", model=str(tmp_path / "judge-model")), tmp_path / "a.sqlite",
                      model=policy, visual=visual, progress=False)
    self_judge = build_judge(JudgeConfig(backend="hf", model="policy"), tmp_path / "b.sqlite", model=policy, visual=visual,
                             progress=False)
    assert own.model is not policy and self_judge.model is policy
    assert own.id.startswith(f"hf:{tmp_path / 'judge-model'}#")
    assert own.id.split("#")[1] != self_judge.id.split("#")[1]  # the fingerprint is of the weights that judge


def test_random_judge_is_seeded_uniform_and_cached(tmp_path):
    """The negative control's judge: verdicts carry no information about the answers, are the same
    on a re-run, and change with the seed."""
    from collections import Counter

    judge = build_judge(JudgeConfig(backend="random", seed=3), tmp_path / "cache.sqlite", progress=False)
    items = [JudgeRequest(f"v{i}.mp4", "What colour is the square?", ("Red.", "Blue.", "Green.", "Yellow.", "Red or blue."))
             for i in range(400)]
    ranks = [j.value for j in judge.rank(items)]
    assert all(sorted(r) == list(range(5)) for r in ranks)
    best = Counter(r.index(0) for r in ranks)
    assert set(best) == set(range(5)) and max(best.values()) < 2 * min(best.values())  # about 80 each
    scores = [j.value for j in judge.score([JudgeRequest(r.video, r.question, (a,)) for r in items[:200] for a in r.answers])]
    assert set(scores) == {1, 2, 3, 4, 5}
    picks = [j.value for j in judge.compare([JudgeRequest(r.video, r.question, r.answers[:2]) for r in items])]
    assert 150 < sum(picks) < 250
    again = build_judge(JudgeConfig(backend="random", seed=3), tmp_path / "other.sqlite", progress=False)
    assert [j.value for j in again.rank(items)] == ranks
    other_seed = build_judge(JudgeConfig(backend="random", seed=4), tmp_path / "cache.sqlite", progress=False)
    assert [j.value for j in other_seed.rank(items)] != ranks
    assert all(j.cached for j in judge.rank(items[:5]))


def test_random_judge_gives_the_same_verdicts_wherever_the_videos_lie(tmp_path):
    judge = build_judge(JudgeConfig(backend="random"), tmp_path / "a.sqlite", progress=False)
    here = [JudgeRequest(f"/data/run1/videos/v{i}.mp4", "How many objects appear in the video?", ("One.", "Two.", "2."))
            for i in range(50)]
    there = [JudgeRequest(f"/elsewhere/videos/v{i}.mp4", r.question, r.answers) for i, r in enumerate(here)]
    again = build_judge(JudgeConfig(backend="random"), tmp_path / "b.sqlite", progress=False)
    assert [j.value for j in judge.rank(here)] == [j.value for j in again.rank(there)]
