"""The alignment gym: its measurements (hand-computed) and the learning regression test."""

import json

import pytest
import yaml

from vlmalign.data import synthetic as syn
from vlmalign.feedback.oracle import Oracle
from vlmalign.gym import GymBudget, format_gym, gains, prior_split, tau_over_training


def test_prior_split_counts_by_truth_equal_to_the_prior(tiny_bench, tmp_path):
    questions = json.loads((tiny_bench / "qa_test.json").read_text())
    oracle = Oracle.from_dir(tiny_bench)
    # every other answer judged right; every third answer states the question's prior
    preds = []
    for i, q in enumerate(questions):
        parsed = syn.parse_question(q["question"])
        prior = syn.PRIORS[parsed.qtype][parsed.template]
        said = {"colour": f"It is {prior}.", "shape": f"A {prior}.", "count": f"There are {prior} objects.",
                "direction": f"It moves {prior}."}[parsed.qtype] if i % 3 == 0 else "I cannot tell."
        preds.append({"id": q["question_id"], "video_name": q["video_name"], "question": q["question"], "pred": said})
    verdicts = {p["id"]: i % 2 == 0 for i, p in enumerate(preds)}
    (tmp_path / "predictions.jsonl").write_text("".join(json.dumps(p) + "\n" for p in preds))
    (tmp_path / "judgments.jsonl").write_text("".join(json.dumps({"id": k, "verdict": "yes" if v else "no"}) + "\n"
                                                      for k, v in verdicts.items()))
    at_prior = []
    for p in preds:
        parsed = syn.parse_question(p["question"])
        at_prior.append(syn.true_value(oracle.metadata(p["video_name"]), parsed) == syn.PRIORS[parsed.qtype][parsed.template])
    assert 0 < sum(at_prior) < len(preds)
    hits_at = [verdicts[p["id"]] for p, a in zip(preds, at_prior) if a]
    hits_off = [verdicts[p["id"]] for p, a in zip(preds, at_prior) if not a]
    stated_off = [i % 3 == 0 for i, a in enumerate(at_prior) if not a]
    split = prior_split(tiny_bench, tmp_path)
    assert split == {"truth = prior": sum(hits_at) / len(hits_at), "truth != prior": sum(hits_off) / len(hits_off),
                     "prior stated": sum(stated_off) / len(stated_off)}
    assert 0 < split["prior stated"] < 1


def test_table_gains_are_over_each_seeds_own_start():
    def row(all_, colour=0.5):
        return {"colour": colour, "count": 0.9, "direction": 0.3, "shape": 0.3, "all": all_,
                "truth = prior": 0.4, "truth != prior": 0.2}

    runs = [{"seed": 0, "ceiling": row(0.60), "start": row(0.30), "dpo": row(0.40), "dpo-control": row(0.28), "minutes": 1.0},
            {"seed": 1, "ceiling": row(0.62), "start": row(0.34), "dpo": row(0.48), "dpo-control": row(0.34), "minutes": 1.2}]
    assert gains(runs, "dpo") == pytest.approx([10.0, 14.0])
    manifest = {"misalignment": {"prior_rate": 0.5, "invent_rate": 0.5,
                                 "altered_sft_answers": {"colour": 3, "count": 1, "describe": 2},
                                 "sft_answers": {"colour": 8, "count": 4, "describe": 4}},
                "files": {"qa_test.json": {"records": 1000}}}
    text = format_gym(runs, manifest, GymBudget(methods=("dpo",)), "vlmalign gym --seeds 0,1")
    lines = {line.split(" | ")[0]: line for line in text.splitlines() if line.startswith("| ")}
    # gains +10 and +14: mean +12.0, sample sd 2.8; the control: -2 and 0 -> -1.0 ± 1.4
    assert lines["| DPO (oracle scores)"].endswith("| +12.0 ± 2.8 |")
    assert lines["|   control: DPO on swapped pairs"].endswith("| -1.0 ± 1.4 |")
    assert "| 44.0 ± 5.7 |" in lines["| DPO (oracle scores)"]  # all: 40 and 48
    assert "4 of 12 short SFT answers" in text and "2 of 4 descriptions" in text and "1000 questions" in text
    assert "Gap (ceiling - start): +29.0 ± 1.4 points" in text and "`vlmalign gym --seeds 0,1`" in text
    assert "Kendall tau" not in text  # no rank method ran
    # with a runner-up, the altered short answers are told apart: 1 of the 4 states the runner-up
    manifest["misalignment"].update(runner_up_rate=0.6, runner_up_sft_answers={"colour": 1, "count": 0})
    text = format_gym(runs, manifest, GymBudget(methods=("dpo",)), "vlmalign gym --seeds 0,1")
    assert "3 of 12 short SFT answers state the question's prior instead of the truth, 1 its runner-up " \
           "(runner-up rate 0.6), 2 of 4 descriptions" in text


