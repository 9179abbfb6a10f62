"""vlmalign inspect: reading what the stages wrote, judge-human agreement, the annotation server, and
the site in a real browser (headless Chromium from the system's `chromium` package, driven by
selenium; those tests are e2e and skip, saying why, where either is missing)."""

import json
import threading
from pathlib import Path

import pytest

from vlmalign.cli import main
from vlmalign.config import PrefsConfig, load_config, save_config
from vlmalign.feedback.oracle import Oracle
from vlmalign.feedback.preferences import make_preferences, read_questions
from vlmalign.inspect.agreement import agreement, read_annotations, wilson_interval
from vlmalign.inspect.serve import make_server
from vlmalign.inspect.site import build_site, collect

REPO = Path(__file__).resolve().parents[1]


# --- runs made by make-prefs on the 12-video benchmark, from answers written here --------------
def write_samples(bench: Path, run_dir: Path, limit: int, first_answers: dict | None = None) -> list:
    """samples.jsonl for the first `limit` questions of sft_easy.json, which make-prefs reuses
    instead of sampling: per question the true answer and another question's true answer (often
    wrong here), in alternating order, and every fifth question the same answer twice;
    `first_answers` {question number: text} replaces those questions' first answer."""
    questions = read_questions([str(bench / "sft_easy.json")], None, limit)
    oracle = Oracle.from_dir(bench)
    truths = [oracle.reference(q.video, q.question) for q in questions]
    rows = []
    for k, q in enumerate(questions):
        pair = [truths[k], truths[(k + 1) % len(truths)]]
        if k % 5 == 0:
            pair = [truths[k], truths[k]]
        elif k % 2:
            pair.reverse()
        pair[0] = (first_answers or {}).get(k, pair[0])
        rows.append({"id": q.id, "answers": [{"text": t, "logp": -1.5 - i, "num_tokens": len(t.split()) + 1, "finished": True}
                                             for i, t in enumerate(pair)]})
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "samples.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return questions


def prefs_run(bench: Path, run_dir: Path, limit: int = 30, first_answers: dict | None = None, **settings) -> dict:
    """A make-prefs run (random judge, the oracle's agreement reported) over written samples;
    returns its stats. No model is needed: the samples are reused and the random judge reads text."""
    questions = write_samples(bench, run_dir, limit, first_answers)
    base = {"run.dir": run_dir, "run.progress": "false", "policy": "written-samples", "data.train": f"[{bench}/sft_easy.json]",
            "sampling.num_samples": 2, "judge.backend": "random", "preferences.oracle": bench, "preferences.limit": limit,
            "context.captions": bench / "captions.json", **settings}
    cfg = load_config(PrefsConfig, str(REPO / "configs" / "tiny" / "prefs.yaml"), [f"{k}={v}" for k, v in base.items()])
    save_config(cfg, run_dir / "config.yaml")  # as `vlmalign make-prefs` does
    return make_preferences(cfg, None, None, questions, run_dir)[1]


@pytest.fixture(scope="module")
def judged_runs(tiny_bench, tmp_path_factory) -> Path:
    """Three make-prefs runs, as the judges stage writes them: pairwise with no context and with
    the caption (judges of different seeds), and 1-5 scores of the same answer pairs."""
    root = tmp_path_factory.mktemp("judged")
    prefs_run(tiny_bench, root / "none", **{"preferences.method": "pairwise", "context.kind": "none", "judge.seed": 1})
    prefs_run(tiny_bench, root / "caption", **{"preferences.method": "pairwise", "context.kind": "caption", "judge.seed": 2})
    prefs_run(tiny_bench, root / "score-caption", **{"preferences.method": "score_threshold", "context.kind": "caption",
                                                      "judge.seed": 3})
    return root


def test_oracle_annotations_give_the_judge_oracle_agreement_make_prefs_reports(judged_runs, tmp_path, capsys):
    """The agreement maths against the stage's: with the oracle's verdicts in the annotation file,
    --agreement reproduces each run's oracle_agreement (pairwise: agreement and n; 1-5 scores:
    pair_agreement, pairs_ordered and pairs_tied), per context mode."""
    annotations = tmp_path / "oracle.jsonl"
    assert main(["inspect", str(judged_runs), "--oracle-annotations", str(annotations)]) == 0
    results = {r["run"]: r for r in agreement(read_annotations(annotations))}
    checked = 0
    for name in ("none", "caption", "score-caption"):
        stats = json.loads((judged_runs / name / "stats.json").read_text())
        figures = stats["oracle_agreement"]
        row = results[name]
        assert row["context"] == stats["context"]
        if name.startswith("score"):
            assert (row["agreement"], row["n"], row["judge_ties"]) == (
                figures["pair_agreement"], figures["pairs_ordered"], figures["pairs_tied"])
        else:
            assert (row["agreement"], row["n"]) == (figures["agreement"], figures["n"])
        assert row["n"] >= 10 and 0 < row["agreement"] < 1  # a random judge: neither always right nor always wrong
        checked += 1
    assert checked == 3
    capsys.readouterr()
    assert main(["inspect", "--agreement", str(annotations)]) == 0
    printed = capsys.readouterr().out
    figures = json.loads((judged_runs / "none" / "stats.json").read_text())["oracle_agreement"]
    assert f"| none | none | {100 * figures['agreement']:.1f} |" in printed and "Wilson" in printed


