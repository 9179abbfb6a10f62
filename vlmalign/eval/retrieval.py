"""CLIP-score retrieval and action recognition: the model describes each video, a CLIP text tower
compares the description with the candidate texts.

No judge. The model is asked to describe each video (prompt `eval.describe`); a CLIP text encoder
embeds the descriptions and the candidates; cosine similarity ranks them.

- retrieval: the candidates are every ground-truth caption of the evaluated videos. Video to text: a
  video's rank is that of its best-placed own caption among all captions; text to video: a caption's
  rank is that of its video's description among all descriptions. R@1, R@5, R@10, median and mean rank.
- action: the candidates are the class names, each written into `class_template` ("a video of {}.");
  top-1 and top-5 accuracy, and the mean over classes of the top-1 accuracy.

Ranks are 1-based and ties count against the target: a candidate as similar as the target is placed
before it. A model that gives many videos the same description therefore gets no lucky hits.

The text tower: `text_encoder` (a transformers CLIP checkpoint, local folder or hub name) or, by
default, the CLIP checkpoint the model's own vision tower was loaded from (`vision.pretrained`). A
model whose tower was built from a config (the tiny models) has no text tower: pass one.

Inputs (JSON array or JSONL; errors name file, line and field):
- retrieval: `{"video_name" | "video" | "video_id", "caption"}` or `{..., "captions": [...]}` (one
  record per video or per caption; several captions of one video are grouped), or MSR-VTT's CSV
  (`video_id,sentence`, e.g. the 1k-A test split);
- action: `{"video_name" | ..., "label"}` and a class list (`--classes`: one class per line, an
  optional leading index as in UCF101's classInd.txt; default: the labels found in the data).
With `predictions`, records also hold the model's description in `pred` and nothing is generated.
A synthetic benchmark folder gives `retrieval_test.json`, `action_test.json` and `action_classes.txt`.
"""

from __future__ import annotations

import csv
import json
import os
from dataclasses import dataclass, field
from pathlib import Path

from vlmalign.data.formats import VIDEO_EXTS, local_data_file, resolve_video
from vlmalign.errors import DataError, VlmalignError
from vlmalign.eval.common import (
    Decoding,
    Fields,
    Request,
    check_limit,
    decoding_summary,
    describe_decoding,
    fmt,
    generate,
    read_records,
    unique_keys,
    write_outputs,
)
from vlmalign.feedback.cache import utc_now
from vlmalign.prompts import load_prompt

__all__ = ["VideoItem", "read_retrieval", "read_action", "read_classes", "target_ranks", "rank_metrics",
           "ClipTextEncoder", "text_encoder_source", "evaluate_retrieval", "evaluate_action"]

_VIDEO_FIELDS = ("video_name", "video", "video_id", "videoID")
DEFAULT_TEMPLATE = "a video of {}."


@dataclass
class VideoItem:
    key: str
    video: str
    video_name: str
    texts: list[str] = field(default_factory=list)  # retrieval: its captions; action: [label]
    pred: str | None = None


# ------------------------------------------------------------------------------------------ metrics


def target_ranks(similarity, targets: list[list[int]]) -> list[int]:
    """1-based rank of each row's best target column; every other column at least as similar as
    that target is placed before it (ties count against the target)."""
    import torch

    sim = torch.as_tensor(similarity, dtype=torch.float64)
    ranks = []
    for row, cols in zip(sim, targets):
        best = row[cols].max()
        others = torch.ones_like(row, dtype=torch.bool)
        others[cols] = False
        ranks.append(1 + int((row[others] >= best).sum()))
    return ranks


def rank_metrics(ranks: list[int], ks=(1, 5, 10)) -> dict:
    """Recall at each k (the share of ranks <= k), median and mean rank."""
    if not ranks:
        return {"n": 0}
    ordered = sorted(ranks)
    mid = len(ordered) // 2
    median = ordered[mid] if len(ordered) % 2 else (ordered[mid - 1] + ordered[mid]) / 2
    return {"n": len(ranks), **{f"R@{k}": sum(r <= k for r in ranks) / len(ranks) for k in ks},
            "median_rank": median, "mean_rank": sum(ranks) / len(ranks)}