def test_kendall_tau_over_training_is_read_from_the_metrics(tmp_path):
    metrics = tmp_path / "metrics.jsonl"
    metrics.write_text("\n".join(json.dumps(r) for r in [
        {"step": 5, "kendall_tau": 0.1}, {"step": 10, "kendall_tau": None}, {"step": 15, "kendall_tau": -0.3}]))
    assert tau_over_training(metrics) == {"tau_first": 0.1, "tau_last": -0.3}
    row = {"colour": 0.5, "count": 0.5, "direction": 0.3, "shape": 0.3, "all": 0.4, "truth = prior": 0.4, "truth != prior": 0.2}
    runs = [{"seed": s, "ceiling": row, "start": row, "grpo_rank": {**row, "tau_first": t0, "tau_last": t1}, "minutes": 1.0}
            for s, (t0, t1) in enumerate([(0.1, -0.3), (0.3, -0.1)])]
    manifest = {"misalignment": {"prior_rate": 0.75, "invent_rate": 0.5, "altered_sft_answers": {}, "sft_answers": {}},
                "files": {"qa_test.json": {"records": 10}}}
    text = format_gym(runs, manifest, GymBudget(methods=("grpo_rank",)), "vlmalign gym")
    # first: 0.1 and 0.3 -> +0.20 ± 0.14; last: -0.3 and -0.1 -> -0.20 ± 0.14
    assert "GRPO_rank (oracle ranks) +0.20 ± 0.14 -> -0.20 ± 0.14" in text


# --- the learning regression test --------------------------------------------------------------------
# One seed at reduced sizes: oracle-fed DPO and GRPO must lift a misaligned start by a clear margin,
# and the same runs with the feedback destroyed (swapped pairs, random scores) must not. A sign error
# in a loss, an advantage pointing the wrong way or a judge wired backwards fails it.
# Sized for CI: one object per video, so the start answers the count ("two") from the prior, which
# its own samples and the oracle can correct. Perceiving colour takes more SFT than CI has time for
# (here it stays at chance), so this test checks the direction of learning, and the gym grounding.
# DPO runs without the tiny config's SFT term on the chosen answers: with it, DPO with its loss's sign
# flipped passed this test too (the SFT term alone fixed the count).
LEARNING = GymBudget(videos=200, splits=(0.6, 0.05, 0.35), max_objects=1, sft_epochs=6, sft_batch_size=8,
                     dpo_questions=240, dpo_epochs=2, dpo_lr=2e-4, dpo_sft_weight=0.0,
                     grpo_rollouts=12, grpo_lr=1e-4, methods=("dpo", "grpo"))
MARGIN = 5.0  # points of held-out accuracy over the start
CONTROL_MAX = 1.0  # a control may move within noise, never gain more than this


