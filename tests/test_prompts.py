"""Prompt loading, rendering, overrides, reply parsers, and the judge data's round trip."""

import json
import re
from pathlib import Path

import pytest

from vlmalign import prompts
from vlmalign.data import synthetic as syn
from vlmalign.errors import VlmalignError
from vlmalign.feedback.oracle import Oracle
from vlmalign.prompts import (
    Prompt, available_prompts, build_narrative, context_block, format_numbered, load_prompt, parse_choice,
    parse_ranking, parse_score,
)

EXPECTED = {
    "judge.compare": ("context_block", "question", "answer_a", "answer_b"),
    "judge.score": ("context_block", "question", "reference_block", "answer"),
    "judge.score_explained": ("context_block", "question", "reference_block", "answer"),
    "judge.reference_block": ("reference",),
    "judge.reask": ("prompt", "reply"),
    "judge.rank": ("context_block", "num_answers", "question", "answers"),
    "judge.context_block": ("context",),
    "context.caption_clip": (),
    "context.caption_video": (),
    "context.narrative_part": ("index", "total", "caption"),
    "context.retrospective": ("previous_context",),
}


def test_packaged_prompts():
    assert set(EXPECTED) <= set(available_prompts())
    for name, fields in EXPECTED.items():
        p = load_prompt(name)
        assert p.name == name and p.version and p.fields == fields
        assert p.id == f"{name}@{p.version}"
        sees_video = name not in ("judge.context_block", "judge.reference_block", "judge.reask", "context.narrative_part")
        assert p.template.startswith("<video>\n") == sees_video, name
        assert "{" not in p.render(**{f: "x" for f in fields})


def test_render_errors_name_prompt_and_field():
    p = load_prompt("judge.score")
    with pytest.raises(VlmalignError, match=r"judge\.score.*'answer'"):
        p.render(context_block="", question="q")
    with pytest.raises(VlmalignError, match=r"judge\.score.*'colour'"):
        p.render(context_block="", question="q", reference_block="", answer="a", colour="red")


def test_braces_and_fields():
    p = Prompt("t.x", "v1", "{{literal}} {a} and {b} and {a}")
    assert p.fields == ("a", "b")
    assert p.render(a=1, b="{c}") == "{literal} 1 and {c} and 1"
    for bad in ("{a", "{a:>3}", "{a!r}", "{a.b}", "{0}"):
        with pytest.raises(VlmalignError):
            Prompt("t.x", "v1", bad)


def test_context_block_empty_or_rendered():
    assert context_block(None) == context_block("") == context_block("  \n") == ""
    block = context_block("A red square moves left.")
    assert block.endswith("A red square moves left.\n")
    compare = load_prompt("judge.compare")
    without = compare.render(context_block="", question="Q?", answer_a="a", answer_b="b")
    with_ctx = compare.render(context_block=block, question="Q?", answer_a="a", answer_b="b")
    assert without.startswith("<video>\nTwo assistants")
    assert with_ctx.startswith("<video>\nNotes about the video") and with_ctx.endswith(without[len("<video>\n"):])


def test_numbered_answers_and_narrative():
    text = format_numbered(["first\nanswer", "second"])
    assert text == "Answer 1: first answer\nAnswer 2: second"
    rank = load_prompt("judge.rank").render(context_block="", num_answers=2, question="Q?", answers=text)
    assert "Answer 2: second" in rank
    assert build_narrative(["a b", "c"]) == "Part 1 of 2: a b\nPart 2 of 2: c"


def test_user_override_file_and_folder(tmp_path):
    user = tmp_path / "judge.yaml"
    user.write_text('compare:\n  version: "mine-1"\n  template: "<video>\\n{question} -> {answer_a} | {answer_b}"\n'
                    'extra:\n  version: "1"\n  template: "hello {who}"\n')
    p = load_prompt("judge.compare", path=user)
    assert p.version == "mine-1" and p.fields == ("question", "answer_a", "answer_b")
    assert load_prompt("judge.score", path=user) == load_prompt("judge.score")  # packaged fall-back
    assert load_prompt("judge.extra", path=user).render(who="you") == "hello you"
    assert "judge.extra" in available_prompts(user) and "judge.extra" not in available_prompts()
    assert load_prompt("judge.compare", path=tmp_path).version == "mine-1"  # a folder of family files
    other = tmp_path / "my_prompts.yaml"
    other.write_text('compare:\n  version: "1"\n  template: "x"\n')
    with pytest.raises(VlmalignError, match="judge.yaml"):
        load_prompt("judge.compare", path=other)


@pytest.mark.parametrize("content, match", [
    ("compare: [1, 2\n", "not valid YAML"),
    ("- a\n- b\n", "mapping"),
    ('compare:\n  template: "x"\n', "version"),
    ('compare:\n  version: "1"\n', "template"),
    ('compare:\n  version: "1"\n  template: "x"\n  colour: red\n', "unknown key"),
    ('compare:\n  version: "1"\n  template: "{oops"\n', "brace"),
])
def test_bad_user_files(tmp_path, content, match):
    path = tmp_path / "judge.yaml"
    path.write_text(content)
    with pytest.raises(VlmalignError, match=match):
        load_prompt("judge.compare", path=path)