# ------------------------------------------------------------------------------------- text tower


def text_encoder_source(model_dir, text_encoder: str | None) -> str:
    """The CLIP checkpoint whose text tower scores: `text_encoder`, else the one the model's vision
    tower was loaded from."""
    if text_encoder:
        return text_encoder
    manifest = Path(model_dir) / "model.json" if model_dir is not None else None
    if manifest is None or not manifest.is_file():
        raise VlmalignError("CLIP-score evaluation needs a CLIP text tower: pass --text-encoder (a CLIP checkpoint); "
                            "without a vlmalign model folder there is no vision tower to take it from")
    vision = json.loads(manifest.read_text())["config"].get("vision", {})
    if vision.get("backend", "hf") != "hf" or not vision.get("pretrained"):
        raise VlmalignError(f"{manifest}: the model's vision tower was not loaded from a transformers CLIP checkpoint "
                            f"(vision.pretrained: {vision.get('pretrained')!r}, backend {vision.get('backend', 'hf')!r}), "
                            "so it has no text tower: pass --text-encoder")
    return vision["pretrained"]


class ClipTextEncoder:
    """A transformers CLIP text tower with its projection: texts in, unit vectors out."""

    def __init__(self, source: str):
        from transformers import AutoTokenizer, CLIPTextModelWithProjection

        try:
            self.model = CLIPTextModelWithProjection.from_pretrained(source).eval()
            self.tokenizer = AutoTokenizer.from_pretrained(source)
        except (OSError, ValueError) as e:
            raise VlmalignError(f"text encoder {source!r}: cannot load a CLIP text tower and tokenizer ({e})") from None
        self.source = source
        self.max_length = self.model.config.max_position_embeddings

    def encode(self, texts: list[str], batch_size: int = 64):
        import torch

        chunks = []
        with torch.no_grad():
            for start in range(0, len(texts), batch_size):
                batch = self.tokenizer(texts[start : start + batch_size], padding=True, truncation=True,
                                       max_length=self.max_length, return_tensors="pt")
                chunks.append(torch.nn.functional.normalize(self.model(**batch).text_embeds.float(), dim=-1))
        return torch.cat(chunks)


# ------------------------------------------------------------------------------------------ inputs


def _video_of(f: Fields, path, video_root) -> tuple[str, str]:
    name = f.text(_VIDEO_FIELDS[0], alternatives=_VIDEO_FIELDS[1:])
    return resolve_video(name, path, video_root, VIDEO_EXTS), name


def _grouped(rows: list[tuple[str, str, list[str], str | None]], source: str) -> list[VideoItem]:
    """One item per video, its texts in file order (records of one video may repeat; each caption
    is a text-to-video query, repeated ones too)."""
    items: dict[str, VideoItem] = {}
    for video, name, texts, pred in rows:
        item = items.setdefault(video, VideoItem("", video, name, [], pred))
        if pred != item.pred:
            raise DataError(f"{source}: video {name!r} has two different descriptions ('pred') in its records")
        item.texts += texts
    out = list(items.values())
    for item, key in zip(out, unique_keys([it.video_name for it in out])):
        item.key = key
    return out


def read_retrieval(path, video_root=None, predictions: bool = False) -> list[VideoItem]:
    path = os.fspath(path)  # a str: a hub URL would lose its "//" in a Path
    rows = []
    if Path(path).suffix.lower() == ".csv":
        with open(local_data_file(path), newline="", encoding="utf-8") as fh:
            reader = csv.DictReader(fh)
            missing = {"video_id", "sentence"} - set(reader.fieldnames or [])
            if missing:
                raise DataError(f"{path}: the CSV needs columns video_id and sentence (missing {', '.join(sorted(missing))})")
            for line, row in enumerate(reader, 2):
                if not (row["video_id"] or "").strip() or not (row["sentence"] or "").strip():
                    raise DataError(f"{path}:{line}: empty video_id or sentence")
                rows.append((resolve_video(row["video_id"], path, video_root, VIDEO_EXTS), row["video_id"],
                             [row["sentence"].strip()], None))
        if predictions:
            raise DataError(f"{path}: a CSV caption file holds no predictions; give a JSON file with 'pred'")
        return _grouped(rows, path)
    for f, data in read_records(path):
        video, name = _video_of(f, path, video_root)
        if "captions" in data:
            captions = data["captions"]
            if not isinstance(captions, list) or not captions or not all(isinstance(c, str) and c.strip() for c in captions):
                raise f.error("field 'captions' must be a non-empty list of non-empty strings")
        else:
            captions = [f.text("caption", alternatives=("sentence",))]
        rows.append((video, name, captions, f.text("pred", allow_empty=True) if predictions else None))
    return _grouped(rows, path)


