"""Write the inspect site: a folder that opens from disk in any browser, nothing fetched.

    OUT/index.html             the page: four views (preferences, compare, training, annotate)
    OUT/app.js, OUT/app.css    the packaged app (vlmalign/inspect/static/)
    OUT/data/*.js              the data, one file per view, as `VLM.<view> = ...;` scripts
    OUT/frames/<hash>.jpg      a strip of sampled frames per video

The data are scripts rather than JSON files because a page opened from disk (file://) may not
fetch files beside it, but may load scripts. Every model output, question and reply reaches the
page only as JSON data and is put in the page as text (`textContent`), never as HTML, so an answer
containing `<script>` shows as those characters. The page keeps every item in memory and builds
only the current page of them (20 items), so thousands of items open at once.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from datetime import datetime, timezone
from pathlib import Path

import numpy as np

from vlmalign.errors import VlmalignError
from vlmalign.inspect.runs import (
    Found,
    OracleScores,
    compare_groups,
    find_runs,
    preference_items,
    rollout_items,
    summaries,
    training_curves,
)

STATIC = Path(__file__).resolve().parent / "static"
FRAMES_PER_STRIP = 6
FRAME_HEIGHT = 96


def frame_strip(video, out: Path) -> bool:
    """Write `FRAMES_PER_STRIP` evenly spaced frames of `video` (a file, frame folder or list of
    frame files) side by side as a JPEG; False when the video cannot be read."""
    from PIL import Image

    from vlmalign.video import read_video, sample_indices

    try:
        if isinstance(video, list):
            picks = [video[i] for i in sample_indices(len(video), min(FRAMES_PER_STRIP, len(video)))]
            frames = []
            for p in picks:
                with Image.open(p) as image:
                    frames.append(np.asarray(image.convert("RGB")))
        else:
            frames = list(read_video(video, FRAMES_PER_STRIP))
    except (VlmalignError, OSError):
        return False
    scaled = []
    for f in frames:
        image = Image.fromarray(f)
        scaled.append(image.resize((max(1, round(image.width * FRAME_HEIGHT / image.height)), FRAME_HEIGHT)))
    strip = Image.new("RGB", (sum(s.width for s in scaled) + 2 * (len(scaled) - 1), FRAME_HEIGHT), "white")
    x = 0
    for s in scaled:
        strip.paste(s, (x, 0))
        x += s.width + 2
    out.parent.mkdir(parents=True, exist_ok=True)
    strip.save(out, quality=85)
    return True


def _add_frames(items: list[dict], out: Path) -> None:
    """Give each item the path (relative to OUT) of its video's frame strip; strips already in OUT
    are kept, so rebuilding a site decodes only new videos."""
    done: dict[str, str | None] = {}
    for item in items:
        video = item.get("video")
        if video is None:
            item["frames"] = None
            continue
        key = json.dumps(video)
        if key not in done:
            name = f"frames/{hashlib.sha256(key.encode()).hexdigest()[:16]}.jpg"
            done[key] = name if (out / name).is_file() or frame_strip(video, out / name) else None
        item["frames"] = done[key]


def _script(path: Path, name: str, value) -> None:
    # json.dumps escapes every non-ASCII character (U+2028 included); "</" is escaped too, so the
    # data stay inert even if the file is ever pasted into an inline <script>
    text = json.dumps(value, ensure_ascii=True, separators=(",", ":")).replace("</", "<\\/")
    path.write_text(f"window.VLM = window.VLM || {{}};\nVLM.{name} = {text};\n", encoding="ascii")


def collect(run_dirs) -> tuple[Found, list[dict], list[dict]]:
    """(found, preference and rollout items, about each run) of the run folders."""
    found = find_runs(run_dirs)
    oracles = OracleScores()
    items, about = [], []
    for run in found.prefs:
        run_items, info = preference_items(run, found.label(run), oracles)
        items += run_items
        about.append(info)
    for path in found.rollouts:
        run_items, info = rollout_items(path, found.label(path.parent), oracles)
        items += run_items
        about.append(info)
    return found, items, about


def build_site(run_dirs, out) -> Path:
    """Write the site for `run_dirs` to `out`; returns the index.html path."""
    out = Path(out)
    found, items, about = collect(run_dirs)
    data = out / "data"
    data.mkdir(parents=True, exist_ok=True)
    _add_frames(items, out)
    site = {
        "root": str(found.root),
        "generated": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "runs": about,
    }
    _script(data / "site.js", "site", site)
    _script(data / "prefs.js", "prefs", items)
    _script(data / "compare.js", "compare", compare_groups(found))
    _script(data / "training.js", "training", {"curves": training_curves(found), "summaries": summaries(found)})
    for name in ("index.html", "app.js", "app.css"):
        shutil.copyfile(STATIC / name, out / name)
    return out / "index.html"
