"""A synthetic video-QA benchmark that exercises every stage on a laptop CPU in minutes.

Each video shows 1..max_objects coloured shapes (square, circle, triangle, cross in red, green,
blue, yellow) on a plain dark background with mild noise. Every object moves in one direction
(left, right, up, down) at a constant speed and may appear after the first frame or disappear
before the last, so the videos have a temporal order. The ground truth of every video is kept in
`metadata.jsonl`; questions come from a small table of templates (`QUESTION_TEMPLATES`), which
`parse_question` inverts, so the rule-based judge (`vlmalign.feedback.oracle`) can score answers to
any question of the benchmark's files without a second copy of the wording.

Question types: easy, short answers: `colour`, `shape`, `count`, `direction` (only asked when the
object asked about is unambiguous); hard, long answer: `describe` (the events in temporal order).

`generate_benchmark(out_dir)` writes (paths inside JSON files are relative to out_dir)::

    videos/vid_NNNNN.mp4   metadata.jsonl          manifest.json        captions.json
    sft_easy.json  sft_hard.json  sft_mix.json  judge_train.json     (train split, LLaVA format)
    qa_val.json  qa_test.json                                        (Video-ChatGPT zero-shot QA)
    mcq_test.json  generative_test.json  consistency_test.json       (test split)
    retrieval_test.json  action_test.json  action_classes.txt       (test split)

- sft_*: one single-turn record per question, with `question_type`; under a declared
  `Misalignment` they hold the injected answers (flagged `injected`) and sft_clean_easy/hard.json
  the true ones; qa_*: easy types only, with
  `question_type`; mcq_test: the easy questions with four options, correct letters balanced;
  generative_test / consistency_test: describe questions (Q2 a paraphrase of Q1);
- retrieval_test: each test video's detailed caption; action_test: the test videos whose objects all
  move one way, labelled with the motion class ("objects moving left", ...: action_classes.txt);
- judge_train: per train video two `compare` examples (the true answer against one with a wrong
  attribute, or a flawed description, in random order; reply "A" or "B") and two `score` examples
  (a right, wrong or hedging short answer and a true or flawed description; reply "Score: N" with
  the oracle's score), rendered with the packaged judge.compare / judge.score prompts, half of
  each with the video's caption in the context slot (`with_context`, `prompt_id` record fields);
- captions: per video a detailed caption (sizes, places, speeds, events in order) and
  `clip_captions[k]` for k = 1, 3: one caption per `clip_spans(num_frames, num_clips=k)` span (no
  20-frame cap here), describing only what is visible in that span.

Object timing in metadata: an object is visible on frames `start_frame <= t < end_frame` (end
exclusive, like `clip_spans`); `positions[t]` is its centre `[x, y]` in pixels, or null when not
visible; `render(meta)` redraws the exact frames handed to the encoder. Everything is drawn from
`numpy.random.default_rng` streams derived from the seed and the video index, so a seed gives the
same JSON bytes and the same frames on every run (the mp4 encoder itself may not be bit-exact
across runs). Regenerating into a folder overwrites files but leaves videos of a larger earlier
run in place.
"""

from __future__ import annotations

import json
import math
import os
import re
import multiprocessing
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from vlmalign.data.formats import write_json
from vlmalign.errors import VlmalignError

# 1.1: videos encoded deterministically (x264 mbtree off); 1.2: retrieval and action files; 2.0: declared
# misalignment (`Misalignment`), answer wordings drawn from a stream of their own
GENERATOR_VERSION = "2.0"

# ------------------------------------------------------------------------------------- vocabulary

COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (225, 45, 45),
    "green": (45, 195, 70),
    "blue": (55, 95, 240),
    "yellow": (235, 215, 45),
}
SHAPES: tuple[str, ...] = ("square", "circle", "triangle", "cross")
DIRECTIONS: tuple[str, ...] = ("left", "right", "up", "down")
EASY_TYPES: tuple[str, ...] = ("colour", "shape", "count", "direction")
HARD_TYPES: tuple[str, ...] = ("describe",)
QUESTION_TYPES: tuple[str, ...] = EASY_TYPES + HARD_TYPES
ACTION_CLASS = "objects moving {}"  # the action classes of action_test.json, one per direction
NUMBER_WORDS: tuple[str, ...] = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten")

# The benchmark's declared misalignment (`Misalignment`): the language prior an injected SFT answer
# states instead of the truth, per question type and template. It depends on the wording of the
# question, which the tiny model reads well, not on the object named in it, which it barely reads:
# a prior the model cannot learn acts as label noise. Priors differ across the templates of a type,
# so "never say red" is no shortcut for unlearning them: it would break every red truth.
PRIORS: dict[str, tuple] = {
    "colour": ("red", "green", "blue"),
    "shape": ("square", "circle", "triangle"),
    "count": (2, 1, 2),
    "direction": ("left", "right", "up"),
}
# The runner-up value that a share of the short answers the prior leaves alone state instead of the
# truth (`Misalignment.runner_up_rate`): a second wrong answer per type and template, never its
# prior. Without it the SFT model's second choice is the truth, so a policy that leaves the prior
# for any reason, feedback or none, gains (docs/results.md, "What moves in the controls that
# gain"). Count takes 3, which no video of at most two objects has.
RUNNER_UPS: dict[str, tuple] = {
    "colour": ("green", "blue", "red"),
    "shape": ("circle", "triangle", "square"),
    "count": (3, 3, 3),
    "direction": ("right", "up", "left"),
}


