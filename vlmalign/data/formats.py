"""Readers (and our writer) for every data format vlmalign consumes.

Each reader takes a `.json` file (an array of records) or a `.jsonl` file (one record per line,
blank lines skipped), detects the format of every record from its keys, and returns dataclasses.
A malformed record raises `DataError` with one line naming the file, the line and the field, e.g.
`data/train.jsonl:17: record 'vid_3' is missing field 'conversations'`. A record's line is its
physical line in JSONL and the line its object starts on in a JSON array.

Formats:
- Instructions (`read_instructions`): LLaVA / VLM-RLAIF / LLaVA-Hound
  `{"id", "video" | "images", "conversations": [{"from", "value"}]}` and LLaMA-Factory
  `{"messages": [{"role", "content"}], "videos": [one path]}`.
- Preference pairs (`read_preference_pairs`): LLaVA-Hound / ours `{"id", "prompt", "chosen",
  "rejected", "video", ...}`, VLM-RLAIF `conversations` + `output_1`/`output_2`/`preference`,
  LLaMA-Factory `messages` + `chosen`/`rejected` messages + `videos`.
- Video-ChatGPT zero-shot QA (`read_qa`) and generative benchmark (`read_generative`).

Placeholders: `<image>` is read as `<video>`; a record with a video holds exactly one placeholder,
in its first user turn (inserted as "<video>\\n" when absent); a record without one holds none.

Hub files: a data file may be named `hf://datasets/ORG/NAME/PATH` (or `NAME@REVISION`), the
Hugging Face hub's file URL: it is downloaded once into the local hub cache and read from there,
offline too once cached (`local_data_file`).

Videos: relative paths are resolved against `video_root` if given, else the data file's folder;
absolute paths are kept. Whether a video exists is left to decoding, which reports it clearly;
only the benchmark readers look at the disk, to complete names written without an extension
(see `resolve_video`).
"""

from __future__ import annotations

import functools
import json
import os
import re
import uuid
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

from vlmalign.errors import DataError

VIDEO_TOKEN = "<video>"
IMAGE_TOKEN = "<image>"

# Order in which `resolve_video` tries extensions for a bare benchmark name: MSRVTT and most of
# ActivityNet are .mp4, MSVD .avi, the rest of ActivityNet .mkv/.webm, TGIF .gif.
VIDEO_EXTS = (".mp4", ".avi", ".mkv", ".webm", ".mov", ".gif")
# Suffixes that mean a name already has an extension. A fixed list, because ids contain dots
# that are not extensions.
_KNOWN_EXTS = frozenset(VIDEO_EXTS + (".m4v", ".mpg", ".mpeg", ".flv", ".wmv", ".3gp"))

_ROLES = {
    "human": "user",
    "user": "user",
    "gpt": "assistant",
    "assistant": "assistant",
    "system": "system",
}
_JSON_WS = re.compile(r"[ \t\n\r]*")


@dataclass
class Turn:
    role: str  # "user" | "assistant"
    text: str


@dataclass
class InstructionSample:
    id: str
    video: str | list[str] | None  # video file or frame folder, or a list of frame paths; None: text-only
    turns: list[Turn]  # user/assistant alternating, from user to assistant; turn 0 holds "<video>" iff video
    source: str  # "file:line"
    kind: str | None = None  # the record's question type, if it names one: SFT logs its loss per kind


@dataclass
class PreferencePair:
    id: str
    video: str | list[str] | None
    prompt: str  # the user question, holding one "<video>" when video is not None
    chosen: str
    rejected: str
    chosen_score: float | None = None
    rejected_score: float | None = None
    meta: dict = field(default_factory=dict)  # every other field of the record, for provenance
    source: str = ""


@dataclass
class QAItem:
    id: str  # question_id, else video name + "-" + index in the file
    video: str
    question: str
    answer: str
    qtype: str | None = None
    source: str = ""


