"""What every benchmark shares: judge configs, answer generation that resumes, prediction files, reports.

Judge configs. `--judge` takes a YAML file whose `judge:` section is a `JudgeConfig`, or the name of
a bundled one (`configs/judges/NAME.yaml`); `--set judge.key=value` overrides it.

Generation journal. Answers are appended to `generations.jsonl` in the output folder as each batch
finishes, under a first line recording the model (its folder and a signature of its files' sizes and
times) and the decoding settings. A re-run with the same model and settings reuses every answer
whose video and question are unchanged and generates only the rest, so an eval killed at any point
loses at most one batch of generation; a different model or setting starts the journal afresh.
Sampled decoding (temperature > 0) draws each batch from its own seed, so a fresh run is
reproducible; a resumed one draws the batches it still needs from different seeds.

Reports. Every benchmark writes `predictions.jsonl`, `report.json` (settings, the judge that made the
numbers, per-group results) and `report.md` (the same as a headline table).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
from dataclasses import asdict, dataclass, field
from pathlib import Path

from tqdm.auto import tqdm

from vlmalign.config import JudgeConfig, load_config
from vlmalign.data.formats import append_jsonl, iter_json_records, write_jsonl
from vlmalign.errors import ConfigError, DataError, VlmalignError

log = logging.getLogger(__name__)

JUDGE_CONFIGS = Path(__file__).resolve().parents[2] / "configs" / "judges"
JOURNAL = "generations.jsonl"
_PLACEHOLDER = re.compile(r"<(?:video|image)>\s*", re.I)


# ------------------------------------------------------------------------------------ judges


@dataclass
class JudgeFile:
    """Schema of a judge config file: one required `judge:` section."""

    judge: JudgeConfig


def load_judge_config(spec: str, overrides: list[str] | None = None) -> tuple[JudgeConfig, str]:
    """(config, file it came from) for `--judge SPEC`: a YAML path or a bundled config's name."""
    bundled = JUDGE_CONFIGS / f"{spec}.yaml"
    path = Path(spec) if Path(spec).is_file() else bundled
    if not path.is_file():
        names = ", ".join(sorted(p.stem for p in JUDGE_CONFIGS.glob("*.yaml"))) or "none"
        raise ConfigError(f"--judge: {spec} is neither a judge config file nor a bundled judge (bundled: {names})")
    try:
        return load_config(JudgeFile, path, overrides).judge, str(path)
    except ConfigError as e:
        raise ConfigError(f"judge config {path}: {e}") from None


def judge_summary(cfg: JudgeConfig, judge_id: str, config_file: str | None, records: list[dict], prompts: list[str],
                  endpoint: str | None = None) -> dict:
    """Which judge made the numbers: its config, its id, the models that actually answered, when.
    `endpoint`: where an openai judge was reached (its URL without credentials)."""
    dates = sorted(r["date"] for r in records if r.get("date"))
    summary = {
        "id": judge_id,
        "backend": cfg.backend,
        "config": config_file,
        "model": cfg.model,
        "answered_by": sorted({r["model"] for r in records if r.get("model")}),
        "prompts": prompts,
        "first_judged": dates[0] if dates else None,
        "last_judged": dates[-1] if dates else None,
    }
    if cfg.backend == "oracle":
        summary["bench"] = cfg.bench
    else:
        summary["temperature"] = cfg.temperature
    if endpoint:
        summary["endpoint"] = endpoint
    return summary


def describe_judge(summary: dict) -> str:
    """One line naming the judge for report.md."""
    answered = ", ".join(summary["answered_by"]) or "nobody (nothing was judged)"
    text = f"Judge: `{summary['id']}` ({summary['backend']}), answered by {answered}"
    if summary.get("endpoint"):
        text += f" at {summary['endpoint']}"
    if summary.get("bench"):
        text += f", ground truth of `{summary['bench']}`"
    if "temperature" in summary:
        text += f", temperature {summary['temperature']:g}"
    if summary["prompts"]:
        text += f", prompts {', '.join(summary['prompts'])}"
    if summary["first_judged"]:
        span = summary["first_judged"][:10]
        if summary["last_judged"][:10] != span:
            span += f" to {summary['last_judged'][:10]}"
        text += f", judged {span}"
    return text + "."


