"""Judge-human agreement from the annotation file the site's annotate view writes.

Each line of the file is one verdict of a person on one pair, shown blind (no judge verdict, no
scores, random order, random A/B position):

    {"pair": "RUN/QUESTION_ID", "run": "RUN", "question_id": "...", "context": "caption",
     "answers": [i, j], "shown": [j, i], "choice": "A" | "B" | "tie",
     "preferred": 0 | 1 | "tie", "judge": 0 | 1 | "tie" | null, "annotator": "...", "time": "..."}

`answers` are the pair's answer indices in the run, `shown` the same indices in the order they were
shown as A and B; `preferred` and `judge` name the preferred answer in `answers` order (0: the
first), `judge` being null where the judge gave no usable verdict (failed, unreadable, or
inconsistent under the swap check).

Agreement, per run (each judged under one context mode) and overall: of the pairs where the person
preferred one answer and the judge gave a verdict, the share where both preferred the same answer.
Pairs the person called a tie are left out and counted (`human_ties`), as are pairs the judge scored
level (`judge_ties`) and pairs without a judge verdict (`no_verdict`). This is the rule
make-prefs' `oracle_agreement` follows with the oracle as the person: pairwise `agreement` and
`n`; for 1-5 scores on two answers, `pair_agreement`, `pairs_ordered` and `pairs_tied`.

The interval is the Wilson score interval at 95% (z = 1.96) for a binomial proportion: unlike the
normal approximation it stays inside [0, 1] and keeps its coverage for the few hundred pairs
(ISR-DPO: 200) people annotate, and near 0% or 100%.
"""

from __future__ import annotations

import math
from pathlib import Path

from vlmalign.errors import DataError
from vlmalign.inspect.jsonfiles import read_jsonl

Z95 = 1.959963984540054
_VERDICTS = (0, 1, "tie")


def wilson_interval(successes: int, n: int, z: float = Z95) -> tuple[float, float] | tuple[None, None]:
    """Wilson score interval of a binomial proportion; (None, None) for n = 0."""
    if n == 0:
        return None, None
    p = successes / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z / (1 + z * z / n) * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n))
    return max(0.0, centre - half), min(1.0, centre + half)


def annotation_problem(row: dict) -> str | None:
    """What is wrong with an annotation row (one line naming the field), or None: the rule for a
    line of the annotation file and for a row posted to `--serve`."""
    for key in ("pair", "run", "context", "preferred", "judge"):
        if key not in row:
            return f"missing field {key!r}"
    for key in ("pair", "run", "context", "annotator"):
        if key in row and not isinstance(row[key], str):
            return f"field {key!r} is {row[key]!r}; expected a string"
    if not _verdict(row["preferred"]):
        return f"field 'preferred' is {row['preferred']!r}; expected 0, 1 or \"tie\""
    if row["judge"] is not None and not _verdict(row["judge"]):
        return f"field 'judge' is {row['judge']!r}; expected 0, 1, \"tie\" or null"
    return None


def _verdict(value) -> bool:
    # true and false compare equal to 1 and 0 but are no verdict
    return not isinstance(value, bool) and value in _VERDICTS


def read_annotations(path) -> list[dict]:
    """The annotation file's rows, validated: a one-line error names the line and field at fault.
    A pair annotated twice by one person counts once, with the later verdict."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: no such annotation file")
    latest = {(row["pair"], row.get("annotator", "")): row for row in read_jsonl(path, annotation_problem)}
    if not latest:
        raise DataError(f"{path}: no annotations")
    return list(latest.values())


def _tally(rows: list[dict]) -> dict:
    agree = n = human_ties = judge_ties = no_verdict = 0
    for r in rows:
        if r["preferred"] == "tie":
            human_ties += 1
        elif r["judge"] is None:
            no_verdict += 1
        elif r["judge"] == "tie":
            judge_ties += 1
        else:
            n += 1
            agree += int(r["judge"] == r["preferred"])
    low, high = wilson_interval(agree, n)
    return {"annotated": len(rows), "agree": agree, "n": n, "agreement": agree / n if n else None,
            "ci_low": low, "ci_high": high, "human_ties": human_ties, "judge_ties": judge_ties, "no_verdict": no_verdict}


def agreement(rows: list[dict]) -> list[dict]:
    """One row per (run, context mode), in the file's order, then `all`."""
    groups: dict[tuple, list] = {}
    for r in rows:
        groups.setdefault((r["run"], r["context"]), []).append(r)
    out = [{"run": run, "context": context, **_tally(rs)} for (run, context), rs in groups.items()]
    if len(groups) > 1:
        out.append({"run": "all", "context": "", **_tally(rows)})
    return out


def format_agreement(results: list[dict], source: str) -> str:
    def pct(x):
        return "-" if x is None else f"{100 * x:.1f}"

    lines = [f"Judge-human agreement, {source}: share of pairs where the judge preferred the answer the person",
             "preferred; the person's ties, the judge's ties and pairs without a judge verdict are left out.",
             "95% interval: Wilson score.", "",
             "| run | context | agreement % | 95% CI | agree / n | human ties | judge ties | no judge verdict |",
             "|---|---|---|---|---|---|---|---|"]
    for r in results:
        ci = "-" if r["n"] == 0 else f"{pct(r['ci_low'])}-{pct(r['ci_high'])}"
        lines.append(f"| {r['run']} | {r['context']} | {pct(r['agreement'])} | {ci} | {r['agree']} / {r['n']} | "
                     f"{r['human_ties']} | {r['judge_ties']} | {r['no_verdict']} |")
    return "\n".join(lines)


def pair_row(item: dict, preferred, annotator: str, shown_first: int = 0, time: str = "") -> dict:
    """An annotation row for `item`'s pair (as the site writes it): `preferred` 0, 1 or "tie" in
    the pair's order, `shown_first` which of the two was shown as A."""
    pair = item["pair"]
    i, j = pair["answers"]
    shown = [i, j] if shown_first == 0 else [j, i]
    if preferred == "tie":
        choice = "tie"
    else:
        choice = "A" if pair["answers"][preferred] == shown[0] else "B"
    return {"pair": f"{item['run']}/{item['id']}", "run": item["run"], "question_id": item["id"], "context": item["mode"],
            "answers": [i, j], "shown": shown, "choice": choice, "preferred": preferred, "judge": pair["judge"],
            "annotator": annotator, "time": time}


def oracle_rows(items: list[dict]) -> list[dict]:
    """The annotation file the synthetic benchmark's oracle would write: per pair, the answer it
    scores higher, or a tie. Its agreement is the judge-oracle agreement make-prefs reports, so it
    checks this maths against the stage's."""
    rows = []
    for item in items:
        pair = item.get("pair")
        if pair is None:
            continue
        a, b = (item["answers"][k]["oracle"] for k in pair["answers"])
        if a is None or b is None:
            continue
        rows.append(pair_row(item, "tie" if a == b else 0 if a > b else 1, "oracle"))
    return rows