@dataclass
class GenerativeItem:
    id: str
    video: str
    question: str
    answer: str
    question2: str | None = None  # consistency items: the rephrased question
    source: str = ""


# ----------------------------------------------------------------------------- reading records


HUB_SCHEME = "hf://datasets/"


def local_data_file(spec: str | os.PathLike) -> str:
    """A local path as given; for `hf://datasets/ORG/NAME[@REVISION]/PATH`, the file in the local
    hub cache, downloaded there first if needed (offline: only what is cached)."""
    name = os.fspath(spec)
    return _hub_file(name) if name.startswith(HUB_SCHEME) else name


@functools.lru_cache(maxsize=None)
def _hub_file(url: str) -> str:
    from huggingface_hub import hf_hub_download
    from huggingface_hub.errors import EntryNotFoundError, HfHubHTTPError, LocalEntryNotFoundError

    parts = url[len(HUB_SCHEME):].split("/")
    if len(parts) < 3 or not all(parts):
        raise DataError(f"{url}: a hub data file is named hf://datasets/ORG/NAME/PATH (or NAME@REVISION)")
    name, _, revision = parts[1].partition("@")
    repo, filename = f"{parts[0]}/{name}", "/".join(parts[2:])
    try:
        return hf_hub_download(repo, filename, repo_type="dataset", revision=revision or None)
    except (EntryNotFoundError, LocalEntryNotFoundError, HfHubHTTPError, OSError, ValueError) as e:
        raise DataError(f"{url}: cannot get {filename} of dataset {repo} (offline without a cached copy, or no such "
                        f"repository or file): {str(e).splitlines()[0]}") from None


def iter_json_records(path: str | os.PathLike) -> Iterator[tuple[int, dict]]:
    """Yield (line, record) from a .json array or a .jsonl file (local, or a hub file URL)."""
    name = os.fspath(path)
    suffix = Path(name).suffix.lower()
    try:
        # utf-8-sig: files saved by some Windows editors start with a byte-order mark.
        with open(local_data_file(name), encoding="utf-8-sig") as f:
            if suffix == ".jsonl":
                records = _iter_jsonl(name, f)
            elif suffix == ".json":
                records = _iter_json_array(name, f.read())
            else:
                raise DataError(
                    f"{name}: unsupported data file type {suffix or '(none)'!r}; expected .json "
                    "(an array of records) or .jsonl (one record per line)"
                )
            for line, record in records:
                if not isinstance(record, dict):
                    raise DataError(
                        f"{name}:{line}: expected a record (a JSON object), "
                        f"got {type(record).__name__}"
                    )
                yield line, record
    except FileNotFoundError:
        raise DataError(f"{name}: file not found") from None
    except UnicodeDecodeError as e:
        raise DataError(f"{name}: not UTF-8 text ({e.reason} at byte {e.start})") from None
    except OSError as e:
        raise DataError(f"{name}: cannot read: {e.strerror}") from None


def _iter_jsonl(name: str, lines: Iterable[str]) -> Iterator[tuple[int, object]]:
    for line_no, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            yield line_no, json.loads(line)
        except json.JSONDecodeError as e:
            raise DataError(f"{name}:{line_no}: invalid JSON: {e.msg} (column {e.colno})") from None