def test_oracle_annotations_replace_the_file_whole_or_not_at_all(judged_runs, tmp_path, capsys):
    """A write that fails part-way (here past a file-size limit, as on a full disk) leaves the old
    file as it was and nothing beside it, and is a one-line error."""
    import resource
    import signal

    path = tmp_path / "oracle.jsonl"
    path.write_text("old\n")
    limit = resource.getrlimit(resource.RLIMIT_FSIZE)
    handler = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # past the limit a write fails (EFBIG), not the process
    resource.setrlimit(resource.RLIMIT_FSIZE, (4096, limit[1]))  # the oracle's rows are over 4 kB
    try:
        code = main(["inspect", str(judged_runs), "--oracle-annotations", str(path)])
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, limit)
        signal.signal(signal.SIGXFSZ, handler)
    assert code == 2
    assert path.read_text() == "old\n" and [p.name for p in tmp_path.iterdir()] == ["oracle.jsonl"]
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and str(path) in err and "too large" in err


def test_wilson_interval_matches_a_hand_computed_case():
    # 8 of 10, z = 1.96: centre (0.8 + 0.19208) / 1.38416 = 0.71674, half-width
    # 1.96 / 1.38416 * sqrt(0.016 + 0.009604) = 0.22658
    low, high = wilson_interval(8, 10, z=1.96)
    assert low == pytest.approx(0.49016, abs=1e-5) and high == pytest.approx(0.94332, abs=1e-5)
    assert wilson_interval(0, 0) == (None, None)
    low, high = wilson_interval(5, 5)
    assert high == 1.0 and 0.5 < low < 0.6  # stays inside [0, 1] where the normal interval would not


def test_agreement_counts_only_pairs_both_decided_per_run(tmp_path):
    def row(run, context, preferred, judge, pair, annotator="p1"):
        return {"pair": pair, "run": run, "context": context, "preferred": preferred, "judge": judge, "annotator": annotator}

    rows = [row("r1", "none", 0, 0, "a"), row("r1", "none", 1, 0, "b"), row("r1", "none", "tie", 0, "c"),
            row("r1", "none", 0, None, "d"), row("r1", "none", 1, "tie", "e"), row("r1", "none", 1, 1, "f"),
            row("r2", "caption", 0, 1, "g"), row("r2", "caption", 0, 0, "g"),  # annotated again: the later verdict counts
            row("r2", "caption", 1, 1, "g", annotator="p2")]
    path = tmp_path / "a.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    r1, r2, total = agreement(read_annotations(path))
    assert (r1["agree"], r1["n"], r1["human_ties"], r1["no_verdict"], r1["judge_ties"]) == (2, 3, 1, 1, 1)
    assert (r2["agree"], r2["n"], r2["annotated"]) == (2, 2, 2)
    assert (total["run"], total["agree"], total["n"]) == ("all", 4, 5)
    assert (r1["ci_low"], r1["ci_high"]) == wilson_interval(2, 3)


def test_malformed_annotation_files_name_line_and_field(tmp_path, capsys):
    good = {"pair": "r/q", "run": "r", "context": "none", "preferred": 0, "judge": 1}
    for bad, message in [({**good, "preferred": "A"}, "bad.jsonl:2: field 'preferred' is 'A'"),
                         ({k: v for k, v in good.items() if k != "judge"}, "bad.jsonl:2: missing field 'judge'"),
                         ({**good, "judge": True}, "bad.jsonl:2: field 'judge' is True"),  # == 1, yet no verdict
                         ({**good, "pair": ["r", "q"]}, "bad.jsonl:2: field 'pair' is ['r', 'q']; expected a string")]:
        path = tmp_path / "bad.jsonl"
        path.write_text(json.dumps(good) + "\n" + json.dumps(bad) + "\n")
        assert main(["inspect", "--agreement", str(path)]) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and str(path) in err and message in err
    path.write_text("{not json\n")
    assert main(["inspect", "--agreement", str(path)]) == 2
    assert "bad.jsonl:1: invalid JSON" in capsys.readouterr().err