def read_action(path, video_root=None, predictions: bool = False) -> list[VideoItem]:
    items, ids = [], []
    for f, data in read_records(path):
        video, name = _video_of(f, path, video_root)
        items.append(VideoItem("", video, name, [f.text("label", alternatives=("class", "action"))],
                               f.text("pred", allow_empty=True) if predictions else None))
        ids.append(f.text("question_id", alternatives=("id", *_VIDEO_FIELDS)))
    for item, key in zip(items, unique_keys(ids)):
        item.key = key
    return items


def read_classes(path) -> list[str]:
    """One class per line (blank lines skipped; a leading number, as in classInd.txt, dropped)."""
    classes = []
    for line in Path(path).read_text(encoding="utf-8").splitlines():
        parts = line.split(maxsplit=1)
        if not parts:
            continue
        name = parts[1] if len(parts) == 2 and parts[0].isdigit() else line.strip()
        if name in classes:
            raise DataError(f"{path}: class {name!r} is listed twice")
        classes.append(name)
    if not classes:
        raise DataError(f"{path}: no classes")
    return classes


# -------------------------------------------------------------------------------------- evaluation


def _describe(items: list[VideoItem], model_dir, decoding, out_dir, feature_cache, progress) -> tuple[str, object]:
    prompt = load_prompt("eval.describe")
    answers, stats = generate(model_dir, [Request(it.key, it.video, prompt.render()) for it in items], decoding, out_dir,
                              feature_cache, progress)
    for it in items:
        it.pred = answers[it.key]
    return prompt.id, stats


def _prepare(items, benchmark, model_dir, predictions, decoding, out_dir, feature_cache, progress, limit):
    if predictions == (model_dir is not None):
        raise VlmalignError(f"eval {benchmark}: give either a model with --data, or --predictions")
    items = items[:limit]
    if not items:
        raise VlmalignError(f"eval {benchmark}: the data holds no videos")
    if predictions:
        return items, None, None, None
    decoding = decoding or Decoding(max_new_tokens=128)
    prompt_id, stats = _describe(items, model_dir, decoding, out_dir, feature_cache, progress)
    return items, decoding, stats, prompt_id


def _report(benchmark, task, model_dir, data, encoder, decoding, stats, prompt_id, results, table) -> dict:
    return {"benchmark": benchmark, "task": task, "model": str(model_dir) if model_dir is not None else None,
            "predictions": model_dir is None, "data": str(data), "text_encoder": encoder.source, "prompt": prompt_id,
            "generation": decoding_summary(decoding, stats), "ties": "count against the target",
            "results": results, "table": table, "created": utc_now()}


def evaluate_retrieval(out_dir, data, *, model_dir=None, predictions: bool = False, videos=None,
                       text_encoder: str | None = None, decoding: Decoding | None = None, limit: int | None = None,
                       feature_cache: str | None = None, progress: bool = True, benchmark: str = "retrieval") -> dict:
    """Video-to-text and text-to-video retrieval with the model's descriptions as the video side."""
    check_limit(limit)
    out_dir = Path(out_dir)
    items = read_retrieval(data, videos, predictions)
    items, decoding, stats, prompt_id = _prepare(items, benchmark, model_dir, predictions, decoding, out_dir,
                                                 feature_cache, progress, limit)
    encoder = ClipTextEncoder(text_encoder_source(model_dir, text_encoder))
    captions = [(i, c) for i, it in enumerate(items) for c in it.texts]
    sim = encoder.encode([it.pred for it in items]) @ encoder.encode([c for _, c in captions]).T
    own = [[j for j, (i, _) in enumerate(captions) if i == v] for v in range(len(items))]
    results = {"video_to_text": rank_metrics(target_ranks(sim, own)),
               "text_to_video": rank_metrics(target_ranks(sim.T, [[i] for i, _ in captions]))}
    lines = ["| direction | queries | R@1 | R@5 | R@10 | median rank | mean rank |", "|---|---|---|---|---|---|---|"]
    for name, r in results.items():
        lines.append(f"| {name.replace('_', ' ')} | {r['n']} | {fmt(r['R@1'], True)} | {fmt(r['R@5'], True)} | "
                     f"{fmt(r['R@10'], True)} | {r['median_rank']:g} | {r['mean_rank']:.1f} |")
    report = _report(benchmark, "retrieval", model_dir, data, encoder, decoding, stats, prompt_id, results, "\n".join(lines))
    _write(out_dir, items, report, f"{len(items)} videos, {len(captions)} captions")
    return report