def _iter_json_array(name: str, text: str) -> Iterator[tuple[int, object]]:
    # Decode one element at a time (raw_decode) to learn where each record starts, which
    # json.loads would not tell us, without parsing the file twice.
    decoder = json.JSONDecoder()

    def skip_ws(pos: int) -> int:
        return _JSON_WS.match(text, pos).end()

    def fail(pos: int, problem: str) -> DataError:
        line_at = text.count("\n", 0, pos) + 1
        return DataError(f"{name}:{line_at}: {problem}")

    pos = skip_ws(0)
    if not text.startswith("[", pos):
        raise fail(pos, "expected a JSON array of records ('[...]'); a file with one record "
                        "per line needs the .jsonl extension")
    pos = skip_ws(pos + 1)
    line, counted_to = 1, 0  # newlines are counted incrementally: files can be large
    if not text.startswith("]", pos):
        while True:
            line += text.count("\n", counted_to, pos)
            counted_to = pos
            try:
                record, pos = decoder.raw_decode(text, pos)
            except json.JSONDecodeError as e:
                raise DataError(f"{name}:{e.lineno}: invalid JSON: {e.msg} (column {e.colno})") from None
            yield line, record
            pos = skip_ws(pos)
            if text.startswith(",", pos):
                pos = skip_ws(pos + 1)
            elif text.startswith("]", pos):
                break
            else:
                raise fail(pos, "invalid JSON: expected ',' or ']' after a record")
    if skip_ws(pos + 1) != len(text):
        raise fail(skip_ws(pos + 1), "invalid JSON: extra data after the array")


class _Record:
    """One raw record and where it came from; builds the one-line errors that name it."""

    def __init__(self, path, line: int, data: dict, video_root, id_keys: Sequence[str] = ("id",)):
        self.path = os.fspath(path)
        self.line = line
        self.data = data
        self.video_root = video_root
        self.src = f"{self.path}:{line}"
        self.id = None  # the record's own id, if it has one
        for key in id_keys:
            value = data.get(key)
            if value is None or value == "":
                continue
            if isinstance(value, bool) or not isinstance(value, (str, int)):
                raise DataError(f"{self.src}: field {key!r} must be a string or an integer, "
                                f"got {_show(value)}")
            self.id = str(value)
            break

    def id_or_line(self) -> str:
        return self.id or f"{Path(self.path).stem}-{self.line}"

    def error(self, problem: str) -> DataError:
        who = "record" if self.id is None else f"record {self.id!r}"
        return DataError(f"{self.src}: {who} {problem}")

    def missing(self, key: str, hint: str = "") -> DataError:
        return self.error(f"is missing field {key!r}{hint}")

    def bad(self, key: str, problem: str) -> DataError:
        return self.error(f"field {key!r} {problem}")

    def has(self, key: str) -> bool:
        # null counts as absent: 🤗 datasets exports fill a column a record lacks with null.
        return self.data.get(key) is not None

    def text(self, key: str, numbers: bool = False) -> str:
        """A required, non-empty string field; `numbers` also takes ints and floats (ids, answers)."""
        value = self.data.get(key)
        if value is None:
            raise self.missing(key)
        if numbers and isinstance(value, (int, float)) and not isinstance(value, bool):
            return str(value)
        if not isinstance(value, str):
            raise self.bad(key, f"must be a string, got {_show(value)}")
        _require_text(self, key, value)
        return value

    def resolve(self, value: str | list[str], video_ext=None) -> str | list[str]:
        return resolve_video(value, self.path, self.video_root, video_ext)


def _show(value: object) -> str:
    """A value for a one-line message: repr escapes newlines; long values are cut."""
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _require_text(r: _Record, where: str, text: str) -> None:
    if not text.strip():
        raise r.bad(where, "is empty")


# ----------------------------------------------------------------------------- videos


def resolve_video(value: str | list[str], data_file, video_root=None, video_ext=None) -> str | list[str]:
    """Resolve a video path, frame folder or list of frame paths from a data record.

    Relative paths are joined to `video_root`, else to `data_file`'s folder (a hub file's folder
    in the local cache); absolute paths are kept. `video_ext` completes a single name that has no video extension (benchmarks list
    videos by id):
      - None: keep it as written (training data names its files and frame folders exactly);
      - a string such as ".mp4": append it, without looking at the disk;
      - a sequence such as VIDEO_EXTS: the first that exists of the bare path (a frame folder)
        and the path plus each extension in order; if none exists, the bare path, so the
        decoder's "not found" error shows the name the data gave.
    Frame lists are images, so `video_ext` never applies to them.
    """
    base = Path(video_root) if video_root is not None else Path(local_data_file(data_file)).parent
    if isinstance(value, list):
        return [str(base / Path(v).expanduser()) for v in value]
    path = base / Path(value).expanduser()  # joining an absolute path keeps it
    if video_ext is None or path.suffix.lower() in _KNOWN_EXTS:
        return str(path)
    if isinstance(video_ext, str):
        return str(path) + (video_ext if video_ext.startswith(".") else "." + video_ext)
    for candidate in (str(path), *(str(path) + ext for ext in video_ext)):
        if os.path.exists(candidate):
            return candidate
    return str(path)