@pytest.mark.e2e
def test_oracle_feedback_lifts_the_start_and_destroyed_feedback_does_not(tmp_path, one_thread):
    from vlmalign.data.synthetic import Misalignment, generate_benchmark
    from vlmalign.gym import Gym

    bench = tmp_path / "bench"
    generate_benchmark(bench, num_videos=LEARNING.videos, seed=0, splits=LEARNING.splits, max_objects=LEARNING.max_objects,
                       misalignment=Misalignment(LEARNING.prior_rate, LEARNING.invent_rate), progress=False)
    gym = Gym(tmp_path / "seed-0", LEARNING, 0, bench, tmp_path / "feature_cache")
    start = gym.sft("start", ["sft_easy.json", "sft_hard.json"])
    base = gym.evaluate(start)["all"]
    gains = {
        "dpo": gym.evaluate(gym.dpo(start, control=False))["all"] - base,
        "dpo-control": gym.evaluate(gym.dpo(start, control=True))["all"] - base,
        "grpo": gym.evaluate(gym.grpo(start, "grpo", control=False))["all"] - base,
        "grpo-control": gym.evaluate(gym.grpo(start, "grpo", control=True))["all"] - base,
    }
    points = {k: round(100 * v, 1) for k, v in gains.items()}
    assert points["dpo"] >= MARGIN and points["grpo"] >= MARGIN, points
    assert points["dpo-control"] <= CONTROL_MAX and points["grpo-control"] <= CONTROL_MAX, points


def test_the_gym_command_runs_the_perception_design_unless_told_otherwise():
    """`vlmalign gym` runs the design whose methods measurably close the gap (docs/results.md); every
    design the gym declares can be asked for by name, and only those."""
    import inspect

    from vlmalign.cli import build_parser
    from vlmalign.gym import DESIGNS, PERCEPTION, POOLED, run_gym

    parser = build_parser()
    assert DESIGNS[parser.parse_args(["gym"]).design] is PERCEPTION
    assert inspect.signature(run_gym).parameters["budget"].default is PERCEPTION
    assert [parser.parse_args(["gym", "--design", name]).design for name in DESIGNS] == list(DESIGNS)
    assert DESIGNS["pooled"] is POOLED  # refused names: tests/test_sft.py


def test_a_gym_folder_holds_one_budget(tmp_path):
    """Stages reuse what they find finished, so re-running a folder with other settings would print
    old numbers under the new budget: it is refused, naming what changed."""
    import dataclasses

    from vlmalign.errors import VlmalignError
    from vlmalign.gym import QUICK, _check_settings

    out = tmp_path / "gym"
    _check_settings(out, QUICK)
    _check_settings(out, dataclasses.replace(QUICK, methods=("dpo",)))  # methods have folders of their own
    with pytest.raises(VlmalignError, match=r"other settings \(prior_rate, sft_epochs\)"):
        _check_settings(out, dataclasses.replace(QUICK, prior_rate=0.3, sft_epochs=2))
    # a folder from before a field existed reads as that field's default, which is what it ran
    recorded = json.loads((out / "gym-settings.json").read_text())
    (out / "gym-settings.json").write_text(json.dumps({k: v for k, v in recorded.items() if not k.startswith("reader_first")}))
    _check_settings(out, QUICK)
    with pytest.raises(VlmalignError, match=r"other settings \(reader_first_types\)"):
        _check_settings(out, dataclasses.replace(QUICK, reader_first_types=("colour",)))
    (tmp_path / "old").mkdir()
    (tmp_path / "old" / "results.md").write_text("an older demo")
    with pytest.raises(VlmalignError, match="holds no gym run"):
        _check_settings(tmp_path / "old", QUICK)


def test_minutes_per_seed_add_up_over_the_runs_of_a_folder(tmp_path):
    """A rerun that reuses finished stages takes seconds; the table's minutes are the folder's total."""
    from vlmalign.gym import _add_minutes

    seed_dir = tmp_path / "seed-0"
    seed_dir.mkdir()
    assert _add_minutes(seed_dir, ("dpo",), 12.5) == 12.5
    assert _add_minutes(seed_dir, ("ppo",), 20.25) == 32.75
    assert _add_minutes(seed_dir, ("dpo", "ppo"), 0.01) == pytest.approx(32.76)