def strip_placeholder(text: str) -> str:
    """Benchmark questions sometimes carry the model's `<video>` token; a text-only judge reads none."""
    return _PLACEHOLDER.sub("", text).strip()


# --------------------------------------------------------------------------------- generation


@dataclass
class Decoding:
    temperature: float = 0.0  # 0: greedy
    top_p: float = 1.0
    max_new_tokens: int = 64
    batch_size: int = 16
    seed: int = 0  # sampled decoding only

    @property
    def greedy(self) -> bool:
        return self.temperature <= 0


@dataclass
class Request:
    """One question for the model; `key` is unique within an evaluation."""

    key: str
    video: str | list[str] | None
    question: str


@dataclass
class GenerationStats:
    generated: int = 0
    reused: int = 0
    settings: dict = field(default_factory=dict)


def model_signature(model_dir) -> str:
    """The model folder and a hash of its files' names, sizes and modification times: retraining
    into the same folder changes it, without reading gigabytes of weights."""
    path = Path(model_dir)
    if not path.is_dir():
        return str(model_dir)  # a hub name, as given
    h = hashlib.sha256()
    for f in sorted(p for p in path.rglob("*") if p.is_file()):
        st = f.stat()
        h.update(f"{f.relative_to(path)}:{st.st_size}:{st.st_mtime_ns}\n".encode())
    return f"{path.resolve()}#{h.hexdigest()[:12]}"


def _read_journal(path: Path, settings: dict) -> dict[str, dict]:
    """Answers of an earlier run with the same settings, by key; {} (and no file) otherwise."""
    if not path.is_file():
        return {}
    lines = path.read_text(encoding="utf-8").splitlines()
    records = []
    for i, line in enumerate(lines):
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            if i < len(lines) - 1:
                raise DataError(f"{path}:{i + 1}: invalid JSON in the generation journal; delete the file to "
                                "generate afresh") from None
            # The run was killed while writing this line: drop it, so new lines do not follow a fragment.
            write_jsonl(path, records)
    if not records or records[0].get("settings") != settings:
        if records:
            log.warning("%s was written by another model or with other settings; generating afresh", path)
        path.unlink()
        return {}
    return {r["key"]: r for r in records[1:]}


def generate(model_dir, requests: list[Request], decoding: Decoding, out_dir, feature_cache=None,
             progress: bool = True) -> tuple[dict[str, str], GenerationStats]:
    """Answer each request with the model in `model_dir`, reusing the journal in `out_dir`.

    Returns ({key: answer}, stats). The model is loaded only when something is left to generate.
    """
    settings = {"model": model_signature(model_dir), "decoding": asdict(decoding)}
    journal = Path(out_dir) / JOURNAL
    done = _read_journal(journal, settings)
    answers, todo = {}, []
    for r in requests:
        old = done.get(r.key)
        if old is not None and old["question"] == r.question and old["video"] == _video_str(r.video):
            answers[r.key] = old["pred"]
        else:
            todo.append(r)
    stats = GenerationStats(reused=len(answers), settings=settings)
    if not todo:
        return answers, stats
    import torch

    from vlmalign.model.generation import GenerationConfig, sample_answers
    from vlmalign.model.policy import load_model

    model = load_model(model_dir)
    model.eval()
    visual = model.visual_inputs(feature_cache)
    gen = GenerationConfig(max_new_tokens=decoding.max_new_tokens, do_sample=not decoding.greedy,
                           temperature=decoding.temperature, top_p=decoding.top_p, batch_size=decoding.batch_size)
    if not journal.is_file():
        append_jsonl(journal, {"settings": settings})
    bar = tqdm(total=len(todo), desc="generate", unit="q", disable=not progress)
    for start in range(0, len(todo), decoding.batch_size):
        chunk = todo[start : start + decoding.batch_size]
        generator = None
        if not decoding.greedy:
            generator = torch.Generator(device=model.device).manual_seed(decoding.seed * 1_000_003 + start)
        groups = sample_answers(model, visual, [(r.video, r.question) for r in chunk], gen, generator=generator)
        for r, (sample,) in zip(chunk, groups):
            append_jsonl(journal, {"key": r.key, "video": _video_str(r.video), "question": r.question, "pred": sample.text})
            answers[r.key] = sample.text
        bar.update(len(chunk))
    bar.close()
    stats.generated = len(todo)
    return answers, stats