def _video_field(r: _Record, key: str) -> str | list[str] | None:
    """A video path, frame folder or non-empty list of frame paths; None when absent."""
    value = r.data.get(key)
    if value is None:
        return None
    if isinstance(value, str) and value.strip():
        return r.resolve(value)
    if isinstance(value, list) and value and all(isinstance(v, str) and v.strip() for v in value):
        return r.resolve(value)
    raise r.bad(key, f"must be a video path or a non-empty list of frame paths, got {_show(value)}")


def _llava_video(r: _Record) -> str | list[str] | None:
    if r.has("video") and r.has("images"):
        raise r.error("has both 'video' and 'images'; give one")
    return _video_field(r, "video") if r.has("video") else _video_field(r, "images")


def _llamafactory_video(r: _Record) -> str | None:
    videos = r.data.get("videos")
    if videos is None or videos == []:
        return None
    if not isinstance(videos, list) or not all(isinstance(v, str) and v.strip() for v in videos):
        raise r.bad("videos", f"must be a list of video paths, got {_show(videos)}")
    if len(videos) > 1:
        raise r.bad("videos", f"has {len(videos)} videos; one video per sample is supported")
    return r.resolve(videos[0])


# ----------------------------------------------------------------------------- turns and placeholders


def _dialogue(r: _Record, key: str, role_key: str, text_key: str) -> list[tuple[str, Turn]]:
    """Parse a turn list into (field name for errors, Turn), checking that roles alternate."""
    raw = r.data.get(key)
    if not isinstance(raw, list) or not raw:
        raise r.bad(key, f"must be a non-empty list of turns, got {_show(raw)}")
    turns = []
    for i, item in enumerate(raw):
        where = f"{key}[{i}]"
        role = item.get(role_key) if isinstance(item, dict) else None
        text = item.get(text_key) if isinstance(item, dict) else None
        if not isinstance(role, str) or role not in _ROLES or not isinstance(text, str):
            raise r.bad(where, f"must be an object with {role_key!r} (one of "
                               f"{', '.join(_ROLES)}) and a string {text_key!r}, got {_show(item)}")
        turns.append((where, Turn(_ROLES[role], text)))
    # A leading system prompt is dropped: the conversation template supplies its own.
    if turns[0][1].role == "system":
        turns = turns[1:]
    if not turns:
        raise r.bad(key, "has no user turn")
    for n, (where, turn) in enumerate(turns):
        expected = "user" if n % 2 == 0 else "assistant"
        if turn.role != expected:
            raise r.bad(where, f"is a {turn.role!r} turn where {expected!r} was expected "
                               "(turns alternate user/assistant, starting with user)")
    return turns


def _place_video_token(r: _Record, texts: list[tuple[str, str]], has_video: bool) -> list[str]:
    """Apply the placeholder rules to (field, text) pairs, the first being the user question."""
    texts = [(where, text.replace(IMAGE_TOKEN, VIDEO_TOKEN)) for where, text in texts]
    holders = [where for where, text in texts for _ in range(text.count(VIDEO_TOKEN))]
    if len(holders) > 1:
        raise r.error(f"has {len(holders)} '<video>' placeholders (in "
                      f"{', '.join(dict.fromkeys(holders))}); one video per sample is supported")
    if holders and not has_video:
        raise r.bad(holders[0], "has a '<video>' placeholder but the record has no video")
    if holders and holders[0] != texts[0][0]:
        raise r.bad(holders[0], "holds the '<video>' placeholder; it belongs in the first user turn")
    out = [text for _, text in texts]
    if has_video and not holders:
        out[0] = f"{VIDEO_TOKEN}\n{out[0]}"
    return out