def test_concurrent_seeds_make_shared_things_one_at_a_time(tmp_path):
    """`--seeds N` processes on one folder share the benchmark and the reader: while one makes them
    the others wait (rather than write the same files over each other)."""
    import threading
    import time

    from vlmalign.gym import one_writer

    log, inside = [], threading.Event()

    def first():
        with one_writer(tmp_path / ".lock"):
            inside.set()
            time.sleep(0.5)
            log.append("first done")

    worker = threading.Thread(target=first)
    worker.start()
    inside.wait()
    with one_writer(tmp_path / ".lock"):
        log.append("second in")
    worker.join()
    assert log == ["first done", "second in"]


@pytest.mark.e2e
def test_seeds_side_by_side_give_what_seeds_in_turn_give(tmp_path, one_thread, capsys):
    """`vlmalign gym --jobs 2`: the seeds train in two spawned processes and return in seed order,
    each with the numbers the same seed gives when the seeds run in turn (the table is the same
    whichever way it was run)."""
    import torch

    from vlmalign.cli import main
    from vlmalign.gym import run_gym
    from vlmalign.model.policy import load_model

    toy = GymBudget(videos=30, splits=(0.6, 0.1, 0.3), max_objects=1, sft_epochs=1, sft_batch_size=8, eval_limit=8,
                    methods=())
    side_by_side = run_gym(tmp_path / "jobs", toy, seeds=(0, 1), jobs=2)
    assert "[gym] seeds 0, 1: 2 at a time, 1 torch thread(s) each" in capsys.readouterr().out
    (in_turn,) = run_gym(tmp_path / "turn", toy, seeds=(1,))
    assert [r["seed"] for r in side_by_side] == [0, 1]
    for name in ("ceiling", "start"):
        assert side_by_side[1][name] == in_turn[name]
    weights = {run: load_model(tmp_path / run / "start" / "final").llm.state_dict()
               for run in ("jobs/seed-0", "jobs/seed-1", "turn/seed-1")}
    assert all(torch.equal(t, weights["turn/seed-1"][k]) for k, t in weights["jobs/seed-1"].items())
    assert not torch.equal(weights["jobs/seed-0"]["lm_head.weight"], weights["jobs/seed-1"]["lm_head.weight"])
    assert main(["gym", "--out", str(tmp_path / "bad"), "--jobs", "0"]) == 2
    assert "error: jobs: at least 1 (got 0)" in capsys.readouterr().err


def test_tau_curves_plot_every_rank_run_of_every_seed(tmp_path):
    pytest.importorskip("matplotlib", reason="matplotlib is the optional 'plots' extra")
    from vlmalign.plots import plot_gym_tau

    assert plot_gym_tau(tmp_path, tmp_path / "none.png") is None  # no rank runs: no figure
    for seed in (0, 1):
        for name in ("grpo_rank", "grpo_rank-control"):
            run = tmp_path / f"seed-{seed}" / name
            run.mkdir(parents=True)
            (run / "metrics.jsonl").write_text("".join(
                json.dumps({"step": s, "kendall_tau": s / 10, "loss": 0.1}) + "\n" for s in range(1, 6)))
    figure = plot_gym_tau(tmp_path, tmp_path / "gym_tau.png")
    assert figure.is_file() and figure.stat().st_size > 1000


# --- the reader judge --------------------------------------------------------------------------------