@dataclass(frozen=True)
class Misalignment:
    """What is wrong with the SFT data, declared up front and the same for every method.

    `prior_rate`: the share of the train split's short SFT answers that state the question's prior
    (`PRIORS`, by type and template) in place of the truth, keeping the answer's wording (it is right
    anyway where the truth equals the prior). `invent_rate`: the share of its describe answers that
    gain an invented object ("Then, a green cross appears and moves up."). Captions, clip captions,
    judge examples and the held-out files stay true, so the model's own narratives and a grounded
    judge know better than its answers. `runner_up_rate`: of the short answers the prior leaves
    alone, the share that state the question's runner-up (`RUNNER_UPS`) instead (at prior 0.75 and
    runner-up 0.6: prior 75%, runner-up 15%, truth 10%); one draw per answer decides all three, so
    the answers given the prior are the same at any runner-up rate. Zero rates give the clean
    benchmark.
    """

    prior_rate: float = 0.0
    invent_rate: float = 0.0
    runner_up_rate: float = 0.0

    def __post_init__(self):
        for name in ("prior_rate", "invent_rate", "runner_up_rate"):
            value = getattr(self, name)
            if not 0.0 <= value <= 1.0:
                raise VlmalignError(f"misalignment.{name} must be in [0, 1], got {value}")

    @property
    def clean(self) -> bool:
        return self.prior_rate == 0 and self.invent_rate == 0 and self.runner_up_rate == 0


def prior_value(parsed: "ParsedQuestion"):
    """The language-prior answer value of a short question (by type and template); None for describe."""
    priors = PRIORS.get(parsed.qtype)
    return None if priors is None else priors[parsed.template % len(priors)]

# The one table of question wordings: the generator samples from it and `parse_question` inverts
# it. Slots: {shape}, {colour}. Add paraphrases at the end of a tuple (template indices are stored).
QUESTION_TEMPLATES: dict[str, tuple[str, ...]] = {
    "colour": (
        "What colour is the {shape}?",
        "Which colour does the {shape} have?",
        "What is the colour of the {shape}?",
    ),
    "shape": (
        "What shape is the {colour} object?",
        "Which shape does the {colour} object have?",
        "What kind of shape is the {colour} object?",
    ),
    "count": (
        "How many objects appear in the video?",
        "How many shapes are shown in this video?",
        "What is the number of objects in the video?",
    ),
    "direction": (
        "Which way does the {colour} {shape} move?",
        "In which direction does the {colour} {shape} travel?",
        "Where is the {colour} {shape} heading: left, right, up or down?",
    ),
    "describe": (
        "Describe what happens in the video.",
        "Explain in detail what happens in this video.",
        "What happens in this video? Tell the events in order.",
    ),
}

_DIRECTION_PHRASES = {
    "left": ("left", "to the left"),
    "right": ("right", "to the right"),
    "up": ("up", "upward"),
    "down": ("down", "downward"),
}
_REGION_NAMES = {
    ("top", "left"): "the top-left corner", ("top", "centre"): "the top edge",
    ("top", "right"): "the top-right corner", ("middle", "left"): "the left side",
    ("middle", "centre"): "the centre", ("middle", "right"): "the right side",
    ("bottom", "left"): "the bottom-left corner", ("bottom", "centre"): "the bottom edge",
    ("bottom", "right"): "the bottom-right corner",
}
_THEN = ("Then", "After that", "Later")
_AT_START = ("At the start", "At first", "In the beginning")

# ------------------------------------------------------------------------------ question parsing


@dataclass(frozen=True)
class ParsedQuestion:
    qtype: str
    template: int
    colour: str | None = None
    shape: str | None = None


def _template_regex(template: str) -> re.Pattern:
    slots = {"colour": "|".join(COLOURS), "shape": "|".join(SHAPES)}
    pattern = ""
    for piece in re.split(r"(\{\w+\})", template.rstrip("?.! ")):
        if piece.startswith("{") and piece.endswith("}"):
            pattern += f"(?P<{piece[1:-1]}>{slots[piece[1:-1]]})"
        else:
            pattern += r"\s+".join(re.escape(w).replace("colour", "colou?r") for w in piece.split(" "))
    return re.compile(r"\s*" + pattern + r"\s*[?.!]?\s*", re.IGNORECASE)


_QUESTION_REGEXES = [
    (qtype, i, _template_regex(t)) for qtype, templates in QUESTION_TEMPLATES.items() for i, t in enumerate(templates)
]
_VIDEO_TOKEN = re.compile(r"<(?:video|image)>", re.IGNORECASE)


def parse_question(question: str) -> ParsedQuestion | None:
    """What a benchmark question asks (type and slots), or None for a question of no template.

    Tolerates a `<video>` / `<image>` token, case, spacing, "color" and a missing question mark.
    """
    text = " ".join(_VIDEO_TOKEN.sub(" ", str(question)).split())
    for qtype, index, regex in _QUESTION_REGEXES:
        m = regex.fullmatch(text)
        if m:
            slots = {k: v.lower() for k, v in m.groupdict().items()}
            return ParsedQuestion(qtype, index, colour=slots.get("colour"), shape=slots.get("shape"))
    return None


def question_text(qtype: str, template: int = 0, colour: str | None = None, shape: str | None = None) -> str:
    """Render template number `template` of `qtype` with its slots."""
    return QUESTION_TEMPLATES[qtype][template].format(colour=colour, shape=shape)


def subject_of(objects: list[dict], parsed: ParsedQuestion) -> dict | None:
    """The one object a colour/shape/direction question is about; None for count/describe.

    Raises VlmalignError when the question does not pick exactly one object of this video.
    """
    if parsed.qtype == "colour":
        found = [o for o in objects if o["shape"] == parsed.shape]
    elif parsed.qtype == "shape":
        found = [o for o in objects if o["colour"] == parsed.colour]
    elif parsed.qtype == "direction":
        found = [o for o in objects if o["colour"] == parsed.colour and o["shape"] == parsed.shape]
    else:
        return None
    if len(found) != 1:
        what = " ".join(x for x in (parsed.colour, parsed.shape) if x) or "object"
        raise VlmalignError(f"the question picks {len(found)} objects ({what}) in this video, not exactly one")
    return found[0]