# ----------------------------------------------------------------------------- instructions

_QTYPE_FIELDS = ("question_type", "type", "qtype")  # a record's question type (instructions, QA)


def read_instructions(path, video_root=None) -> list[InstructionSample]:
    """Read LLaVA-style or LLaMA-Factory instruction data (formats may mix, per record)."""
    samples = []
    for line, data in iter_json_records(path):
        r = _Record(path, line, data, video_root)
        if r.has("conversations"):
            samples.append(_instruction_from_llava(r))
        elif r.has("messages"):
            samples.append(_instruction_from_llamafactory(r))
        else:
            raise r.missing("conversations", " (or 'messages' for LLaMA-Factory data)")
    return samples


def _instruction_from_llava(r: _Record) -> InstructionSample:
    return _instruction(r, _dialogue(r, "conversations", "from", "value"), _llava_video(r))


def _instruction_from_llamafactory(r: _Record) -> InstructionSample:
    return _instruction(r, _dialogue(r, "messages", "role", "content"), _llamafactory_video(r))


def _instruction(r: _Record, turns: list[tuple[str, Turn]], video) -> InstructionSample:
    where, last = turns[-1]
    if last.role != "assistant":
        raise r.bad(where, "is the last turn but not an assistant answer; instruction data "
                           "must end with one")
    for where, turn in turns:
        _require_text(r, where, turn.text)
    texts = _place_video_token(r, [(where, turn.text) for where, turn in turns], video is not None)
    return InstructionSample(
        id=r.id_or_line(),
        video=video,
        turns=[Turn(turn.role, text) for (_, turn), text in zip(turns, texts)],
        source=r.src,
        kind=next((r.text(key, numbers=True) for key in _QTYPE_FIELDS if r.has(key)), None),
    )


# ----------------------------------------------------------------------------- preference pairs

# Fields each format turns into PreferencePair attributes; every other field goes to `meta`.
_FLAT_FIELDS = ("id", "video", "prompt", "chosen", "rejected", "chosen_score", "rejected_score")
_RLAIF_FIELDS = ("id", "video", "images", "conversations", "output_1", "output_2", "preference")
_LLAMAFACTORY_FIELDS = ("id", "messages", "videos", "chosen", "rejected")


def read_preference_pairs(path, video_root=None) -> list[PreferencePair]:
    """Read LLaVA-Hound / our, VLM-RLAIF or LLaMA-Factory preference pairs (per record)."""
    pairs = []
    for line, data in iter_json_records(path):
        r = _Record(path, line, data, video_root)
        if r.has("prompt"):
            pairs.append(_pair_from_flat(r))
        elif r.has("messages"):
            pairs.append(_pair_from_llamafactory(r))
        elif r.has("conversations"):
            pairs.append(_pair_from_rlaif(r))
        else:
            raise r.error(
                "matches no preference format: expected 'prompt', 'chosen', 'rejected' "
                "(LLaVA-Hound), 'conversations', 'output_1', 'output_2', 'preference' "
                "(VLM-RLAIF) or 'messages', 'chosen', 'rejected' (LLaMA-Factory)"
            )
    return pairs


def _pair_from_flat(r: _Record) -> PreferencePair:
    """LLaVA-Hound DPO JSONL, and ours: the same keys plus provenance fields."""
    return _pair(
        r,
        _video_field(r, "video"),
        prompt=("prompt", r.text("prompt")),
        chosen=("chosen", r.text("chosen")),
        rejected=("rejected", r.text("rejected")),
        scores=(_score(r, "chosen_score"), _score(r, "rejected_score")),
        consumed=_FLAT_FIELDS,
    )