def test_reader_records_hold_the_true_answer_after_each_context_as_the_judge_asks(tmp_path):
    """The reader learns p(true answer | context, question) from the train split only, in exactly the
    text the likelihood judge puts before the answers it scores."""
    from vlmalign.data.synthetic import Misalignment, generate_benchmark
    from vlmalign.feedback.judges import likelihood_prompt
    from vlmalign.gym import CONFIGS, READER_CONTEXTS, reader_records

    bench = tmp_path / "bench"
    generate_benchmark(bench, num_videos=12, seed=0, misalignment=Misalignment(0.75, 0.5), progress=False, workers=0)
    records = json.loads(reader_records(bench, tmp_path / "reader.json").read_text())
    oracle = Oracle.from_dir(bench)
    clean = json.loads((bench / "sft_clean_easy.json").read_text())
    hard = json.loads((bench / "sft_clean_hard.json").read_text())
    captions = json.loads((bench / "captions.json").read_text())
    # four contexts per short question; descriptions are not read before the describe question
    assert len(records) == len(READER_CONTEXTS) * len(clean) + (len(READER_CONTEXTS) - 1) * len(hard)
    assert {r["id"] for r in records if r["question_type"] == "describe"} == {
        f"{h['id']}_{kind}" for h in hard for kind in ("caption", "clip_captions", "none")}
    by_id = {r["id"]: r for r in records}
    injected, wordings = 0, {}
    for item in clean:
        vid = item["id"].rsplit("_q", 1)[0]
        video = item["video"].split("/")[-1]
        assert oracle.metadata(video)["split"] == "train"
        question = item["conversations"][0]["value"]
        parsed = syn.parse_question(question)
        true = syn.true_value(oracle.metadata(video), parsed)
        replies = [by_id[f"{item['id']}_{k.replace(' ', '_')}"]["conversations"][1]["value"] for k in READER_CONTEXTS]
        # every reply states the true value, in one of the benchmark's wordings of it, drawn per record
        assert all(oracle.verdict(video, question, a).correct and a in syn.short_answers(parsed.qtype, true) for a in replies)
        wordings.setdefault(parsed.qtype, set()).update(replies)
        caption = by_id[f"{item['id']}_caption"]["conversations"][0]["value"]
        assert caption == likelihood_prompt(question, captions[vid]["caption"], CONFIGS / "prompts")[1]
        assert "<video>" not in caption and captions[vid]["caption"] in caption
        none = by_id[f"{item['id']}_none"]["conversations"][0]["value"]
        assert none == question.replace("<video>\n", "") and "Notes" not in none
        clips = by_id[f"{item['id']}_clip_captions"]["conversations"][0]["value"]
        assert all(c in clips for c in captions[vid]["clip_captions"]["3"])
        injected += not oracle.verdict(video, question, next(r for r in json.loads((bench / "sft_easy.json").read_text())
                                                                if r["id"] == item["id"])["conversations"][1]["value"]).correct
    assert all(len(w) > 2 for w in wordings.values())  # not one wording per type
    assert injected > 0  # the reader reads true answers where the policy's SFT data holds the prior


def test_table_reports_the_reader_probe_and_the_judged_runs_feedback():
    row = {"colour": 0.5, "count": 0.5, "direction": 0.3, "shape": 0.3, "all": 0.4, "truth = prior": 0.4, "truth != prior": 0.2}
    probe = lambda none, caption: {"none": {"accuracy": none, "n": 100},  # noqa: E731
                                   "caption": {"accuracy": caption, "n": 100, "by_type": {"colour": caption, "count": 1.0}}}
    runs = [{"seed": 0, "ceiling": row, "start": row, "reader_probe": probe(0.5, 0.9), "minutes": 1.0,
             "isr_dpo": {**row, "iterations": [{"agreement": 0.8, "pairs": 10, "length_ratio": 1.0},
                                               {"agreement": 0.7, "pairs": 9, "length_ratio": 1.2}]}},
            {"seed": 1, "ceiling": row, "start": row, "reader_probe": probe(0.52, 0.94), "minutes": 1.0,
             "isr_dpo": {**row, "iterations": [{"agreement": 0.9, "pairs": 10, "length_ratio": 0.8},
                                               {"agreement": 0.7, "pairs": 9, "length_ratio": 1.2}]}}]
    manifest = {"misalignment": {"prior_rate": 0.75, "invent_rate": 0.5, "altered_sft_answers": {}, "sft_answers": {}},
                "files": {"qa_test.json": {"records": 10}}}
    text = format_gym(runs, manifest, GymBudget(methods=("isr_dpo",)), "vlmalign gym")
    assert "(100 pairs), by what it read: none 51.0 ± 1.4%; caption 92.0 ± 2.8% (colour 92 ± 3, count 100 ± 0)." in text
    assert ("ISR-DPO (reader judge, retrospective context): judge agreement with the oracle on the pairs it judged, "
            "chosen/rejected length ratio: iteration 1: agreement 85.0 ± 7.1%, length ratio 0.90 ± 0.14; "
            "iteration 2: agreement 70.0 ± 0.0%, length ratio 1.20 ± 0.00.") in text