def test_unknown_names():
    with pytest.raises(VlmalignError, match="judge.compare"):  # lists what is available
        load_prompt("judge.nope")
    with pytest.raises(VlmalignError, match="family.key"):
        load_prompt("compare")
    with pytest.raises(VlmalignError, match="does not exist$"):
        load_prompt("judge.compare", path="/no/such/prompts.yaml")


def test_a_missing_relative_prompt_path_says_where_it_was_looked_for(tmp_path, monkeypatch):
    """configs/tiny name their prompts relative to the repository: run from elsewhere, the error
    must say that the path was read from the working folder, and which."""
    monkeypatch.chdir(tmp_path)
    with pytest.raises(VlmalignError) as e:
        load_prompt("context.narrative_part", path="configs/tiny/prompts")
    assert str(e.value) == (f"prompt file configs/tiny/prompts does not exist (relative paths are read from "
                            f"the working folder, {Path.cwd()})")


@pytest.mark.parametrize("reply, expected", [
    ("A", 0), ("B", 1), ("b", 1), (" B.\n", 1), ("(A)", 0), ("**B**", 1), ("Answer: B", 1), ("answer: a", 0),
    ("The answer is A.", 0), ("Final answer: B", 1), ("Option B", 1), ("I choose A.", 0), ("I think B", 1),
    ("Answer B is better than answer A.", 1), ("A is more accurate than B.", 0), ("A better answer is B.", 1),
    ("", None), (None, None), ("Neither.", None), ("A and B", None), ("Both A and B are fine.", None),
    ("C", None), ("I choose a different approach", None), ("Answer: A or B", None),
])
def test_parse_choice(reply, expected):
    assert parse_choice(reply) == expected


@pytest.mark.parametrize("reply, expected", [
    ("Score: 4", 4), ("score: 1", 1), ("Score:5", 5), ("Score: 3.", 3), ("**Score:** 2", 2), ("The score is 5.", 5),
    ("I would give a score of 3.", 3), ("4/5", 4), ("4 out of 5", 4), ("3", 3), ("Rating: 2", 2),
    ("Score: 6", None), ("Score: 0", None), ("Score: 4.5", None), ("", None), (None, None), ("Good answer.", None),
    ("Score: 3 ... Score: 4", None), ("between 3 and 4", None), ("Score: N", None),
])
def test_parse_score(reply, expected):
    assert parse_score(reply) == expected


def test_parse_score_range():
    assert parse_score("Score: 9", lo=0, hi=10) == 9
    assert parse_score("7/10", lo=0, hi=10) == 7
    assert parse_score("Score: 11", lo=0, hi=10) is None


@pytest.mark.parametrize("reply, n, expected", [
    ("2, 3, 1", 3, [2, 0, 1]), ("1,2,3", 3, [0, 1, 2]), ("[3] > [1] > [2]", 3, [1, 2, 0]), ("1", 1, [0]),
    ("Ranking: 2, 1", 2, [1, 0]), ("Here is my ranking.\n3, 2, 1", 3, [2, 1, 0]),
    ("2, 2, 1", 3, None), ("1, 2", 3, None), ("1, 2, 3, 4", 3, None), ("0, 1, 2", 3, None), ("", 3, None),
    ("best to worst", 2, None), (None, 2, None),
])
def test_parse_ranking(reply, n, expected):
    assert parse_ranking(reply, n) == expected


def test_rank_prompt_reply_round_trip():
    ranks = [2, 0, 1, 3]
    reply = ", ".join(str(ranks.index(r) + 1) for r in range(len(ranks)))  # answer numbers, best first
    assert parse_ranking(reply, 4) == ranks


@pytest.fixture(scope="module")
def bench(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench")
    syn.generate_benchmark(out, num_videos=16, seed=5, progress=False)
    return out


def test_judge_examples_round_trip(bench):
    oracle = Oracle.from_dir(bench)
    records = json.loads((bench / "judge_train.json").read_text())
    captions = json.loads((bench / "captions.json").read_text())
    compare, score = load_prompt("judge.compare"), load_prompt("judge.score")
    assert {r["judge_task"] for r in records} == {"compare", "score"}
    for r in records:
        prompt, reply = r["conversations"][0]["value"], r["conversations"][1]["value"]
        vid = r["video"].split("/")[-1].split(".")[0]
        block = context_block(captions[vid]["caption"]) if r["with_context"] else ""
        if r["judge_task"] == "compare":
            m = re.search(r"\nQuestion: (.*)\nAnswer A: (.*)\nAnswer B: (.*)\n", prompt)
            question, a, b = m.groups()
            assert prompt == compare.render(context_block=block, question=question, answer_a=a, answer_b=b)
            assert reply in ("A", "B")
            choice = parse_choice(reply)
            assert choice == oracle.compare(r["video"], question, a, b)
            scores = [oracle.score(r["video"], question, x) for x in (a, b)]
            assert scores[choice] > scores[1 - choice]
            assert r["prompt_id"] == compare.id
        else:
            m = re.search(r"\nQuestion: (.*)\nAnswer: (.*)\n", prompt)
            question, answer = m.groups()
            assert prompt == score.render(context_block=block, question=question, reference_block="", answer=answer)
            assert re.fullmatch(r"Score: [1-5]", reply)
            assert parse_score(reply) == oracle.score(r["video"], question, answer)
            assert r["prompt_id"] == score.id


def test_module_exports():
    for name in prompts.__all__:
        assert hasattr(prompts, name)