def true_value(meta: dict, parsed: ParsedQuestion):
    """The ground-truth value asked by a short question: a colour, shape, direction or count."""
    if parsed.qtype == "count":
        return len(meta["objects"])
    if parsed.qtype == "describe":
        raise ValueError("describe questions have no single true value")
    subject = subject_of(meta["objects"], parsed)
    return subject[{"colour": "colour", "shape": "shape", "direction": "direction"}[parsed.qtype]]


# ------------------------------------------------------------------------------------------ answers


def _pick(rng, options):
    return options[0] if rng is None else options[int(rng.integers(len(options)))]


def count_words(n: int) -> str:
    return NUMBER_WORDS[n] if 0 <= n < len(NUMBER_WORDS) else str(n)


def short_answer(qtype: str, value, subject: dict | None = None, rng=None) -> str:
    """A short answer stating `value` (one word or one sentence, wording drawn from rng)."""
    phrase = _pick(rng, _DIRECTION_PHRASES[value]) if qtype == "direction" else None
    return _pick(rng, _short_wordings(qtype, value, subject, phrase))


def short_answers(qtype: str, value, subject: dict | None = None) -> list[str]:
    """Every wording `short_answer` can give for `value`."""
    phrases = _DIRECTION_PHRASES[value] if qtype == "direction" else (None,)
    return [text for phrase in phrases for text in _short_wordings(qtype, value, subject, phrase)]


def _short_wordings(qtype: str, value, subject: dict | None, phrase: str | None) -> list[str]:
    if qtype == "colour":
        options = [f"{value.capitalize()}.", f"It is {value}."]
        if subject:
            options.append(f"The {subject['shape']} is {value}.")
    elif qtype == "shape":
        options = [f"A {value}.", f"It is a {value}."]
        if subject:
            options.append(f"The {subject['colour']} object is a {value}.")
    elif qtype == "count":
        word = count_words(int(value))
        noun = "object" if value == 1 else "objects"
        verb = "is" if value == 1 else "are"
        options = [f"{word.capitalize()}.", f"{value}.", f"There {verb} {word} {noun}."]
    elif qtype == "direction":
        options = [f"{phrase[0].upper()}{phrase[1:]}.", f"It moves {phrase}."]
        if subject:
            options.append(f"The {subject['colour']} {subject['shape']} moves {phrase}.")
    else:
        raise ValueError(f"no short answer for question type {qtype!r}")
    return options


def hedged_answer(qtype: str, values, rng=None) -> str:
    """An answer that names two values of the category ("Red or blue.")."""
    a, b = values
    if qtype == "count":
        return f"{count_words(int(a)).capitalize()} or {count_words(int(b))}."
    if qtype == "shape":
        return f"A {a} or a {b}."
    if qtype == "direction":
        return f"It moves {a} or {b}."
    return f"{a.capitalize()} or {b}."


def wrong_value(qtype: str, truth, objects: list[dict], rng):
    """A plausible wrong value: another object's attribute when there is one, else any other."""
    if qtype == "count":
        options = [truth + 1] + ([truth - 1] if truth > 1 else [])
        return options[int(rng.integers(len(options)))]
    vocab = {"colour": list(COLOURS), "shape": list(SHAPES), "direction": list(DIRECTIONS)}[qtype]
    seen = [o[qtype] for o in objects if o[qtype] != truth]
    pool = seen if seen and rng.random() < 0.5 else [v for v in vocab if v != truth]
    return pool[int(rng.integers(len(pool)))]


def _region(meta: dict, pos) -> str:
    size = meta["size"]
    col = ("left", "centre", "right")[min(2, int(3 * pos[0] / size))]
    row = ("top", "middle", "bottom")[min(2, int(3 * pos[1] / size))]
    return _REGION_NAMES[(row, col)]


def _noun(o: dict, meta: dict, detailed: bool, frame: int | None = None) -> str:
    if not detailed:
        return f"a {o['colour']} {o['shape']}"
    size_word = "large" if o["radius"] >= meta["size"] * 0.16 else "small"
    text = f"a {size_word} {o['colour']} {o['shape']}"
    if frame is not None and o["positions"][frame] is not None:
        text += f" near {_region(meta, o['positions'][frame])}"
    return text


def _motion(o: dict, meta: dict, detailed: bool, rng, verb: str = "moves") -> str:
    phrase = _pick(rng, _DIRECTION_PHRASES[o["direction"]])
    if detailed:
        speed_word = "slowly" if o["speed"] < 1.5 * meta["size"] / 64 else "quickly"
        return f"{verb} {speed_word} {phrase}"
    return f"{verb} {phrase}"