@pytest.mark.e2e
def test_judged_methods_run_with_their_twins_and_controls_from_one_command(tmp_path, one_thread, monkeypatch):
    """`vlmalign gym --methods isr_dpo,vlm_rlaif,ppo,ppo_oracle` at toy sizes: the reader judge is
    trained and probed, each judged method runs with its context-free twin and its control, and the
    table says what the judge read and how often it agreed with the oracle; the oracle's RM + PPO
    trains its reward model on oracle pairs of its own `rm_questions`, PPO on the oracle's scores
    needs none, and every PPO row takes the budget's KL coefficient.
    (Whether they learn is the full gym's question: docs/results.md.) It runs from a folder outside
    the repository, as users run the gym: no stage may read a path relative to the repository."""
    from vlmalign.gym import run_gym

    (tmp_path / "elsewhere").mkdir()
    monkeypatch.chdir(tmp_path / "elsewhere")

    toy = GymBudget(videos=40, splits=(0.6, 0.1, 0.3), max_objects=1, sft_epochs=1, sft_batch_size=8, sft_lr=1.5e-3, reader_epochs=1,
                    reader_first_types=("colour",), reader_first_epochs=1,
                    dpo_questions=12, dpo_epochs=2, isr_iterations=2, rm_questions=16, ppo_rollouts=1, ppo_kl_coef=0.5,
                    eval_limit=12, methods=("isr_dpo", "vlm_rlaif", "ppo", "ppo_oracle"))
    (run,) = run_gym(tmp_path / "gym", toy, seeds=(0,), command="vlmalign gym --methods isr_dpo,vlm_rlaif,ppo,ppo_oracle")
    # the reader's first stage read the colour records alone, and the mix continued from it
    gym = tmp_path / "gym"
    records = json.loads((gym / "reader-data" / "records.json").read_text())
    colour = json.loads((gym / "reader-data" / "records-colour.json").read_text())
    assert colour == [r for r in records if r["question_type"] == "colour"] and 0 < len(colour) < len(records)
    first, mix = (yaml.safe_load((gym / name / "config.yaml").read_text()) for name in ("reader-first", "reader"))
    assert first["data"]["train"] == [str(gym / "reader-data" / "records-colour.json")] and first["model"]["init_from"] is None
    assert mix["data"]["train"] == [str(gym / "reader-data" / "records.json")]
    assert mix["model"]["init_from"] == str(gym / "reader-first" / "final")
    # the reader trains with the budget's SFT optimiser, as the SFT models do
    assert first["train"]["lr"] == mix["train"]["lr"] == 1.5e-3
    for name in ("isr_dpo", "isr_dpo-none", "isr_dpo-control", "vlm_rlaif", "vlm_rlaif-none", "vlm_rlaif-control",
                 "ppo", "ppo-control", "ppo_oracle", "ppo_oracle-control"):
        assert "failed" not in run[name] and 0 <= run[name]["all"] <= 1, (name, run[name])
    assert set(run["reader_probe"]) == {"none", "caption", "narrative"} and run["reader_probe"]["caption"]["n"] > 0
    assert len(run["isr_dpo"]["iterations"]) == 2 and len(run["vlm_rlaif"]["iterations"]) == 1
    seed_dir = tmp_path / "gym" / "seed-0"
    # the judged runs were judged by the reader, by likelihood, without the video; the control by chance
    for run_dir, backend in (("isr_dpo/iter-01", "likelihood"), ("vlm_rlaif/prefs", "likelihood"),
                             ("isr_dpo-control/iter-01", "random")):
        stats = json.loads((seed_dir / run_dir / "stats.json").read_text())
        assert stats["judge"].startswith(backend), stats["judge"]
    # the oracle's reward model: every good answer against every poor one of its own rm_questions'
    # samples, scored as DPO's (DPO, not run here, would sample its dpo_questions in dpo/prefs)
    scored = [json.loads(line) for line in (seed_dir / "ppo" / "prefs" / "samples.jsonl").read_text().splitlines()]
    assert len(scored) == 16 and len(scored[0]["answers"]) == 6 and not (seed_dir / "dpo").exists()
    dpo_style = [(r["chosen"], r["rejected"]) for r in map(json.loads, (seed_dir / "ppo" / "prefs" / "preferences.jsonl").open())]
    rm_data = seed_dir / "ppo" / "every_pair.jsonl"
    rm_pairs = [(r["chosen"], r["rejected"]) for r in map(json.loads, rm_data.open())]
    assert set(dpo_style) <= set(rm_pairs)
    assert str(rm_data) in (seed_dir / "ppo" / "rm" / "config.yaml").read_text()
    swapped = [json.loads(line) for line in (seed_dir / "ppo-control" / "swapped.jsonl").read_text().splitlines()]
    assert [(r["chosen"], r["rejected"]) for r in swapped] == [(b, a) for a, b in rm_pairs]
    # PPO on scores: the oracle's (the random judge's for the control), no reward model trained
    for name, backend in (("ppo_oracle", "oracle"), ("ppo_oracle-control", "random")):
        cfg = yaml.safe_load((seed_dir / name / "config.yaml").read_text())
        assert (cfg["reward"], cfg["judge"]["backend"], cfg["reward_model"]) == ("judge", backend, ""), name
        assert not (seed_dir / name / "rm").exists()
    for name in ("ppo_oracle", "ppo_oracle-control", "ppo/ppo", "ppo-control/ppo", "vlm_rlaif/ppo", "vlm_rlaif-none/ppo"):
        assert yaml.safe_load((seed_dir / name / "config.yaml").read_text())["ppo"]["kl_coef"] == 0.5, name
    # ISR-DPO's questions: short and describe ones of the same videos (listing every describe question
    # first had left no short one once the training videos outnumbered the questions asked)
    asked = [json.loads(line)["id"] for line in (seed_dir / "isr_dpo" / "iter-01" / "samples.jsonl").read_text().splitlines()]
    describe = {r["id"] for r in json.loads((gym / "bench" / "sft_hard.json").read_text())}
    assert len(asked) == 12 and 0 < len(set(asked) & describe) < 12
    assert {a.rsplit("_q", 1)[0] for a in asked if a in describe} <= {a.rsplit("_q", 1)[0] for a in asked if a not in describe}
    contexts = json.loads((seed_dir / "isr_dpo" / "iter-02" / "contexts.json").read_text())
    assert contexts["settings"]["mode"] == "retrospective" and contexts["contexts"]
    text = (tmp_path / "gym" / "gym.md").read_text()
    for label in ("ISR-DPO (reader judge, retrospective context)", "twin: ISR-DPO, reader judge without context",
                  "control: ISR-DPO on random verdicts", "VLM-RLAIF: RM + PPO (reader judge, 3-clip narrative)",
                  "Reader judge (likelihood, text only)", "PPO on oracle scores (no reward model)",
                  "control: PPO on random scores"):
        assert label in text


