"""Text that stands in for the video when a judge compares, scores or ranks answers.

Three kinds, one per method:

- narrative (VLM-RLAIF): the model's sampled frames are split into `clips` contiguous clips of at
  most `max_clip_len` (20) frames; the model captions each clip; the captions are joined into one
  narrative ("Part 1 of 3: ..."). One clip means the whole video, captioned with the video prompt.
  A clip is shown to the model as its own frames stretched to the model's frame count (each frame
  repeated in order), so every model sees the visual-token count it was trained with and the
  cached features of the full video serve every clip: no video is decoded twice.
- retrospective (ISR-DPO): c_t = model(video, c_{t-1}) with the refine prompt; c_0 is a plain
  caption. The modes of the paper's ablation are in `context_for_iteration`.
- caption proxy (LLaVA-Hound): a detailed caption given with the data (`load_captions`).

Contexts are generated greedily: they are the judge's evidence, not samples to be optimised.
"""

from __future__ import annotations

import json
from pathlib import Path

from tqdm.auto import tqdm

from vlmalign.data.formats import local_data_file
from vlmalign.errors import DataError
from vlmalign.model.generation import GenerationConfig, sample_from_visual
from vlmalign.prompts import build_narrative, load_prompt

CONTEXT_MODES = ("none", "fixed", "renew", "retrospective")


def _video_key(video) -> str:
    return video if isinstance(video, str) else "|".join(video)


def narratives(
    model, visual, videos: list, clips: int = 3, max_clip_len: int = 20,
    max_new_tokens: int = 96, batch_size: int = 8, prompts_path=None, progress: bool = False,
) -> dict[str, str]:
    """VLM-RLAIF narratives: {video: narrative} for each distinct video."""
    unique = list(dict.fromkeys(_video_key(v) for v in videos))
    by_key = {_video_key(v): v for v in videos}
    prompt = load_prompt("context.caption_video" if clips == 1 else "context.caption_clip", prompts_path)
    question = prompt.render()
    gen = GenerationConfig(max_new_tokens=max_new_tokens, batch_size=batch_size)
    result: dict[str, str] = {}
    bar = tqdm(total=len(unique), desc=f"narratives ({clips} clips)", disable=not progress, unit="video")
    for start in range(0, len(unique), batch_size):
        keys = unique[start : start + batch_size]
        inputs = [piece for k in keys for piece in visual.clips(by_key[k], clips, max_clip_len)]
        captions = [group[0].text for group in sample_from_visual(model, [question] * len(inputs), inputs, gen)]
        for i, key in enumerate(keys):
            own = captions[i * clips : (i + 1) * clips]
            result[key] = own[0] if clips == 1 else build_narrative(own, prompts_path)
        bar.update(len(keys))
    bar.close()
    return result


def retrospective_contexts(
    model, visual, videos: list, previous: dict[str, str] | None = None,
    max_new_tokens: int = 96, batch_size: int = 8, prompts_path=None, progress: bool = False,
) -> dict[str, str]:
    """ISR-DPO: c_t for each distinct video from the video and c_{t-1} (`previous`); a plain
    caption where a video has no previous context."""
    previous = previous or {}
    caption = load_prompt("context.caption_video", prompts_path).render()
    refine = load_prompt("context.retrospective", prompts_path)
    unique = list(dict.fromkeys(_video_key(v) for v in videos))
    by_key = {_video_key(v): v for v in videos}
    questions = [refine.render(previous_context=previous[k]) if previous.get(k) else caption for k in unique]
    gen = GenerationConfig(max_new_tokens=max_new_tokens, batch_size=batch_size)
    result = {}
    bar = tqdm(total=len(unique), desc="contexts", disable=not progress, unit="video")
    for start in range(0, len(unique), batch_size):
        keys = unique[start : start + batch_size]
        inputs = [visual.get(by_key[k]) for k in keys]
        out = sample_from_visual(model, questions[start : start + batch_size], inputs, gen)
        result.update({k: group[0].text for k, group in zip(keys, out)})
        bar.update(len(keys))
    bar.close()
    return result


def context_for_iteration(
    mode: str, iteration: int, model, visual, videos: list,
    previous: dict[str, str] | None, first: dict[str, str] | None, **kwargs,
) -> dict[str, str]:
    """The ISR-DPO context of iteration `iteration` (1-based) under an ablation mode.

    none: no context (the self-rewarding baseline); fixed: the first iteration's caption, reused;
    renew: a fresh caption by the current model every iteration; retrospective: c_t from the video
    and c_{t-1} (the paper's method; iteration 1 has no c_0, so it captions).
    """
    if mode not in CONTEXT_MODES:
        raise DataError(f"context.mode {mode!r}: expected one of {', '.join(CONTEXT_MODES)}")
    if mode == "none":
        return {}
    if mode == "fixed" and iteration > 1 and first:
        return dict(first)
    if mode == "retrospective":
        return retrospective_contexts(model, visual, videos, previous, **kwargs)
    return retrospective_contexts(model, visual, videos, None, **kwargs)


def load_captions(path, clips: int | None = None) -> dict[str, str]:
    """Caption proxies {video stem: caption} from a JSON mapping or a JSON/JSONL list.

    Accepts `{"vid": "text"}`, `{"vid": {"caption": ...}}` (our synthetic benchmark; with `clips`,
    its per-clip captions joined into a narrative) and records with `video`/`id` and `caption`.
    """
    try:
        text = Path(local_data_file(path)).read_text(encoding="utf-8")
    except OSError as e:
        raise DataError(f"{path}: cannot read captions ({e.strerror or e})") from None
    try:
        data = json.loads(text)
    except json.JSONDecodeError:
        try:
            data = [json.loads(line) for line in text.splitlines() if line.strip()]
        except json.JSONDecodeError as e:
            raise DataError(f"{path}: neither JSON nor JSONL ({e.msg}, line {e.lineno})") from None
    captions: dict[str, str] = {}
    if isinstance(data, dict):
        for key, value in data.items():
            if isinstance(value, str):
                captions[Path(key).stem] = value
            elif isinstance(value, dict) and "caption" in value:
                if clips and clips > 1:
                    parts = value.get("clip_captions", {}).get(str(clips))
                    if parts is None:
                        raise DataError(f"{path}: {key!r} has no clip_captions for {clips} clips")
                    captions[Path(key).stem] = build_narrative(parts)
                else:
                    captions[Path(key).stem] = value["caption"]
            else:
                raise DataError(f"{path}: entry {key!r} is neither a caption string nor has a 'caption' field")
    elif isinstance(data, list):
        for i, rec in enumerate(data, 1):
            video = rec.get("video") or rec.get("video_name") or rec.get("id") if isinstance(rec, dict) else None
            if video is None or "caption" not in rec:
                raise DataError(f"{path}, record {i}: needs 'video' (or 'id') and 'caption'")
            captions[Path(str(video)).stem] = rec["caption"]
    else:
        raise DataError(f"{path}: expected a mapping or a list of captions")
    return captions


def caption_for(captions: dict[str, str], video) -> str:
    # a frame list is named after its folder, as the benchmark names a video after its file
    key = Path(video).stem if isinstance(video, str) else Path(video[0]).parent.name
    if key not in captions:
        raise DataError(f"no caption for video {key!r} in the caption file")
    return captions[key]