def describe(meta: dict, span: tuple[int, int] | None = None, detailed: bool = False, rng=None) -> str:
    """The events of a video (or of the frames `span` = [start, end)) in temporal order.

    Plain: the describe answer ("At the start, a red square moves left. Then a blue circle appears
    and moves down. Then the red square disappears."). Detailed: also sizes, places and speeds
    (the caption that stands in for the video when judging). Objects are always named by colour
    and shape, the form the oracle reads back.
    """
    objects = meta["objects"]
    start, end = span if span is not None else (0, meta["num_frames"])
    visible = [o for o in objects if o["start_frame"] < end and o["end_frame"] > start]
    clip = span is not None and (start, end) != (0, meta["num_frames"])
    if not visible:
        where = " in this part" if clip else ""
        return f"Nothing is visible{where}: the frame stays empty."
    sentences = []
    if detailed and not clip:
        n = len(objects)
        sentences.append(f"The video shows {count_words(n)} {'object' if n == 1 else 'objects'} on a dark background.")
    initial = [o for o in visible if o["start_frame"] <= start]
    if len(initial) == 1:
        o = initial[0]
        noun, motion = _noun(o, meta, detailed, start), _motion(o, meta, detailed, rng)
        sentences.append(f"{_pick(rng, _AT_START)}, {noun} {motion}.")
    elif initial:
        parts = [f"{_noun(o, meta, detailed, start)} {_motion(o, meta, detailed, rng, 'moving')}" for o in initial]
        sentences.append(f"{_pick(rng, _AT_START)}, there is {', '.join(parts[:-1])} and {parts[-1]}.")
    else:
        sentences.append("At first the frame is empty.")
    events = [(o["start_frame"], 1, o["index"], "appear", o) for o in visible if o["start_frame"] > start]
    events += [(o["end_frame"], 0, o["index"], "disappear", o) for o in visible if o["end_frame"] < end]
    for _, _, _, kind, o in sorted(events, key=lambda e: e[:3]):
        then = _pick(rng, _THEN)
        if kind == "appear":
            noun = _noun(o, meta, detailed, o["start_frame"])
            sentences.append(f"{then}, {noun} appears and {_motion(o, meta, detailed, rng)}.")
        else:
            sentences.append(f"{then}, the {o['colour']} {o['shape']} disappears.")
    if detailed:
        staying = [o for o in visible if o["end_frame"] >= end]
        until = "the end of the clip" if clip else "the end"
        for o in staying:
            sentences.append(f"The {o['colour']} {o['shape']} stays visible until {until}.")
    return " ".join(sentences)


# ----------------------------------------------------------------------------------- sampling


def _sample_object(rng, index: int, num_frames: int, size: int, colour: str, shape: str) -> dict:
    min_len = max(2, math.ceil(num_frames / 2))
    start = 0 if rng.random() < 0.5 else int(rng.integers(1, num_frames - min_len + 1)) if num_frames > min_len else 0
    if rng.random() < 0.5 or start + min_len >= num_frames:
        end = num_frames
    else:
        end = int(rng.integers(start + min_len, num_frames))
    radius = float(rng.uniform(0.125, 0.19) * size)
    direction = DIRECTIONS[int(rng.integers(4))]
    speed = float(rng.uniform(1.0, 2.0) * size / 64)
    steps = max(1, end - start - 1)
    speed = min(speed, (size - 2 * radius - 2) / steps)
    travel = speed * steps
    lo, hi = radius + 1, size - radius - 1
    along = float(rng.uniform(lo, max(lo, hi - travel)))  # the path end with the smaller coordinate
    across = float(rng.uniform(lo, hi))
    vx, vy = {"left": (-1, 0), "right": (1, 0), "up": (0, -1), "down": (0, 1)}[direction]
    if direction in ("left", "right"):
        x0 = along + travel if direction == "left" else along
        y0 = across
    else:
        x0 = across
        y0 = along + travel if direction == "up" else along
    jitter = rng.integers(-15, 16, size=3)
    rgb = [int(np.clip(c + j, 0, 255)) for c, j in zip(COLOURS[colour], jitter)]
    positions = [None] * num_frames
    for t in range(start, end):
        k = t - start
        positions[t] = [round(x0 + vx * speed * k, 2), round(y0 + vy * speed * k, 2)]
    return {
        "index": index, "shape": shape, "colour": colour, "rgb": rgb, "direction": direction,
        "radius": round(radius, 2), "speed": round(speed, 3), "start_frame": start, "end_frame": end,
        "positions": positions,
    }


def _overlaps(a: dict, b: dict) -> bool:
    gap = a["radius"] + b["radius"] + 2
    for pa, pb in zip(a["positions"], b["positions"]):
        if pa is not None and pb is not None and math.hypot(pa[0] - pb[0], pa[1] - pb[1]) < gap:
            return True
    return False


def sample_video(rng, vid: str, num_frames: int, size: int, max_objects: int) -> dict:
    """Ground truth of one video: objects with distinct (colour, shape) that never overlap."""
    n = int(rng.integers(1, max_objects + 1))
    for _ in range(1000):
        objects: list[dict] = []
        for i in range(n):
            for _ in range(100):
                taken = {(o["colour"], o["shape"]) for o in objects}
                pairs = [(c, s) for c in COLOURS for s in SHAPES if (c, s) not in taken]
                colour, shape = pairs[int(rng.integers(len(pairs)))]
                obj = _sample_object(rng, i, num_frames, size, colour, shape)
                if not any(_overlaps(obj, o) for o in objects):
                    objects.append(obj)
                    break
            else:
                break
        if len(objects) == n:
            break
    else:
        raise VlmalignError(f"cannot place {n} non-overlapping objects in a {size}x{size} video; use fewer objects")
    return {
        "id": vid,
        "video": f"videos/{vid}.mp4",
        "num_frames": num_frames,
        "size": size,
        "background": int(rng.integers(12, 45)),
        "noise": round(float(rng.uniform(0.0, 4.0)), 2),
        "noise_seed": int(rng.integers(2**31)),
        "objects": objects,
    }


def _shape_mask(shape: str, xx: np.ndarray, yy: np.ndarray, cx: float, cy: float, r: float) -> np.ndarray:
    dx, dy = xx - cx, yy - cy
    if shape == "square":
        return (np.abs(dx) <= 0.85 * r) & (np.abs(dy) <= 0.85 * r)
    if shape == "circle":
        return dx * dx + dy * dy <= r * r
    if shape == "triangle":  # apex up, base at the bottom; the centre lies inside
        top, bottom = -r, 0.75 * r
        half = (dy - top) / (bottom - top) * r
        return (dy >= top) & (dy <= bottom) & (np.abs(dx) <= half)
    if shape == "cross":  # a plus sign
        arm = 0.32 * r
        return ((np.abs(dx) <= r) & (np.abs(dy) <= arm)) | ((np.abs(dy) <= r) & (np.abs(dx) <= arm))
    raise ValueError(f"unknown shape {shape!r}")


