"""Instruction data from detailed captions (`vlmalign make-instructions`), LLaVA-Hound style.

An LLM (any judge backend that generates free text: openai or hf, through `Judge.complete`) reads
each video's detailed caption with the `instructions.qa_pairs` prompt and writes
`pairs_per_caption` question-answer pairs as `Q:` / `A:` lines. The LLM sees only the caption (the
prompt is text-only; the hf backend gets no video either), so the questions are grounded in what
the caption says.

Each pair becomes one LLaVA instruction record::

    {"id": "<stem>_<k>", "video": "<video_root>/<stem>.mp4",
     "conversations": [{"from": "human", "value": "<video>\\n<question>"}, {"from": "gpt", "value": "<answer>"}]}

The video is named `<video_root>/<stem>.mp4` when `video_root` is set, else `<stem>.mp4`, as
written: readers (`read_instructions`) resolve a relative name against the instruction file's
folder (RUN/) or their own `video_root`, so a relative `video_root` is relative to RUN/.

Nothing is invented: a reply that does not hold `pairs_per_caption` complete pairs is a parse
failure and contributes no records; a request that failed contributes none either and, not being
cached, is asked again on a re-run. Replies are cached, so a re-run asks only what is missing.

Artifacts in RUN/: `config.yaml`, `judge_cache.sqlite`, `instructions.json` (a JSON list),
`stats.json`.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

from vlmalign.config import InstructionsConfig, save_config
from vlmalign.data.formats import VIDEO_TOKEN
from vlmalign.errors import ConfigError
from vlmalign.feedback.context import load_captions
from vlmalign.feedback.judges import build_judge
from vlmalign.prompts import load_prompt

PROMPT = "instructions.qa_pairs"

# A labelled line: optional list marker or numbering ("-", "1.", "2)"), then Q/Question or
# A/Answer, an optional pair number ("Q1", "Question 2") and a colon. Only a colon counts as the
# separator: "A." or "A)" would also match ordinary sentences that start with the article "A".
_LABEL = re.compile(r"^(?:[-*•]\s*|\(?\d+[.)]\s*)?(q|question|a|answer)\s*\d*\s*:\s*(.*)$", re.I)
_BOLD = re.compile(r"\*\*|__")


def parse_qa_pairs(text, n: int) -> list[tuple[str, str]] | None:
    """The first `n` complete (question, answer) pairs of a reply, or None if it has fewer.

    Tolerates markdown bold, list markers and numbering ("1. **Q:** ..."), blank lines, extra
    whitespace and answers that run over several lines. A question left without an answer (the
    next label is another question, or the reply ends) is not a pair.
    """
    pairs: list[tuple[str, str]] = []
    question: list[str] | None = None
    answer: list[str] | None = None

    def close() -> None:
        if question is not None and answer is not None:
            q, a = " ".join(" ".join(question).split()), " ".join(" ".join(answer).split())
            if q and a:
                pairs.append((q, a))

    for raw_line in str(text or "").splitlines():
        line = _BOLD.sub("", raw_line).strip().lstrip("#").strip()
        if not line:
            continue
        m = _LABEL.match(line)
        if m is None:
            # A continuation of the open field; text before the first label is preamble, dropped.
            if answer is not None:
                answer.append(line)
            elif question is not None:
                question.append(line)
            continue
        if m.group(1).lower().startswith("q"):
            close()
            question, answer = [m.group(2)], None
        elif question is not None and answer is None:
            answer = [m.group(2)]
        # An answer with no open question (or a second answer to one) is ignored, not guessed at.
    close()
    return pairs[:n] if len(pairs) >= n else None


def _video_name(stem: str, video_root: str | None) -> str:
    return str(Path(video_root) / f"{stem}.mp4") if video_root else f"{stem}.mp4"


def make_instructions(cfg: InstructionsConfig, progress: bool = True) -> tuple[Path, dict]:
    """Ask the LLM for pairs per caption; write RUN/instructions.json and RUN/stats.json."""
    if cfg.judge.backend == "oracle":
        raise ConfigError("judge.backend: the oracle cannot write questions; use openai or hf")
    if not cfg.captions:
        raise ConfigError("captions: give the file of detailed captions per video")
    if cfg.pairs_per_caption < 1:
        raise ConfigError(f"pairs_per_caption: must be at least 1, got {cfg.pairs_per_caption}")
    captions = list(load_captions(cfg.captions).items())
    run_dir = Path(cfg.run.dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    save_config(cfg, run_dir / "config.yaml")
    if cfg.limit is not None:
        captions = captions[: cfg.limit]
    prompt = load_prompt(PROMPT, cfg.judge.prompts)
    cache = Path(cfg.judge.cache) if cfg.judge.cache else run_dir / "judge_cache.sqlite"
    judge = build_judge(cfg.judge, cache, progress=progress)
    texts = [(None, prompt.render(caption=" ".join(c.split()), num_pairs=cfg.pairs_per_caption)) for _, c in captions]
    judgments = judge.complete(texts, prompt_id=prompt.id)

    records: list[dict] = []
    parse_failures = failed_calls = 0
    for (stem, _), j in zip(captions, judgments):
        if j.status == "failed":
            failed_calls += 1
            continue
        pairs = parse_qa_pairs(j.value, cfg.pairs_per_caption) if j.status == "ok" else None
        if pairs is None:
            parse_failures += 1
            continue
        video = _video_name(stem, cfg.video_root)
        for k, (q, a) in enumerate(pairs):
            records.append({
                "id": f"{stem}_{k}",
                "video": video,
                "conversations": [{"from": "human", "value": f"{VIDEO_TOKEN}\n{q}"}, {"from": "gpt", "value": a}],
            })

    counts = judge.stats()
    stats = {
        "captions": len(captions),
        "pairs": len(records),
        "parse_failures": parse_failures,
        "failed_calls": failed_calls,
        "cache_hits": counts["cache_hits"],
        "calls": counts["calls"],
        "judge": judge.id,
        "prompt": prompt.id,
    }
    path = run_dir / "instructions.json"
    path.write_text(json.dumps(records, indent=1, ensure_ascii=False), encoding="utf-8")
    (run_dir / "stats.json").write_text(json.dumps(stats, indent=2), encoding="utf-8")
    return path, stats


def format_stats(stats: dict) -> str:
    return (f"captions {stats['captions']}, pairs written {stats['pairs']}, parse failures {stats['parse_failures']}, "
            f"failed calls {stats['failed_calls']}; requests sent {stats['calls']}, from cache {stats['cache_hits']}")


def run(cfg: InstructionsConfig) -> Path:
    """`vlmalign make-instructions`: config in, RUN/instructions.json and RUN/stats.json out."""
    path, stats = make_instructions(cfg, progress=cfg.run.progress)
    print(format_stats(stats), flush=True)
    print(f"instructions written to {path}", flush=True)
    return path