def test_the_grid_design_gives_every_model_four_placed_tokens_a_frame_and_methods_none_stops_at_the_gap(tmp_path, one_thread):
    """`vlmalign gym --design grid --methods none` at toy sizes: both SFT models read each frame as a 2 x 2
    grid (16 frames x 4 + 64 patch tokens) with a learned position per token, the folder records
    the design, and no method runs."""
    from vlmalign.data.synthetic import _split_sizes
    from vlmalign.errors import VlmalignError
    from vlmalign.gym import GRID, run_gym
    from vlmalign.model.policy import load_model

    assert _split_sizes(GRID.videos, GRID.splits) == (2100, 84, 216)  # the declared design's videos
    toy = GymBudget(videos=40, splits=(0.6, 0.1, 0.3), max_objects=1, sft_epochs=1, sft_batch_size=8, eval_limit=12,
                    frame_grid=2, visual_positions=True, methods=())
    (run,) = run_gym(tmp_path / "gym", toy, seeds=(0,), command="vlmalign gym --design grid --methods none")
    assert {"ceiling", "start"} <= set(run) and not set(run) & {"dpo", "grpo", "reader_probe"}
    for name in ("ceiling", "start"):
        model = load_model(tmp_path / "gym" / "seed-0" / name / "final")
        assert model.num_visual_tokens == 16 * 4 + 64 and model.visual_positions.shape == (128, 128)
    settings = json.loads((tmp_path / "gym" / "gym-settings.json").read_text())
    assert (settings["frame_grid"], settings["visual_positions"]) == (2, True)
    assert "Gap (ceiling - start)" in (tmp_path / "gym" / "gym.md").read_text()
    with pytest.raises(VlmalignError, match=r"frame_grid, visual_positions: vlmalign's VideoLM's pooling \(the grid and perception designs'\); qwen2_5_vl pools"):
        run_gym(tmp_path / "hf", GymBudget(frame_grid=2, family="qwen2_5_vl"), seeds=(0,))