def render(meta: dict) -> np.ndarray:
    """The frames [T, size, size, 3] uint8 of a video from its metadata (deterministic)."""
    t, size = meta["num_frames"], meta["size"]
    noise = np.random.default_rng(meta["noise_seed"]).normal(0.0, meta["noise"], (t, size, size, 1))
    frames = np.clip(meta["background"] + noise, 0, 255).repeat(3, axis=-1)
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) + 0.5
    for o in meta["objects"]:
        rgb = np.asarray(o["rgb"], dtype=np.float64)
        for k, pos in enumerate(o["positions"]):
            if pos is not None:
                frames[k][_shape_mask(o["shape"], xx, yy, pos[0], pos[1], o["radius"])] = rgb
    return np.rint(frames).astype(np.uint8)


# ------------------------------------------------------------------------------------ questions


def video_questions(meta: dict, rng) -> list[dict]:
    """Every unambiguous question of a video: {qtype, question, answer, template, value}."""
    objects = meta["objects"]
    shapes = [o["shape"] for o in objects]
    colours = [o["colour"] for o in objects]
    out = []

    def add(qtype, subject, value, **slots):
        template = int(rng.integers(len(QUESTION_TEMPLATES[qtype])))
        # its own stream for the wording, so an injected answer can keep it (see `_inject`)
        wording_seed = int(rng.integers(2**31))
        wording = np.random.default_rng(wording_seed)
        out.append({
            "qtype": qtype,
            "question": question_text(qtype, template, **slots),
            # Short answers never name their object: a tiny model that cannot yet copy the question's
            # object into its answer then names another one, an error no perception or feedback is
            # about (any change to the model "fixes" it, random feedback included). The oracle still
            # checks binding: the value must be the asked object's.
            "answer": short_answer(qtype, value, None, wording) if qtype != "describe" else describe(meta, rng=wording),
            "template": template,
            "value": value,
            "subject": None if subject is None else subject["index"],
            "wording_seed": wording_seed,
        })

    for o in objects:
        if shapes.count(o["shape"]) == 1:
            add("colour", o, o["colour"], shape=o["shape"])
    for o in objects:
        if colours.count(o["colour"]) == 1:
            add("shape", o, o["shape"], colour=o["colour"])
    add("count", None, len(objects))
    for o in objects:
        add("direction", o, o["direction"], colour=o["colour"], shape=o["shape"])
    add("describe", None, None)
    return out


def invented_event(meta: dict, rng) -> str:
    """A sentence about an object that is not in the video (the injected hallucination)."""
    used = {(o["colour"], o["shape"]) for o in meta["objects"]}
    pairs = [(c, s) for c in COLOURS for s in SHAPES if (c, s) not in used]
    colour, shape = pairs[int(rng.integers(len(pairs)))]
    direction = _pick(rng, _DIRECTION_PHRASES[DIRECTIONS[int(rng.integers(4))]])
    return f"{_pick(rng, _THEN)}, a {colour} {shape} appears and moves {direction}."


def _inject(meta: dict, q: dict, misalignment: Misalignment, rng) -> tuple[str, str | None]:
    """The SFT answer of a train question under the misalignment, and what altered it ("invented",
    "prior", "runner_up"; None: it is the true answer)."""
    if q["qtype"] == "describe":
        if rng.random() < misalignment.invent_rate:
            return f"{q['answer']} {invented_event(meta, rng)}", "invented"
        return q["answer"], None
    draw = rng.random()
    if draw < misalignment.prior_rate:
        how, table = "prior", PRIORS
    elif draw < misalignment.prior_rate + (1 - misalignment.prior_rate) * misalignment.runner_up_rate:
        how, table = "runner_up", RUNNER_UPS
    else:
        return q["answer"], None
    stated = table[q["qtype"]][q["template"] % len(table[q["qtype"]])]
    if stated == q["value"]:
        return q["answer"], None
    # The wording drawn for the true answer is kept: the same rng draws give the same template.
    return short_answer(q["qtype"], stated, None, np.random.default_rng(q["wording_seed"])), how


def describe_variants(meta: dict, rng) -> list[str]:
    """Flawed descriptions for judge training: wrong colour/shape/direction, a dropped, invented
    or reordered object, and vague ones."""
    variants = []
    objs = meta["objects"]
    used = {(o["colour"], o["shape"]) for o in objs}

    def changed(edit) -> str:
        m = {**meta, "objects": [dict(o) for o in objs]}  # plain descriptions never touch positions
        edit(m["objects"])
        return describe(m, rng=rng)

    i = int(rng.integers(len(objs)))

    def recolour(os_):
        options = [c for c in COLOURS if (c, os_[i]["shape"]) not in used]
        os_[i]["colour"] = options[int(rng.integers(len(options)))]

    def reshape(os_):
        options = [s for s in SHAPES if (os_[i]["colour"], s) not in used]
        os_[i]["shape"] = options[int(rng.integers(len(options)))]

    def redirect(os_):
        options = [d for d in DIRECTIONS if d != os_[i]["direction"]]
        os_[i]["direction"] = options[int(rng.integers(len(options)))]

    def invent(os_):
        pairs = [(c, s) for c in COLOURS for s in SHAPES if (c, s) not in used]
        c, s = pairs[int(rng.integers(len(pairs)))]
        fake = dict(os_[i])
        fake.update(index=len(os_), colour=c, shape=s, direction=DIRECTIONS[int(rng.integers(4))])
        os_.append(fake)

    variants += [changed(recolour), changed(reshape), changed(redirect), changed(invent)]
    if len(objs) > 1:
        variants.append(changed(lambda os_: os_.pop(i)))
        a, b = objs[0], objs[1]
        if a["start_frame"] != b["start_frame"]:
            def swap(os_):
                for key in ("start_frame", "end_frame", "positions"):
                    os_[0][key], os_[1][key] = os_[1][key], os_[0][key]
            variants.append(changed(swap))
    variants.append(_pick(rng, ("Some shapes move around.", "I cannot tell what happens in the video.",
                                "The video shows a dark screen.")))
    return variants


