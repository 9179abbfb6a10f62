"""Every prompt of the library, versioned, plus the parsers of the replies they ask for.

Prompts live in YAML files next to this module, one file per family (the file stem): `judge.yaml`
(compare, score, rank, context_block) and `context.yaml` (caption_clip, caption_video,
narrative_part, retrospective). Schema of a file::

    compare:
      version: "v1"            # bump when the wording changes; judgments are cached per version
      template: |-
        <video>
        {context_block}Question: {question}
        ...

Templates use `{field}` slots (plain identifiers, no format specs); literal braces are doubled.
A prompt is addressed as "family.key", e.g. "judge.compare".

Overriding: `load_prompt(name, path=...)` and `available_prompts(path=...)` take a user YAML file or
a folder of them, in the same schema. A user file overrides (or adds) entries of the family named
by its file stem, entry by entry: a `judge.yaml` holding only `compare` replaces judge.compare and
keeps the packaged judge.score. Asking a user file for a prompt of another family is an error
rather than a silent fall-back to the packaged text.

Reply parsers (`parse_choice`, `parse_score`, `parse_ranking`) read what the judge prompts ask for
and return None for replies that are unparseable or ambiguous, so callers can count failures
instead of scoring them.
"""

from __future__ import annotations

import functools
import re
import string
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from vlmalign.errors import VlmalignError

__all__ = [
    "Prompt",
    "load_prompt",
    "available_prompts",
    "context_block",
    "reference_block",
    "format_numbered",
    "build_narrative",
    "parse_choice",
    "parse_score",
    "parse_ranking",
    "PACKAGED_DIR",
]

PACKAGED_DIR = Path(__file__).resolve().parent
_ENTRY_KEYS = {"version", "template", "description"}


@dataclass(frozen=True)
class Prompt:
    """A named, versioned template. `fields` is derived from the template's `{field}` slots."""

    name: str
    version: str
    template: str
    fields: tuple[str, ...] = field(init=False)

    def __post_init__(self):
        names: list[str] = []
        try:
            parsed = list(string.Formatter().parse(self.template))
        except ValueError as e:  # unbalanced single brace
            raise VlmalignError(f"prompt {self.name}: bad template ({e}); double literal braces as {{{{ }}}}") from None
        for _, slot, spec, conversion in parsed:
            if slot is None:
                continue
            if not slot.isidentifier() or spec or conversion:
                raise VlmalignError(
                    f"prompt {self.name}: slot {{{slot}{'!' + conversion if conversion else ''}"
                    f"{':' + spec if spec else ''}}} is not a plain {{field}}; double literal braces as {{{{ }}}}"
                )
            if slot not in names:
                names.append(slot)
        object.__setattr__(self, "fields", tuple(names))

    @property
    def id(self) -> str:
        """`name@version`, the key judgments are cached and reported under."""
        return f"{self.name}@{self.version}"

    def render(self, **values) -> str:
        """Fill every field; a missing or an unknown field is an error naming the prompt."""
        missing = [f for f in self.fields if f not in values]
        if missing:
            raise VlmalignError(
                f"prompt {self.id}: missing field(s) {', '.join(map(repr, missing))} "
                f"(it needs {', '.join(self.fields) or 'no fields'})"
            )
        extra = sorted(k for k in values if k not in self.fields)
        if extra:
            raise VlmalignError(
                f"prompt {self.id}: unknown field(s) {', '.join(map(repr, extra))} "
                f"(it takes {', '.join(self.fields) or 'no fields'})"
            )
        return self.template.format_map({k: str(v) for k, v in values.items()})


# ----------------------------------------------------------------------------------------- loading