def test_a_folder_with_nothing_to_inspect_is_a_one_line_error(tmp_path, capsys):
    (tmp_path / "empty" / "sub").mkdir(parents=True)
    assert main(["inspect", str(tmp_path / "empty"), "--out", str(tmp_path / "site")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "nothing to inspect" in err and str(tmp_path / "empty") in err
    assert main(["inspect"]) == 2


def test_the_default_site_folder_is_ignored_by_git_at_the_repo_root():
    """`vlmalign inspect RUN` writes ./inspect by default: run at the repo root, the site (model
    outputs, paths of the machine) must not show up as files to commit."""
    import shutil
    import subprocess

    from vlmalign.cli import build_parser

    if not (REPO / ".git").exists() or not shutil.which("git"):
        pytest.skip("not a git checkout")
    out = build_parser().parse_args(["inspect", "runs/x"]).out
    ignored = subprocess.run(["git", "check-ignore", "-q", "--no-index", f"{out}/index.html"], cwd=REPO)
    assert ignored.returncode == 0


def test_run_files_of_the_wrong_shape_are_one_line_errors_naming_the_file(tmp_path, capsys):
    samples = json.dumps({"id": "q1", "answers": [{"text": "red."}, {"text": "blue."}, {"text": "green."}]}) + "\n"
    ranked = {"id": "q1", "ranks": [1, 2, 3], "method": "ranked", "chosen": "red.", "rejected": "green."}
    cases = [("stats.json", "[1, 2]", "expected a JSON object, not list"),
             ("eval/report.json", '"done"', "expected a JSON object, not str"),
             ("preferences.jsonl", json.dumps(ranked) + "\n", "record 'q1': field 'ranks' is [1, 2, 3]")]
    for k, (name, text, message) in enumerate(cases):
        run = tmp_path / f"run{k}"
        (run / "eval").mkdir(parents=True)
        (run / "samples.jsonl").write_text(samples)
        (run / "eval" / "predictions.jsonl").write_text(json.dumps({"id": "q1", "pred": "red."}) + "\n")
        (run / name).write_text(text)
        assert main(["inspect", str(run), "--out", str(tmp_path / "site")]) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and f"{run / name}: {message}" in err, err
    # the oracle's ties (answers of equal score share a rank) are a ranking
    tied = tmp_path / "tied"
    (tied / "eval").mkdir(parents=True)
    (tied / "samples.jsonl").write_text(samples)
    (tied / "eval" / "predictions.jsonl").write_text(json.dumps({"id": "q1", "pred": "red."}) + "\n")
    (tied / "preferences.jsonl").write_text(json.dumps({**ranked, "ranks": [0, 0, 2]}) + "\n")
    assert main(["inspect", str(tied), "--out", str(tmp_path / "site")]) == 0
    (run / "preferences.jsonl").unlink()
    (run / "config.yaml").write_text("- not a mapping\n")  # the config only adds to what is shown
    assert main(["inspect", str(run), "--out", str(tmp_path / "site")]) == 0


def test_items_show_every_answer_verdict_and_the_trained_pair(judged_runs):
    _, items, about = collect([judged_runs])
    by_run = {}
    for item in items:
        by_run.setdefault(item["run"], []).append(item)
    assert {a["run"]: a["method"] for a in about} == {"caption": "pairwise", "none": "pairwise", "score-caption": "score_threshold"}
    kept = {json.loads(line)["id"]: json.loads(line) for line in (judged_runs / "none" / "preferences.jsonl").read_text().splitlines()}
    for item in by_run["none"]:
        assert len(item["answers"]) == 2 and item["question"] and item["video"].endswith(".mp4")
        assert all(a["logp"] is not None and a["oracle"] in range(1, 6) for a in item["answers"])
        assert sum(a["judge"] == "preferred" for a in item["answers"]) == 1  # the random judge always picks
        assert item["replies"] and item["replies"][0].startswith("random compare")
        if item["id"] in kept:
            assert item["status"] == "pair kept"
            assert item["answers"][item["chosen"]]["text"] == kept[item["id"]]["chosen"]
            assert item["answers"][item["rejected"]]["text"] == kept[item["id"]]["rejected"]
        else:
            assert item["status"] == "dropped (identical or empty answer)" and item["chosen"] is None
            assert item["pair"] is None
        oracle = [a["oracle"] for a in item["answers"]]
        picked = next(k for k, a in enumerate(item["answers"]) if a["judge"] == "preferred")
        assert ("disagree" in item["flags"]) == (oracle[picked] < oracle[1 - picked])
    scores = by_run["score-caption"]
    # the judge scored level two answers the oracle tells apart, as often as make-prefs counts it
    stats = json.loads((judged_runs / "score-caption" / "stats.json").read_text())
    assert sum("tie" in i["flags"] for i in scores) == stats["oracle_agreement"]["pairs_tied"] > 0
    for item in scores:
        assert all(a["judge"].startswith("score ") for a in item["answers"])
        assert item["context"]  # the caption the judge read


def test_runs_older_than_judgments_jsonl_still_show_questions_and_kept_verdicts(judged_runs, tmp_path):
    """A run written before make-prefs kept judgments.jsonl: questions come from its config's
    question files, the kept pairs' verdicts and replies from preferences.jsonl."""
    import shutil

    old = tmp_path / "none"
    shutil.copytree(judged_runs / "none", old)
    (old / "judgments.jsonl").unlink()
    now = {i["id"]: i for i in collect([judged_runs / "none"])[1]}
    then = collect([old])[1]
    assert len(then) == len(now)
    for item in then:
        current = now[item["id"]]
        assert (item["question"], item["video"]) == (current["question"], current["video"])
        assert [a["oracle"] for a in item["answers"]] == [a["oracle"] for a in current["answers"]]
        if item["status"] == "pair kept":
            assert (item["chosen"], item["replies"], item["pair"]) == (current["chosen"], current["replies"], current["pair"])
        else:
            assert item["replies"] == [] and item["pair"] is None


def _request(port: int, method: str, path: str, body: bytes = b"", headers: dict | None = None) -> tuple[int, str]:
    """(status, reason) of one request with exactly these headers (http.client adds none we set)."""
    import http.client

    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    try:
        connection.putrequest(method, path, skip_host=True, skip_accept_encoding=True)
        for key, value in {"Host": f"127.0.0.1:{port}", **(headers or {})}.items():
            connection.putheader(key, value)
        connection.endheaders(body or None)
        response = connection.getresponse()
        return response.status, response.reason
    finally:
        connection.close()


def test_serve_writes_valid_annotations_of_its_own_origin_only(tmp_path, capsys):
    """Only the site's own page may post: another origin's page (a text/plain form post, a
    DNS-rebinding name) is refused, as are rows the annotation file's reader would refuse and bad
    lengths (answered, not a traceback in the server thread)."""
    site = tmp_path / "site"
    site.mkdir()
    (site / "index.html").write_text("<p>site</p>")
    annotations = tmp_path / "annotations.jsonl"
    server = make_server(site, annotations, 0)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    port = server.server_address[1]
    row = {"pair": "r/q1", "run": "r", "context": "none", "preferred": 0, "judge": 1, "annotator": "ana"}
    body = json.dumps(row).encode()
    as_json = {"Content-Type": "application/json", "Content-Length": str(len(body))}
    try:
        assert _request(port, "GET", "/index.html")[0] == 200
        assert _request(port, "GET", "/index.html", headers={"Host": f"localhost:{port}"})[0] == 200
        refused = [
            ("POST", body, {**as_json, "Content-Type": "text/plain"}, 415),  # a cross-origin form or no-cors fetch
            ("POST", body, {**as_json, "Host": f"attacker.example:{port}"}, 403),  # DNS rebinding
            ("GET", b"", {"Host": f"attacker.example:{port}"}, 403),
            ("POST", body, {**as_json, "Origin": "http://attacker.example"}, 403),
            ("OPTIONS", b"", {"Origin": "http://attacker.example", "Access-Control-Request-Method": "POST"}, 501),
            ("POST", body, {**as_json, "Content-Length": "abc"}, 400),
            ("POST", body, {"Content-Type": "application/json"}, 400),  # no length
            ("POST", b'{"pair": "r/q2"}', {**as_json, "Content-Length": "16"}, 400),
            ("POST", b"[1, 2]", {**as_json, "Content-Length": "6"}, 400),
        ]
        for method, data, headers, code in refused:
            assert _request(port, method, "/annotations", data, headers)[0] == code, (method, headers)
        assert not annotations.exists()
        status, reason = _request(port, "POST", "/annotations", b'{"pair": "r/q2"}', {**as_json, "Content-Length": "16"})
        assert reason == "missing field 'run'"  # the reader's one-line reason
        assert _request(port, "POST", "/annotations", body, {**as_json, "Origin": f"http://127.0.0.1:{port}"})[0] == 204
        assert _request(port, "GET", "/index.html")[0] == 200  # still serving
    finally:
        server.shutdown()
        server.server_close()
    assert read_annotations(annotations) == [row]
    assert "Traceback" not in capsys.readouterr().err


def test_site_data_keep_markup_inert(tmp_path):
    """Model output reaches the page only as JSON data inside scripts: a reply holding `</script>`
    cannot end the data script (the browser test checks it shows as text)."""
    run = tmp_path / "run"
    run.mkdir()
    answer = "</script><script>alert(1)</script>"
    (run / "samples.jsonl").write_text(json.dumps({"id": "q1", "answers": [
        {"text": answer, "logp": -1.0, "num_tokens": 3}, {"text": "blue.", "logp": -2.0, "num_tokens": 2}]}) + "\n")
    build_site([run], tmp_path / "site")
    data = (tmp_path / "site" / "data" / "prefs.js").read_text()
    assert "</script>" not in data and "<\\/script>" in data
    assert json.loads(data.split("VLM.prefs = ", 1)[1].rstrip(";\n"))[0]["answers"][0]["text"] == answer


# --- the site in headless Chromium -------------------------------------------------------------
SCRIPT_ANSWER = "<script>window.pwned = 1</script> it is red."
IMG_ANSWER = '<img src=x onerror="window.pwned = 2"> it is blue.'  # runs where a <script> put as HTML would not


def write_swap_checked_run(run: Path) -> None:
    """A pairwise run with the swap check as make-prefs writes it, by hand: one verdict that
    followed the position (inconsistent), one unreadable, one kept."""
    run.mkdir(parents=True)
    answers = [("it is red.", "it is blue."), ("a circle.", "a square."), ("two.", "one.")]
    statuses = [("inconsistent", None, ["A", "A"]), ("parse_error", None, ["maybe", "A"]), ("ok", 1, ["B", "A"])]
    (run / "samples.jsonl").write_text("".join(json.dumps({"id": f"q{k}", "answers": [
        {"text": t, "logp": -1.0 - i, "num_tokens": 3, "finished": True} for i, t in enumerate(pair)]}) + "\n"
        for k, pair in enumerate(answers)))
    (run / "judgments.jsonl").write_text("".join(json.dumps({
        "id": f"q{k}", "video": None, "question": f"question {k}?", "reference": "", "context": "",
        "judgments": [{"kind": "compare", "status": status, "value": value, "raw": raw}]}) + "\n"
        for k, (status, value, raw) in enumerate(statuses)))
    (run / "preferences.jsonl").write_text(json.dumps({"id": "q2", "chosen": "one.", "rejected": "two.", "choice": 1,
                                                       "answers": list(answers[2]), "method": "pairwise"}) + "\n")
    (run / "stats.json").write_text(json.dumps({"context": "none", "judge": "hand"}))


@pytest.fixture(scope="module")
def pipeline_site(tiny_policy, tiny_bench, tmp_path_factory):
    """A site of a tiny pipeline run: make-prefs runs (answers holding <script> and <img onerror>), a GRPO_rank run
    with its rollouts, held-out evals of its start and of its result, and a swap-checked run."""
    from vlmalign.config import GRPOConfig
    from vlmalign.eval.synthetic import evaluate_synthetic
    from vlmalign.train import grpo_rank

    root = tmp_path_factory.mktemp("pipeline")
    prefs_run(tiny_bench, root / "prefs-none", **{"preferences.method": "pairwise", "context.kind": "none", "judge.seed": 1})
    prefs_run(tiny_bench, root / "prefs-caption", first_answers={1: SCRIPT_ANSWER, 3: IMG_ANSWER},
              **{"preferences.method": "pairwise", "context.kind": "caption", "judge.seed": 2})
    write_swap_checked_run(root / "swap-checked")
    overrides = {"run.dir": root / "grpo", "run.progress": "false", "model.init_from": tiny_policy,
                 "data.train": f"[{tiny_bench}/sft_easy.json]", "data.feature_cache": root / "feature_cache",
                 "judge.bench": tiny_bench, "sampling.max_new_tokens": 5, "grpo.rollout_batch": 4, "grpo.mini_batch": 10,
                 "train.max_steps": 3, "train.log_every": 1, "eval_qa": "null"}
    final = grpo_rank.run(load_config(GRPOConfig, str(REPO / "configs" / "tiny" / "grpo_rank.yaml"),
                                      [f"{k}={v}" for k, v in overrides.items()]))
    for name, model in (("start", tiny_policy), ("grpo", final)):
        evaluate_synthetic(model, tiny_bench, root / name / "eval", limit=8, max_new_tokens=6,
                           feature_cache=str(root / "feature_cache"), progress=False)
    index = build_site([root], root / "site")
    return root, index


@pytest.fixture(scope="module")
def browser(tmp_path_factory):
    import shutil

    chromium, driver = shutil.which("chromium"), shutil.which("chromedriver")
    if not chromium or not driver:
        pytest.skip("headless Chromium not installed (Debian: apt-get install chromium chromium-driver)")
    webdriver = pytest.importorskip("selenium.webdriver", reason="selenium not installed (the dev extra brings it)")
    from selenium.webdriver.chrome.service import Service

    downloads = tmp_path_factory.mktemp("downloads")
    options = webdriver.ChromeOptions()
    options.binary_location = chromium
    for arg in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--window-size=1280,900"):
        options.add_argument(arg)
    options.set_capability("goog:loggingPrefs", {"browser": "SEVERE"})  # script errors, failed loads
    options.add_experimental_option("prefs", {"download.default_directory": str(downloads),
                                              "download.prompt_for_download": False})
    chrome = webdriver.Chrome(service=Service(driver), options=options)
    chrome.downloads = downloads
    yield chrome
    chrome.quit()


def _open(browser, url: str, selector: str, timeout: float = 10.0):
    from selenium.webdriver.support.ui import WebDriverWait

    browser.get("about:blank")  # a new document: a URL differing only in its #view would keep the old page's state
    browser.get(url)
    WebDriverWait(browser, timeout).until(lambda b: b.find_elements("css selector", selector))
    assert [entry["message"] for entry in browser.get_log("browser")] == []
    return browser.find_elements("css selector", selector)


def _screenshot(browser, path: Path) -> None:
    """A screenshot that shows something: more than a blank page's few colours."""
    from PIL import Image

    browser.save_screenshot(str(path))
    with Image.open(path) as image:
        assert len(image.convert("RGB").getcolors(1 << 20) or []) > 20


def _select(browser, css: str, label_prefix: str) -> None:
    from selenium.webdriver.support.ui import Select

    box = Select(browser.find_element("css selector", css))
    box.select_by_visible_text(next(o.text for o in box.options if o.text.startswith(label_prefix)))


@pytest.mark.e2e
def test_preferences_view_shows_each_question_and_filters(pipeline_site, browser, tmp_path):
    root, index = pipeline_site
    cards = _open(browser, f"{index.as_uri()}#prefs", "article.item")
    _screenshot(browser, tmp_path / "prefs.png")
    assert len(cards) == 20  # the first page; 30 + 30 questions of make-prefs, 3 swap-checked, 12 GRPO groups
    assert "page 1 of 4" in browser.find_element("css selector", ".pager").text
    first = cards[0]
    frames = first.find_element("css selector", "img.frames")
    assert browser.execute_script("return arguments[0].complete && arguments[0].naturalWidth", frames) > 0
    assert first.find_element("css selector", ".question").text.endswith("?")
    header = [th.text for th in first.find_elements("css selector", "table.answers th")]
    assert header[:7] == ["#", "ANSWER", "LOG-PROB", "TOKENS", "WORDS", "JUDGE", "ORACLE"] or \
        header[:7] == ["#", "answer", "log-prob", "tokens", "words", "judge", "oracle"]
    assert first.find_elements("css selector", "pre.reply")  # the judge's raw reply

    # the swap-checked run: each filter keeps exactly the item it names
    _select(browser, "select.run", "swap-checked")
    for flag, expected in (("position", ["q0"]), ("parse_error", ["q1"])):
        box = browser.find_element("css selector", f"input.filter[data-flag='{flag}']")
        box.click()
        assert [c.get_attribute("data-id") for c in browser.find_elements("css selector", "article.item")] == expected
        browser.find_element("css selector", f"input.filter[data-flag='{flag}']").click()
    kept = browser.find_element("css selector", "article.item[data-id='q2']")
    assert kept.find_element("css selector", "tr.chosen .answer-text").text == "one."
    assert kept.find_element("css selector", "tr.rejected .answer-text").text == "two."
    assert "(A, B): B" in kept.text and "(B, A): A" in kept.text  # both orders' replies

    # GRPO rollouts: each answer's advantage and the policy's own rank
    _select(browser, "select.run", "grpo")
    rollout = browser.find_element("css selector", "article.item")
    assert "advantage" in rollout.text.lower() and "policy rank" in rollout.text.lower()
    assert len(rollout.find_elements("css selector", "table.answers tr")) == 1 + 5

    # judge vs oracle: every item shown has the judge prefer the answer the oracle scores lower
    _select(browser, "select.run", "prefs-none")
    browser.find_element("css selector", "input.filter[data-flag='disagree']").click()
    shown = browser.find_elements("css selector", "article.item")
    assert shown
    for card in shown:
        rows = card.find_elements("css selector", "table.answers tr")[1:]
        picked = next(r for r in rows if r.find_element("css selector", ".judge").text == "preferred")
        other = next(r for r in rows if r is not picked)
        assert int(picked.find_element("css selector", ".oracle").text) < int(other.find_element("css selector", ".oracle").text)


@pytest.mark.e2e
def test_answers_holding_markup_show_as_text(pipeline_site, browser):
    root, index = pipeline_site
    for answer in (SCRIPT_ANSWER, IMG_ANSWER):
        _open(browser, f"{index.as_uri()}#prefs", "article.item")
        _select(browser, "select.run", "prefs-caption")
        browser.find_element("css selector", "input.search").send_keys(answer + "\n")
        assert browser.find_element("css selector", "article.item .answer-text").text == answer
        assert browser.execute_script("return document.querySelectorAll('main script, .answer-text *').length") == 0
    assert browser.execute_script("return window.pwned") is None
    assert browser.get_log("browser") == []  # no failed load of the payload's image either


@pytest.mark.e2e
def test_compare_view_puts_the_checkpoints_side_by_side(pipeline_site, browser, tmp_path):
    root, index = pipeline_site
    rows = _open(browser, f"{index.as_uri()}#compare", "table.compare tr.row")
    _screenshot(browser, tmp_path / "compare.png")
    assert [th.text for th in browser.find_elements("css selector", "th.model")] == ["grpo", "start"]
    predictions = [json.loads(line) for line in (root / "start" / "eval" / "predictions.jsonl").read_text().splitlines()]
    assert len(rows) == len(predictions) > 1
    first = rows[0].find_elements("css selector", "td.cell")[1]
    assert first.find_element("css selector", ".pred").text == predictions[0]["pred"].strip()
    browser.find_element("css selector", "input.filter[data-flag='disagree']").click()
    for row in browser.find_elements("css selector", "table.compare tr.row"):
        assert "models disagree" in row.text


@pytest.mark.e2e
def test_training_view_draws_every_metric(pipeline_site, browser, tmp_path):
    root, index = pipeline_site
    charts = _open(browser, f"{index.as_uri()}#training", ".chart")
    _screenshot(browser, tmp_path / "training.png")
    metrics = {k for line in (root / "grpo" / "metrics.jsonl").read_text().splitlines() for k, v in json.loads(line).items()
               if isinstance(v, (int, float)) and k not in ("step", "time")}
    drawn = {c.get_attribute("data-metric") for c in charts}
    assert metrics <= drawn and "kendall_tau" in drawn
    line = browser.find_element("css selector", ".chart[data-metric='loss'] polyline")
    assert len(line.get_attribute("points").split()) == 3  # one point per rollout
    summaries = [s.text for s in browser.find_elements("css selector", "details.summary summary")]
    assert "prefs-none / stats.json" in summaries and "start/eval / report.json" in summaries


@pytest.mark.e2e
def test_annotation_click_through_writes_the_expected_jsonl(pipeline_site, browser, tmp_path):
    """Blind pairs, served: A by button, B and tie by key, in turn; the server's file and the
    download hold one row per pair, each naming the answer preferred in the pair's own order."""
    from selenium.webdriver.common.action_chains import ActionChains

    root, index = pipeline_site
    _, items, _ = collect([root])
    pairs = {f"{i['run']}/{i['id']}": i for i in items if i["pair"]}
    annotations = tmp_path / "annotations.jsonl"
    server = make_server(index.parent, annotations, 0)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        url = f"http://127.0.0.1:{server.server_address[1]}/index.html#annotate?seed=7&annotator=tester"
        _open(browser, url, "article.annotate-pair")
        _screenshot(browser, tmp_path / "annotate.png")
        page = browser.find_element("css selector", "main").text
        assert f"0 of {len(pairs)} pairs annotated" in page
        # blind: no verdict, score, reply, flag or run name on the page
        assert not browser.find_elements("css selector", "main .judge, main .oracle, main .reply, main .flag, main .status")
        assert "random compare" not in page and "prefs-" not in page
        choices = []
        for k in range(len(pairs)):
            shown = browser.find_element("css selector", "article.annotate-pair").get_attribute("data-pair")
            if k % 3 == 0:
                browser.find_element("css selector", "button.choose-a").click()
                choices.append((shown, "A"))
            else:
                key, choice = ("b", "B") if k % 3 == 1 else ("t", "tie")
                ActionChains(browser).send_keys(key).perform()
                choices.append((shown, choice))
        assert "All pairs annotated" in browser.find_element("css selector", "main").text
        import time

        deadline = time.time() + 10
        while time.time() < deadline and len(annotations.read_text().splitlines() if annotations.exists() else []) < len(pairs):
            time.sleep(0.1)
        downloaded = _download_annotations(browser)
    finally:
        server.shutdown()
        server.server_close()
    served = read_annotations(annotations)
    assert len(served) == len(pairs) == len(choices)
    rows = {r["pair"]: r for r in served}
    assert set(rows) == set(pairs)
    swapped = 0
    for pair, choice in choices:
        row, item = rows[pair], pairs[pair]
        assert row["choice"] == choice and row["annotator"] == "tester" and row["context"] == item["mode"]
        assert row["answers"] == item["pair"]["answers"] and row["judge"] == item["pair"]["judge"]
        assert sorted(row["shown"]) == sorted(row["answers"])
        swapped += row["shown"] != row["answers"]
        if choice == "tie":
            assert row["preferred"] == "tie"
        else:
            picked = row["shown"][0 if choice == "A" else 1]
            assert row["answers"][row["preferred"]] == picked
    assert 0 < swapped < len(choices)  # A/B positions drawn at random
    # the page's own order is its seed's: a reload with the seed shows the same first pair
    assert [row["pair"] for row in downloaded] == [p for p, _ in choices]


@pytest.mark.e2e
def test_annotations_survive_a_rebuild_and_a_reload(pipeline_site, browser):
    """Opened from disk without a seed: the seed drawn goes into the URL and the verdicts are kept
    under the pair list, so after a rebuild (a new build time) and a reload the count, the order
    and the download carry on where the person left off."""
    from selenium.webdriver.support.ui import WebDriverWait

    root, index = pipeline_site
    _open(browser, f"{index.as_uri()}#annotate", "article.annotate-pair")
    done = []
    for button in ("choose-a", "choose-tie"):
        done.append(browser.find_element("css selector", "article.annotate-pair").get_attribute("data-pair"))
        browser.find_element("css selector", f"button.{button}").click()
    following = browser.find_element("css selector", "article.annotate-pair").get_attribute("data-pair")
    url = browser.current_url
    assert "#annotate?seed=" in url
    site_js = index.parent / "data" / "site.js"
    site_js.write_text(site_js.read_text().replace('"generated":"', '"generated":"rebuilt '))  # as --serve's rebuild
    browser.refresh()
    WebDriverWait(browser, 10).until(lambda b: "rebuilt" in b.find_element("id", "source").text)
    assert browser.current_url == url
    assert "2 of " in browser.find_element("css selector", ".progress").text
    assert browser.find_element("css selector", "article.annotate-pair").get_attribute("data-pair") == following
    assert [row["pair"] for row in _download_annotations(browser)] == done


def _download_annotations(browser) -> list[dict]:
    """Click the page's download button; the rows of the file it saves."""
    import time

    downloaded = browser.downloads / "annotations.jsonl"
    downloaded.unlink(missing_ok=True)  # else the browser saves "annotations (1).jsonl"
    browser.find_element("css selector", "button.download").click()
    deadline = time.time() + 10
    while time.time() < deadline and not downloaded.exists():
        time.sleep(0.1)
    return [json.loads(line) for line in downloaded.read_text().splitlines()]


@pytest.mark.e2e
def test_the_first_page_of_thousands_of_items_loads_in_under_two_seconds(browser, tmp_path):
    import time

    run = tmp_path / "big"
    run.mkdir()
    n = 5000
    with open(run / "samples.jsonl", "w") as fh:
        for k in range(n):
            fh.write(json.dumps({"id": f"q{k}", "answers": [
                {"text": f"answer {g} to question {k}, " + "with words " * 8, "logp": -1.0 * g, "num_tokens": 20}
                for g in range(6)]}) + "\n")
    index = build_site([run], tmp_path / "site")
    started = time.perf_counter()
    cards = _open(browser, f"{index.as_uri()}#prefs", "article.item")
    elapsed = time.perf_counter() - started
    assert len(cards) == 20 and f"{n} items" in browser.find_element("css selector", ".pager").text
    assert elapsed < 2.0
    browser.find_element("css selector", "button.next").click()
    assert browser.find_element("css selector", "article.item").get_attribute("data-id") == "q20"