def test_the_perception_stage_trains_on_one_object_videos_and_both_sft_models_start_from_it(tmp_path, one_thread):
    """`vlmalign gym --methods none` (the perception design) at toy sizes: the stage runs its steps on the
    true direction and shape answers about the one-object training videos alone, with the design's
    optimiser, and the ceiling and the start both start from its model; the table shows its row."""
    from vlmalign.gym import PERCEPTION, run_gym

    assert (PERCEPTION.perception_steps, PERCEPTION.sft_lr, PERCEPTION.frame_grid) == (3000, 1e-3, 2)
    toy = GymBudget(videos=40, splits=(0.6, 0.1, 0.3), max_objects=2, sft_epochs=1, sft_batch_size=8, eval_limit=12,
                    sft_lr=1e-3, sft_scheduler="constant", sft_weight_decay=0.01, perception_steps=5, methods=())
    (run,) = run_gym(tmp_path / "gym", toy, seeds=(0,), command="vlmalign gym --methods none")
    seed_dir, bench = tmp_path / "gym" / "seed-0", tmp_path / "gym" / "bench"
    videos = {v["id"]: v for v in map(json.loads, (bench / "metadata.jsonl").read_text().splitlines())}
    rows = json.loads((bench / "perception_train.json").read_text())
    one_object = [i for i, v in videos.items() if v["split"] == "train" and len(v["objects"]) == 1]
    assert 0 < len(one_object) < sum(v["split"] == "train" for v in videos.values())  # the toy has both kinds
    assert {r["id"].rsplit("_q", 1)[0] for r in rows} == set(one_object)
    assert {r["question_type"] for r in rows} == {"direction", "shape"} and len(rows) == 2 * len(one_object)
    logged = [json.loads(line) for line in (seed_dir / "perception" / "metrics.jsonl").read_text().splitlines()]
    assert logged[-1]["step"] == 5 and logged[-1]["lr"] == pytest.approx(1e-3)
    for name in ("ceiling", "start"):
        config = yaml.safe_load((seed_dir / name / "config.yaml").read_text())
        assert config["model"]["init_from"] == str(seed_dir / "perception" / "final")
        assert (config["train"]["lr"], config["train"]["scheduler"], config["train"]["weight_decay"]) == (1e-3, "constant", 0.01)
    assert {"perception", "ceiling", "start"} <= set(run)
    assert "| perception stage (both SFT models start here) |" in (tmp_path / "gym" / "gym.md").read_text()