def _read_family(path: Path) -> dict[str, Prompt]:
    family = path.stem
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except OSError as e:
        raise VlmalignError(f"cannot read prompt file {path}: {e.strerror or e}") from None
    except yaml.YAMLError as e:
        raise VlmalignError(f"prompt file {path} is not valid YAML: {str(e).splitlines()[0]}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise VlmalignError(f"prompt file {path}: expected a mapping of prompt names, got {type(data).__name__}")
    prompts = {}
    for key, entry in data.items():
        where = f"prompt file {path}, entry {key!r}"
        if not isinstance(key, str) or not key.isidentifier():
            raise VlmalignError(f"{where}: prompt names must be identifiers")
        if not isinstance(entry, dict):
            raise VlmalignError(f"{where}: expected a mapping with 'version' and 'template'")
        unknown = sorted(set(map(str, entry)) - _ENTRY_KEYS)
        if unknown:
            allowed = ", ".join(sorted(_ENTRY_KEYS))
            raise VlmalignError(f"{where}: unknown key(s) {', '.join(unknown)} (allowed: {allowed})")
        for required in ("version", "template"):
            if required not in entry:
                raise VlmalignError(f"{where}: missing {required!r}")
        version, template = entry["version"], entry["template"]
        if not isinstance(version, (str, int, float)) or isinstance(version, bool) or not str(version).strip():
            raise VlmalignError(f"{where}: 'version' must be a non-empty string")
        if not isinstance(template, str):
            raise VlmalignError(f"{where}: 'template' must be a string")
        try:
            prompts[key] = Prompt(name=f"{family}.{key}", version=str(version), template=template)
        except VlmalignError as e:
            raise VlmalignError(f"{where}: {e}") from None
    return prompts


@functools.lru_cache(maxsize=1)
def _packaged() -> dict[str, dict[str, Prompt]]:
    return {p.stem: _read_family(p) for p in sorted(PACKAGED_DIR.glob("*.yaml"))}


def _user_families(path) -> dict[str, dict[str, Prompt]]:
    p = Path(path)
    if p.is_dir():
        files = sorted([*p.glob("*.yaml"), *p.glob("*.yml")])
        if not files:
            raise VlmalignError(f"prompt folder {p} holds no .yaml files")
    elif p.is_file():
        files = [p]
    else:
        # Config files name paths relative to the folder a command runs in, not to the config file.
        where = "" if p.is_absolute() else f" (relative paths are read from the working folder, {Path.cwd()})"
        raise VlmalignError(f"prompt file {p} does not exist{where}")
    return {f.stem: _read_family(f) for f in files}


def _registry(path=None) -> tuple[dict[str, Prompt], dict[str, dict[str, Prompt]]]:
    merged = {fam: dict(entries) for fam, entries in _packaged().items()}
    user = _user_families(path) if path is not None else {}
    for fam, entries in user.items():
        merged.setdefault(fam, {}).update(entries)
    flat = {f"{fam}.{key}": prompt for fam, entries in merged.items() for key, prompt in entries.items()}
    return flat, user


def available_prompts(path=None) -> list[str]:
    """Sorted "family.key" names: the packaged prompts plus those of `path` (file or folder)."""
    return sorted(_registry(path)[0])


def load_prompt(name: str, path=None) -> Prompt:
    """The prompt "family.key", from the user file/folder `path` if it defines it, else packaged."""
    flat, user = _registry(path)
    if not isinstance(name, str) or name.count(".") != 1:
        raise VlmalignError(f"prompt names look like 'family.key' (e.g. 'judge.compare'), got {name!r}")
    family = name.split(".")[0]
    if path is not None and Path(path).is_file() and family not in user:
        (stem,) = user
        raise VlmalignError(
            f"prompt file {path} holds family {stem!r} (its file name), not {family!r}: "
            f"name the file {family}.yaml to override {name}"
        )
    if name not in flat:
        raise VlmalignError(f"unknown prompt {name!r}; available: {', '.join(sorted(flat))}")
    return flat[name]


# ----------------------------------------------------------------------------------------- helpers


def reference_block(reference: str | None, path=None) -> str:
    """Value for a `{reference_block}` slot: "" without a reference answer, else judge.reference_block rendered."""
    if reference is None or not str(reference).strip():
        return ""
    return load_prompt("judge.reference_block", path).render(reference=str(reference).strip())


def context_block(context: str | None, path=None) -> str:
    """Value for a `{context_block}` slot: "" without context, else judge.context_block rendered."""
    if context is None or not str(context).strip():
        return ""
    return load_prompt("judge.context_block", path).render(context=str(context).strip())


def format_numbered(answers) -> str:
    """The `{answers}` slot of judge.rank: one "Answer i: text" line per answer, i from 1."""
    return "\n".join(f"Answer {i}: {' '.join(str(a).split())}" for i, a in enumerate(answers, 1))


def build_narrative(captions, path=None) -> str:
    """Join clip captions into one narrative with context.narrative_part, one line per clip."""
    captions = list(captions)
    part = load_prompt("context.narrative_part", path)
    return "\n".join(
        part.render(index=i, total=len(captions), caption=" ".join(str(c).split()))
        for i, c in enumerate(captions, 1)
    )


# ----------------------------------------------------------------------------------------- parsers

_MARKUP = re.compile(r"[*_`\"'“”‘’#]")


def _clean(text) -> str:
    if text is None:
        return ""
    return _MARKUP.sub("", str(text)).strip()


_CHOICE_WHOLE = re.compile(r"[(\[]?([ABab])[)\]]?[.:!]?")
_CHOICE_BETTER = re.compile(
    r"(?<![\w'])([AB])(?![\w'])\s+(?:is|was|seems|looks)\s+(?:clearly\s+|much\s+|slightly\s+)?"
    r"(?i:better|best|correct|right|preferred|more\s+accurate|more\s+correct)"
)
_CHOICE_KEYWORD = re.compile(
    r"(?i:\b(?:final\s+)?(?:answer|choice|option|verdict|winner|reply|choose|chose|pick|select|prefer)\b)"
    r"(?:\s*(?i:is|:|-|=))?\s*[(\[]?(?:([AB])(?![\w'])|([ab])(?=\s*(?:$|[.,;:!)\]])))"
)
_CHOICE_BARE = re.compile(r"(?<![\w'])([AB])(?![\w'])")
_CHOICE_HEDGE = re.compile(r"(?<![\w'])(?:A\s*(?:or|and|/|&)\s*B|B\s*(?:or|and|/|&)\s*A)(?![\w'])", re.I)


def parse_choice(text) -> int | None:
    """"A" -> 0, "B" -> 1 from a judge.compare reply; None when unparseable or ambiguous.

    Tried in order, the first rule that finds a letter decides, and a rule that finds both
    letters makes the reply ambiguous (None): the whole reply is one letter ("B", "(a)", "A.");
    "<letter> is better/correct"; a keyword before the letter ("Answer: B", "Option A",
    "I choose B"); a capital A or B standing alone anywhere ("I think B"). "A or B", "A and B",
    "A/B" anywhere make the reply ambiguous.
    """
    t = _clean(text)
    if not t:
        return None
    m = _CHOICE_WHOLE.fullmatch(t)
    if m:
        return "ab".index(m.group(1).lower())
    if _CHOICE_HEDGE.search(t):  # "A or B", "A/B": no decision
        return None
    for rule in (_CHOICE_BETTER, _CHOICE_KEYWORD, _CHOICE_BARE):
        letters = {(g or "").upper() for m in rule.finditer(t) for g in m.groups() if g}
        if len(letters) == 1:
            return "AB".index(letters.pop())
        if len(letters) > 1:
            return None
    return None


_NUMBER = r"(\d+(?:\.\d+)?)"
_SCORE_KEYWORD = re.compile(r"(?i)\b(?:score|rating|grade)\b\s*(?:is|of|=|:|-)?\s*[:=]?\s*" + _NUMBER)
_SCORE_FRACTION = re.compile(_NUMBER + r"\s*(?:/|out\s+of)\s*(\d+)", re.I)
_INTEGER = re.compile(r"(?<![\w.])(\d+)(?![\w]|\.\d)")


def parse_score(text, lo: int = 1, hi: int = 5) -> int | None:
    """The integer score in [lo, hi] of a judge.score reply ("Score: 4"); None when unparseable.

    Rules in order, the first that matches decides: "Score: N" / "score of N" / "rating: N"
    (conflicting repeats -> None); "N/hi" or "N out of hi"; the only integer in the reply.
    A value outside [lo, hi] or not an integer ("4.5") gives None.
    """
    t = _clean(text)
    if not t:
        return None

    def one(values: list[str]) -> int | None:
        if len(set(values)) != 1:
            return None
        value = values[0]
        if not re.fullmatch(r"\d+", value):
            return None
        n = int(value)
        return n if lo <= n <= hi else None

    found = _SCORE_KEYWORD.findall(t)
    if found:
        return one(found)
    fractions = [num for num, den in _SCORE_FRACTION.findall(t) if int(den) == hi]
    if fractions:
        return one(fractions)
    integers = _INTEGER.findall(t)
    if integers:
        return one(integers)
    return None


def parse_ranking(text, n: int) -> list[int] | None:
    """Per-answer ranks (0 = best) from a judge.rank reply listing answer numbers best first.

    "2, 3, 1" for three answers means answer 2 is best, so the result is [2, 0, 1] (answer 1 has
    rank 2, answer 2 rank 0, answer 3 rank 1): the same convention as `Oracle.rank` and GRPO_rank.
    The integers of the whole reply, or else of one of its lines (last line first), must be a
    permutation of 1..n; otherwise None.
    """
    t = _clean(text)
    if not t or n <= 0:
        return None
    candidates = [t] + [line for line in reversed(t.splitlines()) if line.strip()]
    for chunk in candidates:
        numbers = [int(x) for x in re.findall(r"(?<![\w.])(\d+)(?![\w]|\.\d)", chunk)]
        if sorted(numbers) == list(range(1, n + 1)):
            ranks = [0] * n
            for position, number in enumerate(numbers):
                ranks[number - 1] = position
            return ranks
    return None