def evaluate_action(out_dir, data, *, classes: list[str] | None = None, class_template: str = DEFAULT_TEMPLATE,
                    model_dir=None, predictions: bool = False, videos=None, text_encoder: str | None = None,
                    decoding: Decoding | None = None, limit: int | None = None, feature_cache: str | None = None,
                    progress: bool = True, benchmark: str = "action") -> dict:
    """Zero-shot action recognition: each description against every class name."""
    check_limit(limit)
    try:
        filled = class_template.format("x")
    except (IndexError, KeyError, ValueError):
        filled = class_template
    if filled == class_template:
        raise VlmalignError(f"--class-template {class_template!r}: write the class name's place as '{{}}', "
                            "e.g. 'a video of {}.'")
    out_dir = Path(out_dir)
    items = read_action(data, videos, predictions)
    classes = classes or sorted({it.texts[0] for it in items})
    unknown = sorted({it.texts[0] for it in items} - set(classes))
    if unknown:
        raise DataError(f"{data}: label(s) {', '.join(map(repr, unknown[:5]))} are not in the class list")
    items, decoding, stats, prompt_id = _prepare(items, benchmark, model_dir, predictions, decoding, out_dir,
                                                 feature_cache, progress, limit)
    encoder = ClipTextEncoder(text_encoder_source(model_dir, text_encoder))
    sim = encoder.encode([it.pred for it in items]) @ encoder.encode([class_template.format(c) for c in classes]).T
    ranks = target_ranks(sim, [[classes.index(it.texts[0])] for it in items])
    per_class = {}
    for it, rank in zip(items, ranks):
        per_class.setdefault(it.texts[0], []).append(rank == 1)
    results = {"all": {"n": len(items), "classes": len(classes),
                       "top1": sum(r == 1 for r in ranks) / len(ranks), "top5": sum(r <= 5 for r in ranks) / len(ranks),
                       "mean_class_top1": sum(sum(v) / len(v) for v in per_class.values()) / len(per_class)}}
    r = results["all"]
    table = ("| videos | classes | top-1 | top-5 | mean class top-1 |\n|---|---|---|---|---|\n"
             f"| {r['n']} | {r['classes']} | {fmt(r['top1'], True)} | {fmt(r['top5'], True)} | "
             f"{fmt(r['mean_class_top1'], True)} |")
    report = _report(benchmark, "action", model_dir, data, encoder, decoding, stats, prompt_id, results, table)
    report["class_template"] = class_template
    _write(out_dir, items, report, f"{len(items)} videos, {len(classes)} classes written as {class_template!r}")
    return report


def _write(out_dir: Path, items: list[VideoItem], report: dict, what: str) -> None:
    source = f"model `{report['model']}`" if report["model"] else "prediction file"
    md = [f"# {report['benchmark']}: CLIP-score {report['task']}", "",
          f"Descriptions: {source}; data `{report['data']}` ({what}).", *describe_decoding(report["generation"]),
          f"Text tower: `{report['text_encoder']}`; ties count against the target.", "", report["table"]]
    key = "captions" if report["task"] == "retrieval" else "label"
    write_outputs(out_dir, [{"id": it.key, "video_name": it.video_name,
                             key: it.texts if key == "captions" else it.texts[0], "pred": it.pred} for it in items],
                  None, report, "\n".join(md) + "\n")