def _video_str(video) -> str | list[str] | None:
    if video is None or isinstance(video, list):
        return video
    return os.fspath(video)


def describe_decoding(gen: dict | None) -> list[str]:
    """The report.md line on how the answers were generated (none for existing predictions)."""
    if not gen:
        return []
    how = "greedy" if gen["decoding"] == "greedy" else \
        f"sampled at temperature {gen['temperature']:g}, top-p {gen['top_p']:g}, seed {gen['seed']}"
    return [f"Decoding: {how}, at most {gen['max_new_tokens']} new tokens ({gen['generated']} answers generated now, "
            f"{gen['reused']} reused from {JOURNAL})."]


def decoding_summary(decoding: Decoding | None, stats: GenerationStats | None) -> dict | None:
    if decoding is None:
        return None
    out = {"decoding": "greedy" if decoding.greedy else "sampled", **asdict(decoding)}
    if decoding.greedy:
        out.pop("seed")
        out.pop("top_p")
    if stats is not None:
        out.update(model=stats.settings["model"], generated=stats.generated, reused=stats.reused)
    return out


# -------------------------------------------------------------------------------- input files


def unique_keys(ids: list[str]) -> list[str]:
    """Ids made unique by numbering repeats ("v1", "v1#2", ...): Video-ChatGPT prediction files key
    records by video name, which repeats for every question about the same video."""
    seen: dict[str, int] = {}
    out = []
    for i in ids:
        seen[i] = seen.get(i, 0) + 1
        out.append(i if seen[i] == 1 else f"{i}#{seen[i]}")
    return out


class Fields:
    """Typed access to one record of an evaluation input file, with errors naming file, line and field."""

    def __init__(self, path, line: int, data: dict):
        self.where = f"{os.fspath(path)}:{line}"
        self.data = data

    def error(self, problem: str) -> DataError:
        return DataError(f"{self.where}: {problem}")

    def first(self, keys: tuple[str, ...]) -> str | None:
        """The first of `keys` present (not null), or None."""
        return next((k for k in keys if self.data.get(k) is not None), None)

    def text(self, key: str, allow_empty: bool = False, alternatives: tuple[str, ...] = ()) -> str:
        """A string field (numbers are read as strings); `alternatives` may stand in for `key`."""
        name = self.first((key, *alternatives))
        if name is None:
            also = f" (or {', '.join(repr(a) for a in alternatives)})" if alternatives else ""
            raise self.error(f"missing field {key!r}{also}")
        value = self.data[name]
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return str(value)
        if not isinstance(value, str):
            raise self.error(f"field {name!r} must be a string, got {type(value).__name__}")
        if not allow_empty and not value.strip():
            raise self.error(f"field {name!r} is empty")
        return value


def read_records(path) -> list[tuple[Fields, dict]]:
    return [(Fields(path, line, data), data) for line, data in iter_json_records(path)]


# ------------------------------------------------------------------------------------ reports


def fmt(value, percent: bool = False) -> str:
    if value is None:
        return "n/a"
    return f"{100 * value:.1f}" if percent else f"{value:.2f}"


def write_outputs(out_dir, predictions: list[dict], judgments: list[dict] | None, report: dict, markdown: str) -> None:
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    write_jsonl(out / "predictions.jsonl", predictions)
    if judgments is not None:
        write_jsonl(out / "judgments.jsonl", judgments)
    tmp = out / ".report.json.tmp"
    tmp.write_text(json.dumps(report, indent=2, ensure_ascii=False))
    os.replace(tmp, out / "report.json")
    (out / "report.md").write_text(markdown)


def check_limit(limit: int | None) -> None:
    if limit is not None and limit < 1:
        raise VlmalignError(f"--limit must be at least 1, got {limit}")