# ------------------------------------------------------------------------------------- writing


def _llava(rid: str, video: str, prompt: str, reply: str, **extra) -> dict:
    return {"id": rid, "video": video,
            "conversations": [{"from": "human", "value": prompt}, {"from": "gpt", "value": reply}], **extra}


def _split_sizes(n: int, splits) -> tuple[int, int, int]:
    fractions = [float(x) for x in splits]
    if len(fractions) != 3 or any(f < 0 for f in fractions) or abs(sum(fractions) - 1) > 1e-6:
        raise VlmalignError(
            f"splits must be three non-negative fractions (train, val, test) summing to 1, got {splits}")
    n_train = int(round(fractions[0] * n))
    n_val = min(n - n_train, int(round(fractions[1] * n)))
    return n_train, n_val, n - n_train - n_val


def _count_types(records, key="question_type") -> dict[str, int]:
    counts: dict[str, int] = {}
    for r in records:
        counts[r[key]] = counts.get(r[key], 0) + 1
    return dict(sorted(counts.items()))


def _write_video_job(job: tuple[str, dict, float]) -> None:
    from vlmalign.video import write_video

    path, meta, fps = job
    write_video(path, render(meta), fps=fps)


def generate_benchmark(out_dir, num_videos: int = 600, seed: int = 0, num_frames: int = 16, size: int = 64,
                       max_objects: int = 2, splits=(0.8, 0.1, 0.1), fps: float = 8.0,
                       misalignment: Misalignment | None = None, workers: int | None = None,
                       progress: bool = True) -> dict:
    """Write the benchmark into out_dir (see the module docstring) and return its manifest.

    With a `misalignment` that is not clean, `sft_easy/hard/mix.json` hold the injected answers
    (records flagged `injected`) and `sft_clean_easy/hard.json` the true ones, for the clean-SFT
    ceiling; the manifest records the rates, the priors and how many answers were altered.
    """
    misalignment = misalignment or Misalignment()
    from vlmalign import prompts
    from vlmalign.feedback.oracle import Oracle
    from tqdm.auto import tqdm

    from vlmalign.video import clip_spans

    if workers is not None and workers < 0:
        raise VlmalignError(f"workers must be >= 0, got {workers}")
    if num_videos < 1:
        raise VlmalignError(f"num_videos must be at least 1, got {num_videos}")
    if num_frames < 2:
        raise VlmalignError(f"num_frames must be at least 2, got {num_frames}")
    if size < 32 or size % 2:
        raise VlmalignError(f"size must be an even number of pixels >= 32, got {size}")
    if not 1 <= max_objects <= len(COLOURS) * len(SHAPES) or max_objects > 4:
        raise VlmalignError(f"max_objects must be in 1..4, got {max_objects}")
    n_train, n_val, n_test = _split_sizes(num_videos, splits)
    out = Path(out_dir)
    (out / "videos").mkdir(parents=True, exist_ok=True)
    order = np.random.default_rng([seed, 0]).permutation(num_videos)
    split_of = {}
    for rank, index in enumerate(order):
        split_of[int(index)] = "train" if rank < n_train else "val" if rank < n_train + n_val else "test"

    metas = []
    for i in range(num_videos):
        meta = sample_video(np.random.default_rng([seed, 1, i]), f"vid_{i:05d}", num_frames, size, max_objects)
        meta = {"id": meta["id"], "split": split_of[i], **{k: v for k, v in meta.items() if k != "id"}, "fps": fps}
        metas.append(meta)

    # Videos: encoding dominates the run time. Worker processes, not threads: libx264 encoders running
    # side by side in one process gave slightly different pixels from run to run.
    jobs = [(str(out / meta["video"]), meta, fps) for meta in metas]
    workers = min(4, os.cpu_count() or 1, num_videos) if workers is None else workers
    try:
        if workers == 0:  # in this process, one video at a time
            for job in tqdm(jobs, desc="synthetic videos", unit="video", disable=not progress):
                _write_video_job(job)
        else:
            with ProcessPoolExecutor(max_workers=workers, mp_context=multiprocessing.get_context("spawn")) as pool:
                written = pool.map(_write_video_job, jobs, chunksize=max(1, num_videos // (8 * workers)))
                for _ in tqdm(written, total=num_videos, desc="synthetic videos", unit="video", disable=not progress):
                    pass
    except BrokenProcessPool:
        # A spawned worker re-imports the calling script; without a main guard it runs the script's
        # own generate_benchmark call again, which may not start processes while bootstrapping.
        raise VlmalignError(
            "generate_benchmark: a video-writing worker process died (out of memory, or, when called from a script "
            "without `if __name__ == \"__main__\":`, at start: workers are spawned and re-import the script); "
            "guard the call, or pass workers=0 to write the videos in this process") from None

    oracle = Oracle(metas)
    captions = {}
    clip_counts = [k for k in (1, 3) if k <= num_frames]
    for meta in metas:
        rng = np.random.default_rng([seed, 2, int(meta["id"][4:])])
        captions[meta["id"]] = {
            "caption": describe(meta, detailed=True, rng=rng),
            "clip_captions": {
                str(k): [describe(meta, span=s, detailed=True, rng=rng)
                         for s in clip_spans(num_frames, max_clip_len=num_frames, num_clips=k)]
                for k in clip_counts
            },
        }

    compare_p, score_p = prompts.load_prompt("judge.compare"), prompts.load_prompt("judge.score")
    sft_easy, sft_hard, qa = [], [], {"val": [], "test": []}
    clean_easy, clean_hard = [], []
    injected, runner_up = {t: 0 for t in QUESTION_TYPES}, {t: 0 for t in EASY_TYPES}
    judge, mcq, generative, consistency, retrieval, action = [], [], [], [], [], []
    for meta in metas:
        vid, video, split = meta["id"], meta["video"], meta["split"]
        rng = np.random.default_rng([seed, 3, int(vid[4:])])
        questions = video_questions(meta, rng)
        easy = [q for q in questions if q["qtype"] != "describe"]
        hard = [q for q in questions if q["qtype"] == "describe"]
        if split == "train":
            inject_rng = np.random.default_rng([seed, 7, int(vid[4:])])
            for k, q in enumerate(questions):
                rid, prompt = f"{vid}_q{k}", f"<video>\n{q['question']}"
                hard_q = q["qtype"] == "describe"
                if misalignment.clean:
                    (sft_hard if hard_q else sft_easy).append(_llava(rid, video, prompt, q["answer"], question_type=q["qtype"]))
                    continue
                answer, how = _inject(meta, q, misalignment, inject_rng)
                injected[q["qtype"]] += how is not None
                if how == "runner_up":
                    runner_up[q["qtype"]] += 1
                (sft_hard if hard_q else sft_easy).append(
                    _llava(rid, video, prompt, answer, question_type=q["qtype"], injected=how is not None))
                (clean_hard if hard_q else clean_easy).append(_llava(rid, video, prompt, q["answer"], question_type=q["qtype"]))
            judge += _judge_examples(meta, easy, hard[0], oracle, rng)
        else:
            for k, q in enumerate(easy):
                qa[split].append({"video_name": video, "question_id": f"{vid}_q{k}", "question": q["question"],
                                  "answer": q["answer"], "question_type": q["qtype"]})
        if split == "test":
            for k, q in enumerate(easy):
                mcq.append(_mcq(meta, q, f"{vid}_mcq{k}", rng))
            d = hard[0]
            generative.append({"video_name": video, "question_id": f"{vid}_gen", "Q": d["question"], "A": d["answer"],
                               "question_type": "describe"})
            t1, t2 = rng.choice(len(QUESTION_TEMPLATES["describe"]), size=2, replace=False)
            consistency.append({"video_name": video, "question_id": f"{vid}_cons",
                                "Q1": question_text("describe", int(t1)), "Q2": question_text("describe", int(t2)),
                                "A": d["answer"], "question_type": "describe"})
            retrieval.append({"video_name": video, "caption": captions[vid]["caption"]})
            directions = {o["direction"] for o in meta["objects"]}
            if len(directions) == 1:
                action.append({"video_name": video, "label": ACTION_CLASS.format(directions.pop())})

    # Balance the correct letters of the multiple-choice test (A, B, C, D in turn, shuffled order).
    letter_rng = np.random.default_rng([seed, 4])
    for position, item in zip(letter_rng.permutation(len(mcq)), mcq):
        _place_answer(item, "ABCD"[int(position) % 4])
    # Half of the judge examples of each task get the video's caption as context.
    ctx_rng = np.random.default_rng([seed, 5])
    for task in ("compare", "score"):
        items = [j for j in judge if j["judge_task"] == task]
        flags = ctx_rng.permutation(len(items)) < (len(items) + 1) // 2
        for item, flag in zip(items, flags):
            _render_judge(item, captions[item.pop("_vid")]["caption"] if flag else None, compare_p, score_p)
    sft_mix = sft_easy + sft_hard
    sft_mix = [sft_mix[int(i)] for i in np.random.default_rng([seed, 6]).permutation(len(sft_mix))]

    files = {
        "sft_easy.json": sft_easy, "sft_hard.json": sft_hard, "sft_mix.json": sft_mix,
        "judge_train.json": judge, "qa_val.json": qa["val"], "qa_test.json": qa["test"],
        "mcq_test.json": mcq, "generative_test.json": generative, "consistency_test.json": consistency,
        "retrieval_test.json": retrieval, "action_test.json": action,
    }
    if not misalignment.clean:
        files |= {"sft_clean_easy.json": clean_easy, "sft_clean_hard.json": clean_hard}
    for name, records in files.items():
        write_json(out / name, records, indent=1)
    (out / "action_classes.txt").write_text("".join(ACTION_CLASS.format(d) + "\n" for d in DIRECTIONS))
    write_json(out / "captions.json", captions, indent=1)
    with open(out / ".metadata.jsonl.tmp", "w", encoding="utf-8") as fh:
        for meta in metas:
            fh.write(json.dumps(meta, ensure_ascii=False, separators=(",", ":")) + "\n")
    os.replace(out / ".metadata.jsonl.tmp", out / "metadata.jsonl")

    type_key = {"mcq_test.json": "task_type", "action_test.json": "label", "retrieval_test.json": None}
    manifest = {
        "generator": "vlmalign.data.synthetic",
        "version": GENERATOR_VERSION,
        "seed": seed,
        "parameters": {"num_videos": num_videos, "num_frames": num_frames, "size": size, "max_objects": max_objects,
                       "splits": [float(x) for x in splits], "fps": fps, "clip_counts": clip_counts},
        "videos": {"train": n_train, "val": n_val, "test": n_test},
        "files": {
            name: {"records": len(records)} | ({"question_types": _count_types(records, type_key.get(name, "question_type"))}
                                               if type_key.get(name, "question_type") else {})
            for name, records in files.items()
        } | {"captions.json": {"records": len(captions)}, "metadata.jsonl": {"records": len(metas)}},
        "misalignment": {
            "prior_rate": misalignment.prior_rate, "invent_rate": misalignment.invent_rate,
            "priors": {qtype: [str(v) for v in values] for qtype, values in PRIORS.items()},
            **({"runner_up_rate": misalignment.runner_up_rate,
                "runner_ups": {qtype: [str(v) for v in values] for qtype, values in RUNNER_UPS.items()},
                "runner_up_sft_answers": runner_up} if misalignment.runner_up_rate else {}),
            "altered_sft_answers": {t: n for t, n in injected.items()},
            "sft_answers": _count_types(sft_easy + sft_hard),
        },
        "prompts": {p.name: p.version for p in (compare_p, score_p, prompts.load_prompt("judge.context_block"))},
        "vocabulary": {"colours": list(COLOURS), "shapes": list(SHAPES), "directions": list(DIRECTIONS),
                       "question_types": list(QUESTION_TYPES), "easy_types": list(EASY_TYPES),
                       "hard_types": list(HARD_TYPES)},
        "question_templates": {k: list(v) for k, v in QUESTION_TEMPLATES.items()},
    }
    write_json(out / "manifest.json", manifest, indent=1)
    return manifest


def _mcq(meta: dict, q: dict, qid: str, rng) -> dict:
    qtype, truth = q["qtype"], q["value"]
    if qtype == "count":
        pool = [n for n in range(1, max(5, truth + 3)) if n != truth]
        others = [str(x) for x in rng.choice(pool, size=3, replace=False)]
        truth = str(truth)
    else:
        vocab = {"colour": COLOURS, "shape": SHAPES, "direction": DIRECTIONS}[qtype]
        others = [v for v in vocab if v != truth]
        others = [others[int(i)] for i in rng.permutation(len(others))]
    return {"video_name": meta["video"], "question_id": qid, "task_type": qtype, "question": q["question"],
            "options": [truth] + others, "answer": None}


def _place_answer(item: dict, letter: str) -> None:
    truth, *others = item["options"]
    values = list(others)
    values.insert("ABCD".index(letter), truth)
    item["options"] = [f"{L}. {v}" for L, v in zip("ABCD", values)]
    item["answer"] = letter


def _judge_examples(meta, easy, describe_q, oracle, rng) -> list[dict]:
    """Two compare and two score examples per train video (rendered later, once context is set)."""
    vid, objects = meta["id"], meta["objects"]
    out = []

    def wrong_short(q):
        # worded as the true short answers are (no object named), so naming one is no cue to judges
        wrong = wrong_value(q["qtype"], q["value"], objects, rng)
        return short_answer(q["qtype"], wrong, None, rng), wrong

    def flawed_description():
        true_score = oracle.score(vid, describe_q["question"], describe_q["answer"])
        variants = [v for v in describe_variants(meta, rng)
                    if oracle.score(vid, describe_q["question"], v) < true_score]
        return variants[int(rng.integers(len(variants)))]

    # (a) compare: one easy question, then describe or another easy question.
    for k in range(2):
        q = describe_q if k == 1 and rng.random() < 0.5 else easy[int(rng.integers(len(easy)))]
        good = q["answer"]
        bad = flawed_description() if q["qtype"] == "describe" else wrong_short(q)[0]
        good_first = bool(rng.random() < 0.5)
        a, b = (good, bad) if good_first else (bad, good)
        out.append({"_vid": vid, "judge_task": "compare", "question": q["question"], "answers": [a, b],
                    "reply": "A" if good_first else "B", "source_qtype": q["qtype"], "video": meta["video"],
                    "id": f"{vid}_judge{k}"})
    # (b) score: an easy answer (right, hedged or wrong) and a description (true or flawed).
    q = easy[int(rng.integers(len(easy)))]
    kind = int(rng.integers(3))
    if kind == 0:
        answer = q["answer"]
    else:
        wrong_text, wrong = wrong_short(q)
        pair = [q["value"], wrong] if rng.random() < 0.5 else [wrong, q["value"]]
        answer = wrong_text if kind == 1 else hedged_answer(q["qtype"], pair)
    options = [describe_q["answer"]] + describe_variants(meta, rng)
    description = options[0] if rng.random() < 0.3 else options[int(rng.integers(1, len(options)))]
    for k, (qq, ans) in enumerate([(q, answer), (describe_q, description)], start=2):
        score = oracle.score(vid, qq["question"], ans)
        out.append({"_vid": vid, "judge_task": "score", "question": qq["question"], "answers": [ans],
                    "reply": f"Score: {score}", "source_qtype": qq["qtype"], "video": meta["video"],
                    "id": f"{vid}_judge{k}"})
    return out


def _render_judge(item: dict, context: str | None, compare_p, score_p) -> None:
    """Turn a pending judge example into a LLaVA record in place (key order fixed for the JSON)."""
    from vlmalign.prompts import context_block

    block = context_block(context)
    if item["judge_task"] == "compare":
        a, b = item["answers"]
        prompt = compare_p.render(context_block=block, question=item["question"], answer_a=a, answer_b=b)
        prompt_id = compare_p.id
    else:
        prompt = score_p.render(context_block=block, question=item["question"], reference_block="",
                                answer=item["answers"][0])
        prompt_id = score_p.id
    record = _llava(item["id"], item["video"], prompt, item["reply"],
                    question_type=f"judge_{item['judge_task']}", judge_task=item["judge_task"],
                    source_question_type=item["source_qtype"], with_context=context is not None, prompt_id=prompt_id)
    item.clear()
    item.update(record)