def _pair_from_rlaif(r: _Record) -> PreferencePair:
    turns = _dialogue(r, "conversations", "from", "value")
    # VLM-RLAIF ends the conversation with a gpt turn that its loader overwrites with each output.
    if turns[-1][1].role == "assistant":
        turns = turns[:-1]
    preference = r.data.get("preference")
    if preference is None:
        raise r.missing("preference")
    if isinstance(preference, bool) or preference not in (1, 2):
        raise r.bad("preference", f"must be 1 or 2 (the preferred output), got {_show(preference)}")
    outputs = [_reply(r, "output_1", "value"), _reply(r, "output_2", "value")]
    chosen, rejected = outputs if preference == 1 else outputs[::-1]
    return _pair(r, _llava_video(r), _question(r, turns, "conversations"), chosen, rejected,
                 consumed=_RLAIF_FIELDS)


def _pair_from_llamafactory(r: _Record) -> PreferencePair:
    turns = _dialogue(r, "messages", "role", "content")
    return _pair(
        r,
        _llamafactory_video(r),
        prompt=_question(r, turns, "messages"),
        chosen=_reply(r, "chosen", "content"),
        rejected=_reply(r, "rejected", "content"),
        consumed=_LLAMAFACTORY_FIELDS,
    )


def _question(r: _Record, turns: list[tuple[str, Turn]], key: str) -> tuple[str, str]:
    """The single user question a pair answers: PreferencePair has no place for earlier turns."""
    if len(turns) != 1:
        raise r.bad(key, f"holds {len(turns)} turns; a preference pair takes one user question")
    where, turn = turns[0]
    _require_text(r, where, turn.text)
    return where, turn.text


def _reply(r: _Record, key: str, text_key: str) -> tuple[str, str]:
    """A response stored as an object, e.g. {"value": ...} or {"role": "assistant", "content": ...}."""
    value = r.data.get(key)
    if value is None:
        raise r.missing(key)
    text = value.get(text_key) if isinstance(value, dict) else None
    if not isinstance(text, str):
        raise r.bad(key, f"must be an object with a string {text_key!r}, got {_show(value)}")
    where = f"{key}.{text_key}"
    _require_text(r, where, text)
    return where, text


def _score(r: _Record, key: str) -> float | None:
    value = r.data.get(key)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise r.bad(key, f"must be a number, got {_show(value)}")
    return float(value)


def _pair(r: _Record, video, prompt, chosen, rejected, consumed, scores=(None, None)) -> PreferencePair:
    """Build a pair from (field, text) parts; placeholders are checked over all three texts."""
    prompt_text, chosen_text, rejected_text = _place_video_token(
        r, [prompt, chosen, rejected], video is not None
    )
    return PreferencePair(
        id=r.id_or_line(),
        video=video,
        prompt=prompt_text,
        chosen=chosen_text,
        rejected=rejected_text,
        chosen_score=scores[0],
        rejected_score=scores[1],
        meta={key: value for key, value in r.data.items() if key not in consumed},
        source=r.src,
    )


# ----------------------------------------------------------------------------- benchmarks

_VIDEO_NAME_FIELDS = ("video_name", "video_id", "video")
_QUESTION_ID_FIELDS = ("question_id", "id")


