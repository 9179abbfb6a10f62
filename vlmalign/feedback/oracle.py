"""Rule-based judge for the synthetic benchmark (`vlmalign.data.synthetic`).

The `oracle` judge backend and the ground truth of "judge agreement": it scores free-text answers
against the benchmark's `metadata.jsonl`, with no model involved.

Questions. The question is parsed with the generator's own template table
(`synthetic.parse_question`), so any question of the benchmark's files is understood; a question
of no template, or one that does not pick exactly one object of the video, raises
`VlmalignError` naming the question.

Short answers (colour, shape, count, direction). The words of the asked category are extracted
from the answer (case-insensitive, whole words):

- colours: red, green, blue, yellow, plus reddish/crimson/scarlet, greenish, bluish/navy,
  yellowish/gold/golden;
- shapes: square(s)/box/block, circle(s)/disc/disk/dot/ball/round, triangle(s)/triangular,
  cross(es)/plus ("crosses the ..." is read as a verb, not a shape);
- counts: digits and the words zero..ten and "single". If some numbers stand right before an
  object noun ("two objects", "3 moving shapes"), only those count, so "Two objects, one of them
  moving left" reads as 2;
- directions: left/leftward(s), right/rightward(s), up/upward(s)/"to(wards) the top"/rises,
  down/downward(s)/"to(wards) the bottom"/falls/sinks/drops. Place words are skipped: "from the
  left", "top-left", "upper left", "the left side/edge/corner", "to the left of", and "shows up",
  "left the frame" (leaving). If some direction words follow a motion verb within four words
  ("moves slowly to the left"), only those count, so "It starts on the left and moves right"
  reads as right.

A word is negated, and ignored, when "not", "no", "never", "nor", "neither", "without" or a
"...n't" word stands within the four words before it in the same clause (clauses end at . , ; : ! ?
and "but"): "It is not red but blue" reads as blue. That is the only negation handled; double
negatives, "anything but red", "red is wrong" and similar are misread.

Then: an answer that names another object than the one asked about ("The square is yellow." to
"What colour is the triangle?": a shape word, none of them the asked shape; for shape questions a
colour word, none the asked colour; direction questions both) -> 1, whatever it states; else exactly
the true value -> score 5, correct; the true value and wrong ones (hedging) -> 2; only wrong values
-> 1; no value of the category -> 1.

Describe answers. An object is mentioned when a colour word is followed by a shape word, with at
most one word between them from a small list (large, small, coloured, ...): "a red square". Mentions
without a colour ("the square", "it") do not name an object. Direction and leaving words
(disappears, vanishes, leaves, exits, is gone) belong to the nearest object mentioned before them
in the same sentence, else the nearest after them in the sentence, else the last object mentioned
earlier. The facts of the video are: each object's colour+shape (mentioned), its direction (the
directions attributed to it are exactly the true one), that it disappears (only for objects that
leave before the last frame), and, for each pair of objects that appear at different frames, their
temporal order (the one that appears first is mentioned first). Errors are: each colour+shape
mentioned that is not in the video, and each "disappears" claim for an object that stays to the end.
With f = max(0, facts stated - errors) / facts of the video: f = 1 -> 5, f >= 0.75 -> 4,
f >= 0.5 -> 3, f >= 0.25 -> 2, else 1; correct when the score is >= 4.

Ranking. Higher score first; answers of equal score share a rank (competition ranking: each rank
counts the answers that score higher), so a group of equally right or wrong answers is all zeros.
Comparison. The higher score wins; two answers of equal score are a tie (None): the oracle
has no preference between two equally right or equally wrong answers, and breaking the tie by
length would teach whatever learns from its pairs to answer short.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

from vlmalign.data import synthetic as syn
from vlmalign.data.formats import iter_json_records
from vlmalign.errors import DataError, VlmalignError

__all__ = ["Oracle", "OracleVerdict", "extract_values", "describe_facts", "description_claims", "generative_scores",
           "consistency_score"]


@dataclass
class OracleVerdict:
    score: int  # 1..5
    correct: bool  # what accuracy counts
    qtype: str  # colour | shape | count | direction | describe
    reason: str  # short human-readable explanation


# ------------------------------------------------------------------------------------ vocabulary

_COLOUR_SYNONYMS = {
    "red": "red", "reddish": "red", "crimson": "red", "scarlet": "red",
    "green": "green", "greenish": "green",
    "blue": "blue", "bluish": "blue", "blueish": "blue", "navy": "blue",
    "yellow": "yellow", "yellowish": "yellow", "gold": "yellow", "golden": "yellow",
}
_SHAPE_SYNONYMS = {
    "square": "square", "squares": "square", "box": "square", "boxes": "square", "block": "square",
    "blocks": "square",
    "circle": "circle", "circles": "circle", "disc": "circle", "discs": "circle", "disk": "circle",
    "disks": "circle", "dot": "circle", "dots": "circle", "ball": "circle", "balls": "circle",
    "round": "circle",
    "triangle": "triangle", "triangles": "triangle", "triangular": "triangle",
    "cross": "cross", "crosses": "cross", "plus": "cross",
}
_NUMBER_SYNONYMS = {w: i for i, w in enumerate(syn.NUMBER_WORDS)} | {"single": 1}
_DIRECTION_PATTERNS = {
    "left": r"leftwards?|left",
    "right": r"rightwards?|right",
    "up": r"upwards?|up|(?:to|toward|towards)\s+the\s+top|rises|rising|rose",
    "down": r"downwards?|down|(?:to|toward|towards)\s+the\s+bottom|falls?|falling|fell|sinks?|sinking|drops?|dropping",
}
_SELF_ANCHORED = re.compile(r"rises|rising|rose|falls?|falling|fell|sinks?|sinking|drops?|dropping")
_MOTION_VERBS = {
    "move", "moves", "moving", "moved", "go", "goes", "going", "went", "travel", "travels", "travelling",
    "traveling", "travelled", "traveled", "drift", "drifts", "drifting", "drifted", "head", "heads",
    "heading", "headed", "slide", "slides", "sliding", "slid", "glide", "glides", "gliding", "glided",
    "shift", "shifts", "shifting", "shifted", "float", "floats", "floating", "floated", "run", "runs",
    "running", "ran", "fly", "flies", "flying", "flew", "motion", "movement",
}
_PLACE_BEFORE = {"top", "bottom", "upper", "lower", "far"}
_PLACE_AFTER = {"side", "sides", "edge", "edges", "corner", "corners", "part", "half", "area", "region",
                "of", "hand", "border", "wall", "margin"}
_NOT_UP_BEFORE = {"show", "shows", "showed", "shown", "showing", "pop", "pops", "popped", "popping", "turn",
                  "turns", "turned", "end", "ends", "ended", "set", "sets", "pick", "picks", "line", "lines",
                  "light", "lights", "lit", "speed", "speeds", "make", "makes", "made", "show's"}
_NOT_DOWN_BEFORE = {"slow", "slows", "slowed", "slowing", "calm", "calms", "settle", "settles", "sit", "sits",
                    "break", "breaks"}
_NOT_RIGHT_AROUND = {"away", "after", "before", "now", "then", "at", "here", "there"}
_OBJECT_NOUNS = {"object", "objects", "shape", "shapes", "thing", "things", "item", "items", "figure", "figures"}
_NEGATORS = {"not", "no", "never", "nor", "neither", "without", "cannot", "none"}
_FILLERS = r"coloured|colored|small|large|big|little|tiny|bright|dark|light|solid|filled|moving|shaped"
_EXIT = re.compile(
    r"\b(?:disappear(?:s|ed|ing)?|vanish(?:es|ed|ing)?|leaves|exits?|exited|exiting|"
    r"(?:is|are|was|were)\s+gone|goes\s+away|went\s+away|left\s+(?:the|behind))\b"
)
_TOKEN = re.compile(r"[a-z0-9]+(?:'[a-z]+)?")
_CLAUSE_END = re.compile(r"[.,;:!?\n]|\bbut\b|\bhowever\b")


def _alternation(words) -> str:
    return "|".join(sorted(map(re.escape, words), key=len, reverse=True))


_COLOUR_RE = re.compile(rf"\b(?:{_alternation(_COLOUR_SYNONYMS)})\b")
_SHAPE_RE = re.compile(rf"\b(?:{_alternation(_SHAPE_SYNONYMS)})\b")
_NUMBER_RE = re.compile(rf"\b(?:\d+|{_alternation(_NUMBER_SYNONYMS)})\b")
_DIRECTION_RE = re.compile(r"\b(?:" + "|".join(f"(?P<{k}>{v})" for k, v in _DIRECTION_PATTERNS.items()) + r")\b")
_MENTION_RE = re.compile(
    rf"\b(?P<colour>{_alternation(_COLOUR_SYNONYMS)})(?:[\s-]+(?:{_FILLERS}))?[\s-]+"
    rf"(?P<shape>{_alternation(_SHAPE_SYNONYMS)})\b"
)


def _normalise(text) -> str:
    return str(text or "").lower().replace("’", "'").replace("‘", "'")


def _before(text: str, start: int, n: int = 4) -> list[str]:
    """The last n words before `start` in the same clause."""
    clause_start = 0
    for m in _CLAUSE_END.finditer(text, 0, start):
        clause_start = m.end()
    return _TOKEN.findall(text[clause_start:start])[-n:]


def _after(text: str, end: int, n: int = 2) -> list[str]:
    """The first n words after `end` in the same clause."""
    rest = text[end:end + 60]
    m = _CLAUSE_END.search(rest)
    return _TOKEN.findall(rest[:m.start()] if m else rest)[:n]


def _negated(text: str, start: int) -> bool:
    return any(w in _NEGATORS or w.endswith("n't") for w in _before(text, start))


@dataclass(frozen=True)
class _Hit:
    value: object
    start: int
    end: int
    anchored: bool = False


def _colour_hits(text: str) -> list[_Hit]:
    return [_Hit(_COLOUR_SYNONYMS[m.group()], m.start(), m.end()) for m in _COLOUR_RE.finditer(text)
            if not _negated(text, m.start())]


def _shape_hits(text: str) -> list[_Hit]:
    hits = []
    for m in _SHAPE_RE.finditer(text):
        nxt = _after(text, m.end(), 1)
        if m.group() in ("cross", "crosses") and nxt and nxt[0] in ("the", "over", "into", "through", "from"):
            continue  # the verb
        if not _negated(text, m.start()):
            hits.append(_Hit(_SHAPE_SYNONYMS[m.group()], m.start(), m.end()))
    return hits


def _count_hits(text: str) -> list[_Hit]:
    hits = []
    for m in _NUMBER_RE.finditer(text):
        if _negated(text, m.start()):
            continue
        word = m.group()
        value = int(word) if word.isdigit() else _NUMBER_SYNONYMS[word]
        nxt = _after(text, m.end(), 2)
        anchored = bool(nxt) and (nxt[0] in _OBJECT_NOUNS or (len(nxt) > 1 and nxt[1] in _OBJECT_NOUNS))
        hits.append(_Hit(value, m.start(), m.end(), anchored))
    return hits


def _direction_hits(text: str) -> list[_Hit]:
    hits = []
    for m in _DIRECTION_RE.finditer(text):
        direction = m.lastgroup
        word = m.group()
        prev = _before(text, m.start(), 4)
        nxt = _after(text, m.end(), 1)
        p1 = prev[-1] if prev else ""
        p2 = prev[-2] if len(prev) > 1 else ""
        n1 = nxt[0] if nxt else ""
        if p1 == "from" or (p1 == "the" and p2 == "from"):
            continue  # where it comes from
        if p1 in _PLACE_BEFORE or n1 in _PLACE_AFTER:
            continue  # a place: "top-left", "the left side", "to the left of"
        if word == "left" and n1 in ("the", "behind"):
            continue  # "left the frame": leaving
        if word == "up" and p1 in _NOT_UP_BEFORE:
            continue
        if word == "down" and p1 in _NOT_DOWN_BEFORE:
            continue
        if word == "right" and (n1 in _NOT_RIGHT_AROUND or p1 in ("all", "that's", "thats")):
            continue
        if _negated(text, m.start()):
            continue
        anchored = bool(_SELF_ANCHORED.fullmatch(word)) or any(w in _MOTION_VERBS for w in prev)
        hits.append(_Hit(direction, m.start(), m.end(), anchored))
    return hits


def _prefer_anchored(hits: list[_Hit]) -> list[_Hit]:
    anchored = [h for h in hits if h.anchored]
    return anchored or hits


def extract_values(qtype: str, answer: str) -> list:
    """The values of category `qtype` an answer states, in order of appearance (see module doc)."""
    text = _normalise(answer)
    if qtype == "colour":
        hits = _colour_hits(text)
    elif qtype == "shape":
        hits = _shape_hits(text)
    elif qtype == "count":
        hits = _prefer_anchored(_count_hits(text))
    elif qtype == "direction":
        hits = _prefer_anchored(_direction_hits(text))
    else:
        raise ValueError(f"no values to extract for question type {qtype!r}")
    return [h.value for h in hits]


# ---------------------------------------------------------------------------------- describe


def _sentence_bounds(text: str) -> list[tuple[int, int]]:
    bounds, start = [], 0
    for m in re.finditer(r"[.!?;\n]+", text):
        bounds.append((start, m.end()))
        start = m.end()
    if start < len(text):
        bounds.append((start, len(text)))
    return bounds


@dataclass
class _Description:
    """What a free-text description says: the objects it names (colour, shape) with the position of
    their first mention, the directions and the leaving attributed to each."""
    first: dict  # (colour, shape) -> position of the first mention
    directions: dict  # (colour, shape) -> set of directions
    exits: set  # (colour, shape) said to disappear


def _read_description(answer: str) -> _Description:
    text = _normalise(answer)
    sentences = _sentence_bounds(text)

    def sentence_of(pos: int) -> int:
        for i, (a, b) in enumerate(sentences):
            if a <= pos < b:
                return i
        return len(sentences) - 1

    mentions = []  # (start, key, sentence)
    for m in _MENTION_RE.finditer(text):
        if _negated(text, m.start()):
            continue
        key = (_COLOUR_SYNONYMS[m.group("colour")], _SHAPE_SYNONYMS[m.group("shape")])
        mentions.append((m.start(), key, sentence_of(m.start())))

    def owner(pos: int):
        s = sentence_of(pos)
        before = [x for x in mentions if x[0] < pos and x[2] == s]
        if before:
            return before[-1][1]
        after = [x for x in mentions if x[0] > pos and x[2] == s]
        if after:
            return after[0][1]
        earlier = [x for x in mentions if x[0] < pos]
        return earlier[-1][1] if earlier else None

    directions: dict[tuple, set] = {}
    for h in _prefer_anchored(_direction_hits(text)):
        key = owner(h.start)
        if key is not None:
            directions.setdefault(key, set()).add(h.value)
    exits: set = set()
    for m in _EXIT.finditer(text):
        if not _negated(text, m.start()):
            key = owner(m.start())
            if key is not None:
                exits.add(key)
    first = {}
    for pos, key, _ in mentions:
        first.setdefault(key, pos)
    return _Description(first, directions, exits)


def describe_facts(meta: dict, answer: str) -> dict:
    """Facts of the video an answer states and the errors it makes (see module doc)."""
    said = _read_description(answer)
    first, directions, exits = said.first, said.directions, said.exits
    objects = meta["objects"]
    truth = {(o["colour"], o["shape"]): o for o in objects}
    by_kind = {kind: [0, 0] for kind in ("object", "direction", "disappears", "order")}  # [stated, total]
    missing, errors = [], []

    def fact(kind: str, holds: bool, description: str) -> None:
        by_kind[kind][1] += 1
        if holds:
            by_kind[kind][0] += 1
        else:
            missing.append(description)

    for key, o in truth.items():
        name = f"{key[0]} {key[1]}"
        fact("object", key in first, name)
        fact("direction", directions.get(key) == {o["direction"]}, f"direction of the {name}")
        if o["end_frame"] < meta["num_frames"]:
            fact("disappears", key in exits, f"that the {name} disappears")
        elif key in exits:
            errors.append(f"the {name} does not disappear")
    for i, a in enumerate(objects):
        for b in objects[i + 1:]:
            if a["start_frame"] == b["start_frame"]:
                continue
            early, late = (a, b) if a["start_frame"] < b["start_frame"] else (b, a)
            ke, kl = (early["colour"], early["shape"]), (late["colour"], late["shape"])
            fact("order", ke in first and kl in first and first[ke] < first[kl],
                 f"the {ke[0]} {ke[1]} appears before the {kl[0]} {kl[1]}")
    invented = sorted(key for key in first if key not in truth)
    errors += [f"no {c} {s} in the video" for c, s in invented]
    return {"stated": sum(n for n, _ in by_kind.values()), "total": sum(n for _, n in by_kind.values()),
            "by_kind": {kind: tuple(counts) for kind, counts in by_kind.items()}, "missing": missing, "errors": errors}


def description_claims(meta: dict, answer: str) -> dict[tuple, bool]:
    """Every claim a description makes, and whether the video bears it out: `("object", key)` for
    each object named, `("direction", key, d)` for each direction given to it, `("disappears", key)`,
    and `("before", k1, k2)` when two objects of the video that appear at different frames are named
    in that order (key: (colour, shape))."""
    said = _read_description(answer)
    truth = {(o["colour"], o["shape"]): o for o in meta["objects"]}
    claims = {}
    for key in said.first:
        claims[("object", key)] = key in truth
        for d in sorted(said.directions.get(key, ())):
            claims[("direction", key, d)] = key in truth and truth[key]["direction"] == d
        if key in said.exits:
            claims[("disappears", key)] = key in truth and truth[key]["end_frame"] < meta["num_frames"]
    named = sorted((pos, key) for key, pos in said.first.items() if key in truth)
    for i, (_, a) in enumerate(named):
        for _, b in named[i + 1:]:
            if truth[a]["start_frame"] != truth[b]["start_frame"]:
                claims[("before", a, b)] = truth[a]["start_frame"] < truth[b]["start_frame"]
    return claims


def generative_scores(meta: dict, answer: str) -> dict[str, float]:
    """The four single-answer criteria of the generative benchmark, 0-5, from the ground truth
    (the module doc of `vlmalign.eval.generative` defines them)."""
    claims = description_claims(meta, answer)
    facts = describe_facts(meta, answer)
    truth = {(o["colour"], o["shape"]) for o in meta["objects"]}
    named = {claim[1] for claim in claims if claim[0] == "object"}
    temporal = [facts["by_kind"][kind] for kind in ("direction", "disappears", "order")]
    return {
        "correctness": 5 * sum(claims.values()) / len(claims) if claims else 0.0,
        "detail": 5 * facts["stated"] / facts["total"],
        "context": 5 * len(named & truth) / len(named | truth),
        "temporal": 5 * sum(s for s, _ in temporal) / sum(t for _, t in temporal),
    }


def consistency_score(meta: dict, answer1: str, answer2: str) -> float:
    """0-5: the true claims both answers make, over every claim either makes; two answers that
    claim nothing score 0."""
    c1, c2 = description_claims(meta, answer1), description_claims(meta, answer2)
    union = c1.keys() | c2.keys()
    shared_true = {claim for claim in c1.keys() & c2.keys() if c1[claim]}
    return 5 * len(shared_true) / len(union) if union else 0.0


def _describe_score(fraction: float) -> int:
    if fraction >= 1 - 1e-9:
        return 5
    if fraction >= 0.75:
        return 4
    if fraction >= 0.5:
        return 3
    if fraction >= 0.25:
        return 2
    return 1


# ------------------------------------------------------------------------------------- oracle


def _other_subject(parsed: syn.ParsedQuestion, answer: str) -> str | None:
    """The object a short answer names when it is not the one asked about, else None.

    "The square is yellow." answers "What colour is the triangle?" about the square: a value bound
    to the wrong object is wrong, whatever the asked object's colour. An answer that names no
    object ("Yellow.", "It is yellow.") is read as about the asked one.
    """
    if parsed.qtype in ("colour", "direction") and parsed.shape:
        shapes = extract_values("shape", answer)
        if shapes and parsed.shape not in shapes:
            return f"the {shapes[0]}"
    if parsed.qtype in ("shape", "direction") and parsed.colour:
        colours = extract_values("colour", answer)
        if colours and parsed.colour not in colours:
            return f"the {colours[0]} object"
    return None


class Oracle:
    """Scores and ranks answers about synthetic-benchmark videos from their ground truth."""

    def __init__(self, metadata):
        records = metadata.values() if isinstance(metadata, dict) else metadata
        self._videos: dict[str, dict] = {}
        for meta in records:
            self._videos[str(meta["id"])] = meta

    @classmethod
    def from_dir(cls, bench_dir) -> "Oracle":
        """Read `metadata.jsonl` of a benchmark written by `generate_benchmark`."""
        path = Path(bench_dir) / "metadata.jsonl"
        if not path.is_file():
            raise DataError(f"{path}: no such file (is {bench_dir} a synthetic benchmark folder?)")
        records = []
        for line, meta in iter_json_records(path):
            for key in ("id", "num_frames", "objects"):
                if key not in meta:
                    raise DataError(f"{path}:{line}: missing field {key!r}")
            records.append(meta)
        return cls(records)

    def __len__(self) -> int:
        return len(self._videos)

    def metadata(self, video) -> dict:
        """Ground truth of a video given by id, relative or absolute path (matched on the stem)."""
        stem = Path(str(video)).stem
        if stem not in self._videos:
            raise VlmalignError(f"oracle: video {str(video)!r} is not in the benchmark metadata (looked up {stem!r})")
        return self._videos[stem]

    def _parse(self, question: str) -> syn.ParsedQuestion:
        parsed = syn.parse_question(question)
        if parsed is None:
            raise VlmalignError(
                f"oracle: question {question!r} matches no template of the synthetic benchmark "
                f"(question types: {', '.join(syn.QUESTION_TYPES)})"
            )
        return parsed

    def reference(self, video, question: str) -> str:
        """A correct answer to the question (canonical wording)."""
        meta, parsed = self.metadata(video), self._parse(question)
        if parsed.qtype == "describe":
            return syn.describe(meta)
        try:
            subject = syn.subject_of(meta["objects"], parsed)
        except VlmalignError as e:
            raise VlmalignError(f"oracle: question {question!r} about {meta['id']}: {e}") from None
        return syn.short_answer(parsed.qtype, syn.true_value(meta, parsed), subject)

    def verdict(self, video, question: str, answer: str) -> OracleVerdict:
        meta, parsed = self.metadata(video), self._parse(question)
        if parsed.qtype == "describe":
            facts = describe_facts(meta, answer)
            fraction = max(0, facts["stated"] - len(facts["errors"])) / max(1, facts["total"])
            score = _describe_score(fraction)
            reason = f"{facts['stated']}/{facts['total']} facts stated"
            if facts["missing"]:
                reason += "; missing: " + ", ".join(facts["missing"])
            if facts["errors"]:
                reason += "; wrong: " + ", ".join(facts["errors"])
            return OracleVerdict(score, score >= 4, "describe", reason)
        try:
            truth = syn.true_value(meta, parsed)
        except VlmalignError as e:
            raise VlmalignError(f"oracle: question {question!r} about {meta['id']}: {e}") from None
        values = list(dict.fromkeys(extract_values(parsed.qtype, answer)))
        said = ", ".join(map(str, values)) or "nothing"
        other = _other_subject(parsed, answer)
        if other:
            score, why = 1, f"answers about {other}, not the {' '.join(x for x in (parsed.colour, parsed.shape) if x) or 'object'} asked about"
        elif values == [truth]:
            score, why = 5, f"states {truth}, the true {parsed.qtype}"
        elif truth in values:
            score, why = 2, f"hedges: states {said}; only {truth} is true"
        elif values:
            score, why = 1, f"wrong: states {said}; the true {parsed.qtype} is {truth}"
        else:
            score, why = 1, f"states no {parsed.qtype}; the true one is {truth}"
        return OracleVerdict(score, score == 5, parsed.qtype, why)

    def score(self, video, question: str, answer: str) -> int:
        return self.verdict(video, question, answer).score

    def rank(self, video, question: str, answers: list[str]) -> list[int]:
        """Per-answer ranks, 0 = best: the number of answers that score higher. Answers that score the
        same share a rank (a tie, as in `compare`), whatever their lengths: breaking ties by length
        taught the policies to shorten their answers."""
        scores = [self.score(video, question, a) for a in answers]
        return [sum(other > mine for other in scores) for mine in scores]

    def compare(self, video, question: str, answer_a: str, answer_b: str) -> int | None:
        """0 if A scores higher, 1 if B, None if both score the same (a tie)."""
        a, b = self.score(video, question, answer_a), self.score(video, question, answer_b)
        return None if a == b else int(b > a)