def read_qa(path, video_root=None, video_ext=VIDEO_EXTS) -> list[QAItem]:
    """Read Video-ChatGPT zero-shot QA: `[{"video_name", "question_id", "question", "answer"}]`.

    Video names usually lack an extension; `video_ext` says how to complete them (see
    `resolve_video`; the default tries VIDEO_EXTS on disk). Numeric names, ids, answers and
    types are read as strings.
    """
    items = []
    for index, (line, data) in enumerate(iter_json_records(path)):
        r = _Record(path, line, data, video_root, id_keys=_QUESTION_ID_FIELDS)
        name = _video_name(r)
        qtype = next((r.text(key, numbers=True) for key in _QTYPE_FIELDS if r.has(key)), None)
        items.append(QAItem(
            id=r.id or f"{name}-{index}",
            video=r.resolve(name, video_ext),
            question=r.text("question"),
            answer=r.text("answer", numbers=True),
            qtype=qtype,
            source=r.src,
        ))
    return items


def read_generative(path, video_root=None, video_ext=VIDEO_EXTS) -> list[GenerativeItem]:
    """Read the Video-ChatGPT generative benchmark: `{"video_name", "Q", "A"}` (general,
    temporal) or `{"video_name", "Q1", "Q2", "A"}` (consistency). Q2 is read as its own field:
    one public evaluation script passes Q1 twice. Videos as in `read_qa`."""
    items = []
    for index, (line, data) in enumerate(iter_json_records(path)):
        r = _Record(path, line, data, video_root, id_keys=_QUESTION_ID_FIELDS)
        name = _video_name(r)
        if r.has("Q"):
            question, question2 = r.text("Q"), None
        elif r.has("Q1"):
            question, question2 = r.text("Q1"), r.text("Q2")
        else:
            raise r.error("matches no generative-benchmark format: expected 'Q' and 'A' "
                          "(general, temporal) or 'Q1', 'Q2' and 'A' (consistency)")
        items.append(GenerativeItem(
            id=r.id or f"{name}-{index}",
            video=r.resolve(name, video_ext),
            question=question,
            answer=r.text("A", numbers=True),
            question2=question2,
            source=r.src,
        ))
    return items


def _video_name(r: _Record) -> str:
    for key in _VIDEO_NAME_FIELDS:
        if r.has(key):
            return r.text(key, numbers=True)
    raise r.missing(_VIDEO_NAME_FIELDS[0], " (or 'video_id', 'video')")


# ----------------------------------------------------------------------------- writing


@contextmanager
def _atomic_file(path):
    """A text file that replaces `path` whole when the block ends, and never exists half-written: a
    reader (or a process writing the same file beside this one) sees the old file or a whole new one."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    # A unique name in the same folder, so os.replace is a rename on one filesystem; created
    # with open(), not mkstemp, so the file gets the usual umask permissions instead of 0600.
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex}.tmp")
    try:
        with open(tmp, "x", encoding="utf-8") as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def write_jsonl(path, records: Iterable[dict]) -> None:
    """Write records as JSONL atomically: readers see the old file or the whole new one."""
    with _atomic_file(path) as f:
        for record in records:
            f.write(json.dumps(record, ensure_ascii=False) + "\n")


def write_json(path, obj, indent: int | None = None) -> None:
    """Write one JSON document atomically, as `write_jsonl` writes lines."""
    with _atomic_file(path) as f:
        f.write(json.dumps(obj, ensure_ascii=False, indent=indent) + "\n")


def read_json(path):
    """One JSON document (a summary, a report, a manifest), or a one-line error naming the file."""
    try:
        return json.loads(Path(path).read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise DataError(f"{path}: file not found") from None
    except UnicodeDecodeError as e:
        raise DataError(f"{path}: not UTF-8 text ({e.reason} at byte {e.start})") from None
    except json.JSONDecodeError as e:
        raise DataError(f"{path}:{e.lineno}: invalid JSON ({e.msg})") from None


def append_jsonl(path, record: dict) -> None:
    """Append one record as a line and make it durable, for outputs that resume after a crash."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    # Serialise before opening so a record that fails to encode leaves no partial line.
    line = (json.dumps(record, ensure_ascii=False) + "\n").encode("utf-8")
    with open(path, "ab") as f:
        f.write(line)
        f.flush()
        os.fsync(f.fileno())
