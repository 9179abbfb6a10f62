"""Judges: one interface for AI feedback, several backends.

    judge = build_judge(cfg.judge, cache_path=run_dir / "judge_cache.sqlite")
    judge.compare([JudgeRequest(video, question, (answer_a, answer_b), context=narrative)])
    judge.score([JudgeRequest(video, question, (answer,), context=caption)])
    judge.rank([JudgeRequest(video, question, answers)])
    judge.complete([(video, prompt.render(...))], prompt_id=prompt.id)

Every method takes a list and returns one `Judgment` per item, in order. A judgment says what was
judged (`kind`), the parsed `value` (compare: 0 = A, 1 = B; score: 1..5; rank: per-answer ranks,
0 = best, equal ranks a tie; complete: the text), its `status` ("ok", "parse_error", "failed", "inconsistent", "tie"),
the raw reply, the judge id, the prompt id `name@version`, the model that actually answered, the time
it was judged and whether it came from the cache. Unparseable replies stay `parse_error` with value
None and are counted in `stats()`; nothing turns them into a score.

Backends
- `oracle` (`OracleJudge`): the synthetic benchmark's rule-based `Oracle`. It reads the question
  and answers directly, ignores the context, and its raw reply is the oracle's reason. Its prompt id
  is `oracle.<kind>@<hash of the rule code>`, so editing the rules invalidates cached verdicts. Two
  answers it scores the same are compared as a "tie" (value None): it has no preference between
  them, and a pair it does not prefer is no preference pair. Its rankings give such answers one
  rank (each rank counts the answers scoring higher).
- `openai` (`OpenAIJudge`): any OpenAI-compatible chat endpoint (OpenAI, vLLM, a local server),
  with the pinned `cfg.model` at `cfg.temperature`. It is a text-only judge: the video is not
  sent, the prompt's `<video>` placeholder line is dropped, and the request's `context` (a caption,
  a clip narrative, a retrospective note) is what stands in for the video (the video path still
  belongs to the cache key, as the identity of the item). The key is read from the environment
  variable `cfg.api_key_env` when the requests are made and never stored, logged or put in ids,
  errors or reprs; a server on localhost gets a placeholder key when the variable is unset. The client's own retries are off; each request is retried here up to
  `cfg.max_retries` times on 429, 408/409, 5xx, timeouts and connection errors, with exponential
  backoff (`cfg.backoff_base` doubled per retry, with jitter, at least the server's Retry-After),
  and `cfg.concurrency` requests in flight. A request that still fails comes back "failed" with
  the error and is not cached, so a re-run retries it. 401/403/404 mean a wrong key, endpoint or
  model and raise `JudgeError` at once.
- `hf` (`HFJudge`): a loaded `VideoLM` (a saved model, or the policy itself for self-judging). It
  sees the video and the rendered prompt, answering greedily (`cfg.temperature` does not apply)
  in batches of `cfg.batch_size`, with dropout off while it judges. Its judge id carries a
  fingerprint of the weights, recomputed on every call, so a policy that has trained since never
  reads verdicts of its former self from the cache. With `cfg.read_video` false it reads the
  prompt without the video (a text-only model judging from the context).
- `likelihood` (`LikelihoodJudge`): a local model (saved, or the policy) that writes nothing: it
  scores each answer by the log-probability it gives the answer after judge.likelihood (context,
  then question), and compares and ranks by that score. The gym's reader judge, a small model
  trained on true answers after captions, judges this way.
- `reward` (`RewardJudge`): a reward model trained by `train-rm` scores, compares and ranks by reward.
  Both scoring backends can call a comparison a tie (`cfg.tie_margin`): two answers whose scores
  differ by less than the margin make no preference pair.

- `random` (`RandomJudge`): the negative control of the gym; verdicts drawn at random (seeded by
  `cfg.seed` and the item), so whatever a method gains under it does not come from feedback.

Caching: each prompt put to a backend is looked up in and stored to a `JudgmentCache` under
(judge id, prompt id, rendered prompt, video, sampling params) as soon as its reply arrives;
identical prompts within one call are asked once.

Swap check (`cfg.swap_check`, compare only): each pair is judged as (A, B) and (B, A); a verdict
that follows the answer rather than the position is kept, else the judgment is "inconsistent"
with value None, and its raw reply is the pair of replies.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import dataclasses
import hashlib
import json
import logging
import os
import random
import re
import urllib.parse
from collections import Counter
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from tqdm.auto import tqdm

from vlmalign.config import JudgeConfig
from vlmalign.data.formats import IMAGE_TOKEN, VIDEO_TOKEN
from vlmalign.errors import JudgeError, VlmalignError
from vlmalign.feedback.cache import CachedJudgment, JudgmentCache, judgment_key
from vlmalign.prompts import (
    Prompt,
    context_block,
    format_numbered,
    load_prompt,
    parse_choice,
    parse_ranking,
    parse_score,
    reference_block,
)

__all__ = [
    "JudgeRequest",
    "Judgment",
    "Judge",
    "OracleJudge",
    "OpenAIJudge",
    "HFJudge",
    "build_judge",
    "STATUSES",
]

log = logging.getLogger(__name__)

STATUSES = ("ok", "parse_error", "failed", "inconsistent", "tie")
# Below this many prompts to answer a progress bar is noise.
_PROGRESS_MIN = 32
_PLACEHOLDER = re.compile(rf"(?:{re.escape(VIDEO_TOKEN)}|{re.escape(IMAGE_TOKEN)})[ \t]*\n?")
_LOCAL_HOSTS = {"localhost", "127.0.0.1", "::1", "0.0.0.0"}
_MAX_RETRY_AFTER = 60.0  # seconds; a larger Retry-After is capped rather than trusted


@dataclass
class JudgeRequest:
    """One item to judge. `answers`: (A, B) for compare, (answer,) for score, all for rank.

    `video`: a video path, a list of frame paths, or None. `context`: text about the video (a
    caption, a clip narrative, a retrospective context) shown to the judge; "" shows none.
    `reference`: the data's reference answer, read by the score prompt (LLaVA-Hound's judge).
    """

    video: Any
    question: str
    answers: tuple[str, ...]
    context: str = ""
    reference: str = ""  # score: the data's reference answer, shown to prompted judges when given

    def __post_init__(self):
        self.answers = tuple(str(a) for a in self.answers)


@dataclass
class Judgment:
    kind: str  # compare | score | rank | complete
    value: Any  # see the module doc; None unless status is "ok"
    status: str  # ok | parse_error | failed | inconsistent
    raw: str | tuple | None  # the reply; with swap_check the (A,B) and (B,A) replies
    judge: str  # judge id
    prompt: str  # prompt id name@version
    model: str | None  # the model that actually answered
    cached: bool
    error: str | None = None
    created: str | None = None  # UTC time the reply was received (ISO 8601)


@dataclass
class _Task:
    """One prompt for a backend; identical keys are judged once."""

    kind: str
    prompt: str
    text: str
    video: Any
    key: str
    n: int = 0  # number of answers, for parsing a ranking
    request: JudgeRequest | None = None  # the oracle reads question and answers directly
    parse: Callable[[str], Any] | None = None  # complete: the caller's reader; None means unreadable


@dataclass
class _Outcome:
    record: CachedJudgment | None  # None: failed
    cached: bool = False
    error: str | None = None


def _swapped(r: JudgeRequest) -> JudgeRequest:
    return JudgeRequest(r.video, r.question, (r.answers[1], r.answers[0]), r.context)


def _check(kind: str, requests, count: Callable[[int], bool], needs: str) -> list[JudgeRequest]:
    requests = list(requests)
    for i, r in enumerate(requests):
        if not isinstance(r, JudgeRequest):
            raise JudgeError(f"{kind}: item {i} is a {type(r).__name__}, not a JudgeRequest")
        if not count(len(r.answers)):
            raise JudgeError(f"{kind}: item {i} has {len(r.answers)} answers; {kind} needs {needs}")
    return requests


class Judge:
    """Base class: cache lookups, de-duplication, swap check, parsing and counting.

    Backends set `id` and implement `_task` (turn a request into a prompt for the backend) and
    `_run` (answer prompts, reporting each result through `finish` as soon as it is known).
    """

    backend = "base"

    def __init__(self, judge_id: str, cfg: JudgeConfig, cache: JudgmentCache, progress: bool = True):
        self.id = judge_id
        self.cfg = cfg
        self.cache = cache
        self.progress = progress
        self._counts: Counter = Counter()

    def __repr__(self) -> str:
        return f"{type(self).__name__}(id={self.id!r}, cache={str(self.cache.path)!r})"

    # ------------------------------------------------------------------------------- public API
    def compare(self, requests) -> list[Judgment]:
        requests = _check("compare", requests, lambda n: n == 2, "2 (A, B)")
        self._begin()
        if not self.cfg.swap_check:
            tasks = [self._task("compare", r) for r in requests]
            return [self._judgment(t, o) for t, o in zip(tasks, self._judge_tasks(tasks))]
        tasks = [t for r in requests for t in (self._task("compare", r), self._task("compare", _swapped(r)))]
        outcomes = self._judge_tasks(tasks)
        return [self._swap_judgment(tasks[i], outcomes[i], outcomes[i + 1]) for i in range(0, len(tasks), 2)]

    def score(self, requests) -> list[Judgment]:
        requests = _check("score", requests, lambda n: n == 1, "1")
        self._begin()
        tasks = [self._task("score", r) for r in requests]
        return [self._judgment(t, o) for t, o in zip(tasks, self._judge_tasks(tasks))]

    def rank(self, requests) -> list[Judgment]:
        requests = _check("rank", requests, lambda n: n >= 2, "at least 2")
        self._begin()
        tasks = [self._task("rank", r) for r in requests]
        return [self._judgment(t, o) for t, o in zip(tasks, self._judge_tasks(tasks))]

    def complete(self, prompts, prompt_id: str = "free", parse: Callable[[str], Any] | None = None) -> list[Judgment]:
        """Free generation: one text per (video or None, prompt text). `prompt_id` names the
        template the texts were rendered from, for the record (the text itself is in the key).
        With `parse`, a reply it reads as None is a parse error, asked again like a verdict
        (`cfg.reask`); the judgment's value stays the reply's text."""
        prompts = list(prompts)
        self._begin()
        tasks = [dataclasses.replace(self._complete_task(video, str(text), prompt_id), parse=parse) for video, text in prompts]
        return [self._judgment(t, o) for t, o in zip(tasks, self._judge_tasks(tasks))]

    def stats(self) -> dict:
        """Counters since this judge was built. Per prompt (a swap-checked pair is two):
        prompts asked, cache_hits, calls (prompts sent to the backend after de-duplication),
        retries, reasked (unreadable replies asked again with a format reminder), reask_fixed (of
        those, read on a later try), parse_errors and failures (left after the re-asks); per
        judgment: judgments, inconsistent."""
        keys = ("judgments", "prompts", "cache_hits", "calls", "retries", "reasked", "reask_fixed", "parse_errors",
                "failures", "inconsistent")
        return {k: self._counts[k] for k in keys}

    # ----------------------------------------------------------------------------- backend hooks
    def _begin(self) -> None:
        """Called before each public call (the hf judge refreshes its weights fingerprint)."""

    def _task(self, kind: str, request: JudgeRequest) -> _Task:
        raise NotImplementedError

    def _complete_task(self, video, text: str, prompt_id: str) -> _Task:
        raise JudgeError(f"the {self.backend} judge cannot generate free text (complete)")

    def _run(self, tasks: list[_Task], finish: Callable) -> None:
        raise NotImplementedError

    def _reask_task(self, task: _Task, reply: str) -> _Task | None:
        """The prompt that asks `task` again after the unreadable `reply`; None: this backend's
        replies are never unreadable (oracle, random)."""
        return None

    # ---------------------------------------------------------------------------------- plumbing
    def _judge_tasks(self, tasks: list[_Task]) -> list[_Outcome]:
        """Outcomes of `tasks`; an unreadable reply is asked again, up to `cfg.reask` times, each
        time with the prompt, the reply and a reminder of the format. Every reply is cached under
        its own prompt, so a re-run reads the same sequence from the cache."""
        result = self._cached_or_run(tasks)
        latest = {t.key: (t, o) for t, o in zip(tasks, result)}  # per distinct prompt: the task asked last
        for _ in range(self.cfg.reask):
            unread = {key: self._reask_task(t, o.record.raw) for key, (t, o) in latest.items()
                      if o.record is not None and not o.record.parse_ok}
            unread = {key: t for key, t in unread.items() if t is not None}
            if not unread:
                break
            self._counts["reasked"] += len(unread)
            for (key, again), out in zip(unread.items(), self._cached_or_run(list(unread.values()))):
                if out.record is not None:  # a failed call keeps the unreadable reply
                    self._counts["reask_fixed"] += out.record.parse_ok
                    latest[key] = (again, out)
        result = [latest[t.key][1] for t in tasks]
        self._counts["prompts"] += len(tasks)
        self._counts["failures"] += sum(o.record is None for o in result)
        self._counts["parse_errors"] += sum(o.record is not None and not o.record.parse_ok for o in result)
        return result

    def _cached_or_run(self, tasks: list[_Task]) -> list[_Outcome]:
        outcomes: dict[str, _Outcome] = {}
        todo: dict[str, _Task] = {}
        for t in tasks:
            if t.key in outcomes or t.key in todo:
                continue
            record = self.cache.get(t.key)
            if record is not None:
                outcomes[t.key] = _Outcome(record, cached=True)
                self._counts["cache_hits"] += 1
            else:
                todo[t.key] = t
        if todo:
            self._counts["calls"] += len(todo)
            kind = next(iter(todo.values())).kind
            bar = tqdm(total=len(todo), desc=f"judge {kind} ({self.backend})", unit="prompt",
                       disable=not self.progress or len(todo) < _PROGRESS_MIN)

            def finish(task: _Task, record: CachedJudgment | None = None, error: str | None = None) -> None:
                if record is not None:
                    self.cache.put(task.key, record)
                outcomes[task.key] = _Outcome(record, error=error)
                bar.update(1)

            try:
                self._run(list(todo.values()), finish)
            finally:
                bar.close()
            failed = sum(1 for k in todo if outcomes[k].record is None)
            if failed:
                log.warning("judge %s: %d of %d prompts failed (not cached; a re-run retries them)",
                            self.id, failed, len(todo))
        return [outcomes[t.key] for t in tasks]

    def _record(self, task: _Task, raw: str, model: str) -> CachedJudgment:
        """Parse a text reply into the record that is cached."""
        if task.kind == "compare":
            value = parse_choice(raw)
        elif task.kind == "score":
            value = parse_score(raw)
        elif task.kind == "rank":
            value = parse_ranking(raw, task.n)
        else:
            value = raw.strip() or None
            if value is not None and task.parse is not None and task.parse(raw) is None:
                return CachedJudgment(self.id, task.prompt, task.kind, raw, None, False, model)
        return CachedJudgment(self.id, task.prompt, task.kind, raw, value, value is not None, model)

    def _judgment(self, task: _Task, out: _Outcome) -> Judgment:
        self._counts["judgments"] += 1
        rec = out.record
        if rec is None:
            return Judgment(task.kind, None, "failed", None, self.id, task.prompt, None, False, out.error)
        if rec.parse_ok and rec.kind == "compare" and rec.value is None:
            return Judgment(task.kind, None, "tie", rec.raw, self.id, task.prompt, rec.model, out.cached, None, rec.created)
        status = "ok" if rec.parse_ok else "parse_error"
        return Judgment(task.kind, rec.value if rec.parse_ok else None, status, rec.raw, self.id, task.prompt,
                        rec.model, out.cached, None, rec.created)

    def _swap_judgment(self, task: _Task, ab: _Outcome, ba: _Outcome) -> Judgment:
        self._counts["judgments"] += 1
        records = [o.record for o in (ab, ba)]
        raw = tuple(r.raw if r else None for r in records)
        models = ",".join(dict.fromkeys(r.model for r in records if r)) or None
        created = max((r.created for r in records if r), default=None)
        cached = ab.cached and ba.cached
        errors = [f"{order}: {o.error}" for order, o in (("(A,B)", ab), ("(B,A)", ba)) if o.record is None]
        if errors:
            return Judgment("compare", None, "failed", raw, self.id, task.prompt, models, cached, "; ".join(errors), created)
        if not all(r.parse_ok for r in records):
            return Judgment("compare", None, "parse_error", raw, self.id, task.prompt, models, cached, None, created)
        if records[0].value is None and records[1].value is None:  # a tie both ways round
            return Judgment("compare", None, "tie", raw, self.id, task.prompt, models, cached, None, created)
        if records[0].value is None or records[1].value is None:
            self._counts["inconsistent"] += 1
            return Judgment("compare", None, "inconsistent", raw, self.id, task.prompt, models, cached, None, created)
        first, second = records[0].value, 1 - records[1].value  # the (B,A) verdict in (A,B) terms
        if first != second:
            self._counts["inconsistent"] += 1
            return Judgment("compare", None, "inconsistent", raw, self.id, task.prompt, models, cached, None, created)
        return Judgment("compare", first, "ok", raw, self.id, task.prompt, models, cached, None, created)


# ------------------------------------------------------------------------------------- oracle


def _rules_version() -> str:
    """Hash of the oracle's rule code: cached verdicts die with any edit of the rules."""
    from vlmalign.data import synthetic
    from vlmalign.feedback import oracle

    h = hashlib.sha256()
    for module in (oracle, synthetic):
        h.update(Path(module.__file__).read_bytes())
    return h.hexdigest()[:10]


def _video_name(video) -> str | list[str] | None:
    """A video path (or frame paths) without its folders."""
    if video is None:
        return None
    if isinstance(video, (str, os.PathLike)):
        return Path(video).name
    return [Path(v).name for v in video]


def _rule_task(judge_id: str, prompt: str, kind: str, request: JudgeRequest) -> _Task:
    """A task for a judge that reads question and answers directly (no prompt, no context)."""
    text = json.dumps({"question": request.question, "answers": list(request.answers)}, ensure_ascii=False)
    key = judgment_key(judge_id, prompt, text, request.video, {})
    return _Task(kind, prompt, text, request.video, key, len(request.answers), request)


class OracleJudge(Judge):
    backend = "oracle"

    def __init__(self, bench, cfg: JudgeConfig, cache: JudgmentCache, progress: bool = True):
        from vlmalign.feedback.oracle import Oracle

        self.oracle = Oracle.from_dir(bench)
        metadata = (Path(bench) / "metadata.jsonl").read_bytes()
        # The id names the ground truth itself, so a regenerated benchmark is a different judge.
        judge_id = f"oracle:{Path(bench).resolve().name}@{hashlib.sha256(metadata).hexdigest()[:10]}"
        super().__init__(judge_id, cfg, cache, progress)
        self._rules = _rules_version()

    def _task(self, kind: str, request: JudgeRequest) -> _Task:
        return _rule_task(self.id, f"oracle.{kind}@{self._rules}", kind, request)

    def _run(self, tasks: list[_Task], finish: Callable) -> None:
        for t in tasks:
            r = t.request
            if r.video is None:
                finish(t, error="the oracle judge needs the video: its id names the ground truth")
                continue
            try:
                verdicts = [self.oracle.verdict(r.video, r.question, a) for a in r.answers]
                if t.kind == "score":
                    value = verdicts[0].score
                elif t.kind == "compare":
                    value = self.oracle.compare(r.video, r.question, *r.answers)
                else:
                    value = self.oracle.rank(r.video, r.question, list(r.answers))
            except VlmalignError as e:
                finish(t, error=str(e))
                continue
            if t.kind == "score":
                raw = verdicts[0].reason
            else:
                names = "AB" if t.kind == "compare" else [str(i) for i in range(1, len(verdicts) + 1)]
                raw = "; ".join(f"{name}: score {v.score} ({v.reason})" for name, v in zip(names, verdicts))
            finish(t, CachedJudgment(self.id, t.prompt, t.kind, raw, value, True, "oracle"))


# ----------------------------------------------------------------------------- random (control)


class RandomJudge(Judge):
    """The negative control: feedback unrelated to the answers' truth. Scores are uniform on 1-5,
    rankings a uniform permutation, comparisons a fair coin, each drawn from a hash of the judged
    item (video, question, answers) and `cfg.seed`, so a re-run gets the same verdicts; the same
    answer to the same question always gets the same verdict, an arbitrary but consistent reward.
    A method that gains under this judge gains from something other than grounded feedback."""

    backend = "random"

    def __init__(self, cfg: JudgeConfig, cache: JudgmentCache, progress: bool = True):
        super().__init__(f"random:seed{cfg.seed}", cfg, cache, progress)

    def _task(self, kind: str, request: JudgeRequest) -> _Task:
        # keyed by the video's file name, not its path: the same verdicts wherever the data lies
        named = JudgeRequest(_video_name(request.video), request.question, request.answers)
        return dataclasses.replace(_rule_task(self.id, f"random.{kind}@1", kind, named), video=request.video, request=request)

    def _run(self, tasks: list[_Task], finish: Callable) -> None:
        for t in tasks:
            rng = random.Random(f"{self.cfg.seed}:{t.key}")
            if t.kind == "score":
                value = rng.randint(1, 5)
            elif t.kind == "compare":
                value = rng.randint(0, 1)
            else:
                value = list(range(t.n))
                rng.shuffle(value)
            finish(t, CachedJudgment(self.id, t.prompt, t.kind, f"random {t.kind}: {value}", value, True, "random"))


# ------------------------------------------------------------------------------ prompted judges


class _PromptedJudge(Judge):
    """Renders the packaged (or `cfg.prompts`) judge prompts and parses text replies."""

    def __init__(self, judge_id: str, cfg: JudgeConfig, cache: JudgmentCache, progress: bool = True):
        super().__init__(judge_id, cfg, cache, progress)
        self.prompts: dict[str, Prompt] = {k: load_prompt(f"judge.{k}", cfg.prompts) for k in ("compare", "score", "rank")}
        if cfg.explain:
            self.prompts["score"] = load_prompt("judge.score_explained", cfg.prompts)

    def _params(self) -> dict:
        raise NotImplementedError

    def _text(self, text: str, video) -> str:
        """The prompt as the backend receives it (a video-less prompt loses its placeholder)."""
        return _PLACEHOLDER.sub("", text) if video is None else text

    def _render(self, kind: str, request: JudgeRequest) -> str:
        prompt = self.prompts[kind]
        # Questions taken from instruction data often carry their own placeholder; the template
        # already has the one the video goes into.
        question = _PLACEHOLDER.sub("", request.question)
        answers = [_PLACEHOLDER.sub("", a) for a in request.answers]
        values: dict[str, Any] = {"question": question, "context_block": context_block(request.context, self.cfg.prompts)}
        if kind == "compare":
            values.update(answer_a=answers[0], answer_b=answers[1])
        elif kind == "score":
            values.update(answer=answers[0], reference_block=reference_block(request.reference, self.cfg.prompts))
        else:
            values.update(answers=format_numbered(answers), num_answers=len(answers))
        for slot, what in (("context_block", "context"), ("reference_block", "reference answers")):
            if values.get(slot) and slot not in prompt.fields:
                raise JudgeError(f"prompt {prompt.id} has no {{{slot}}} slot, but the requests carry {what}")
        # A user prompt may leave out slots it does not need (e.g. the context).
        return prompt.render(**{k: v for k, v in values.items() if k in prompt.fields})

    def _task(self, kind: str, request: JudgeRequest) -> _Task:
        prompt = self.prompts[kind]
        video = request.video if self.cfg.read_video else None
        text = self._text(self._render(kind, request), video)
        key = judgment_key(self.id, prompt.id, text, video, self._params())
        return _Task(kind, prompt.id, text, video, key, len(request.answers))

    def _complete_task(self, video, text: str, prompt_id: str) -> _Task:
        text = self._text(text, video)
        return _Task("complete", prompt_id, text, video, judgment_key(self.id, prompt_id, text, video, self._params()))

    def _reask_task(self, task: _Task, reply: str) -> _Task:
        reask = load_prompt("judge.reask", self.cfg.prompts)
        text = reask.render(prompt=task.text, reply=reply.strip())
        # The record keeps the original prompt's id: the re-ask is the same judgment, asked again.
        return dataclasses.replace(task, text=text, key=judgment_key(self.id, reask.id, text, task.video, self._params()))


# ------------------------------------------------------------------------------------- openai


def _endpoint(base_url: str | None) -> str:
    """The base URL without user info, query or fragment (safe to print and record)."""
    if not base_url:
        return "the OpenAI API"
    parts = urllib.parse.urlsplit(base_url)
    host = parts.hostname or ""
    if ":" in host:
        host = f"[{host}]"
    port = f":{parts.port}" if parts.port else ""
    return f"{parts.scheme}://{host}{port}{parts.path}"


def _is_local(base_url: str | None) -> bool:
    if not base_url:
        return False
    host = (urllib.parse.urlsplit(base_url).hostname or "").lower()
    return host in _LOCAL_HOSTS or host.endswith(".localhost")


def _run_coroutine(make: Callable) -> Any:
    """Run `make()` to completion from sync code, also when called inside a running event loop
    (a notebook), where asyncio.run is refused: then it runs on a worker thread's own loop."""
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return asyncio.run(make())
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        return pool.submit(lambda: asyncio.run(make())).result()


class _Retryable(Exception):
    """A failure that may pass on its own (rate limit, server error, timeout, lost connection)."""

    def __init__(self, message: str, retry_after: float | None = None):
        super().__init__(message)
        self.retry_after = retry_after


class _Failed(Exception):
    """A request that retrying cannot fix (a 400 for this prompt, a malformed response)."""


class OpenAIJudge(_PromptedJudge):
    backend = "openai"

    def __init__(self, cfg: JudgeConfig, cache: JudgmentCache, progress: bool = True):
        if not cfg.model:
            raise JudgeError("the openai judge needs judge.model: the pinned model id (e.g. gpt-4o-2024-08-06)")
        if not os.environ.get(cfg.api_key_env) and not _is_local(cfg.base_url):
            raise JudgeError(
                f"the openai judge at {_endpoint(cfg.base_url)} needs an API key in the environment "
                f"variable {cfg.api_key_env} (judge.api_key_env); it is never read from config files"
            )
        super().__init__(f"openai:{cfg.model}", cfg, cache, progress)
        self.endpoint = _endpoint(cfg.base_url)

    def __repr__(self) -> str:
        return f"OpenAIJudge(id={self.id!r}, endpoint={self.endpoint!r}, cache={str(self.cache.path)!r})"

    def _params(self) -> dict:
        return {"temperature": self.cfg.temperature, "max_completion_tokens": self.cfg.max_new_tokens}

    def _text(self, text: str, video) -> str:
        return _PLACEHOLDER.sub("", text)  # text-only: the video is never sent

    def _api_key(self) -> str:
        # Read at use and held only by the client of one batch, so no judge attribute carries it.
        return os.environ.get(self.cfg.api_key_env) or "EMPTY"

    def _redact(self, text: str) -> str:
        key = os.environ.get(self.cfg.api_key_env)
        return text.replace(key, "***") if key else text

    def _run(self, tasks: list[_Task], finish: Callable) -> None:
        _run_coroutine(lambda: self._run_all(tasks, finish))

    async def _run_all(self, tasks: list[_Task], finish: Callable) -> None:
        import openai

        kwargs = {"base_url": self.cfg.base_url} if self.cfg.base_url else {}
        semaphore = asyncio.Semaphore(max(1, self.cfg.concurrency))
        async with openai.AsyncOpenAI(api_key=self._api_key(), max_retries=0, timeout=self.cfg.timeout, **kwargs) as client:
            running = [asyncio.ensure_future(self._ask(client, semaphore, t, finish)) for t in tasks]
            try:
                await asyncio.gather(*running)
            except BaseException:
                # A fatal error (bad key or model) stops the batch; replies already in are cached.
                for f in running:
                    f.cancel()
                await asyncio.gather(*running, return_exceptions=True)
                raise

    async def _ask(self, client, semaphore: asyncio.Semaphore, task: _Task, finish: Callable) -> None:
        rng = random.Random()
        attempts = self.cfg.max_retries + 1
        for attempt in range(attempts):
            try:
                async with semaphore:
                    response = await self._request(client, task)
            except _Retryable as e:
                if attempt + 1 == attempts:
                    finish(task, error=f"{e} (gave up after {attempts} attempts)")
                    return
                delay = self.cfg.backoff_base * 2**attempt * rng.uniform(0.5, 1.5)
                if e.retry_after is not None:
                    delay = max(delay, min(e.retry_after, _MAX_RETRY_AFTER))
                self._counts["retries"] += 1
                log.info("judge %s: %s; retry %d/%d in %.2fs", self.id, e, attempt + 1, self.cfg.max_retries, delay)
                await asyncio.sleep(delay)
                continue
            except _Failed as e:
                finish(task, error=str(e))
                return
            choice = response.choices[0] if response.choices else None
            reply = (choice.message.content if choice is not None else None) or ""
            finish(task, self._record(task, reply, response.model or self.cfg.model))
            return

    async def _request(self, client, task: _Task):
        """One HTTP request. Raises _Retryable, _Failed, or JudgeError for a misconfiguration."""
        import openai

        try:
            # httpx timeouts bound each phase (connect, each read), not the whole request.
            return await asyncio.wait_for(
                client.chat.completions.create(
                    model=self.cfg.model,
                    messages=[{"role": "user", "content": task.text}],
                    temperature=self.cfg.temperature,
                    max_completion_tokens=self.cfg.max_new_tokens,
                ),
                self.cfg.timeout,
            )
        except (asyncio.TimeoutError, openai.APITimeoutError):
            raise _Retryable(f"timed out after {self.cfg.timeout:g}s") from None
        except openai.APIConnectionError as e:
            raise _Retryable(f"connection error: {self._redact(str(e))}") from None
        except openai.APIStatusError as e:
            status, message = e.status_code, self._redact(str(e))
            if status in (401, 403, 404):
                raise JudgeError(
                    f"openai judge {self.id} at {self.endpoint}: HTTP {status}: {message} "
                    f"(check judge.model, judge.base_url and the key in ${self.cfg.api_key_env})"
                ) from None
            if status in (408, 409, 429) or status >= 500:
                raise _Retryable(f"HTTP {status}: {message}", _retry_after(e.response)) from None
            raise _Failed(f"HTTP {status}: {message}") from None
        except openai.APIError as e:
            raise _Failed(f"{type(e).__name__}: {self._redact(str(e))}") from None


def _retry_after(response) -> float | None:
    try:
        return float(response.headers.get("retry-after"))
    except (AttributeError, TypeError, ValueError):
        return None


# ----------------------------------------------------------------------------------------- hf


def _weights_fingerprint(model) -> str:
    """Cheap identity of the current weights: names, shapes and up to 1024 evenly spaced values
    of every parameter. Any optimizer step changes sampled values of the parameters it trains."""
    import torch

    h = hashlib.sha256()
    with torch.no_grad():
        for name, p in model.named_parameters():
            flat = p.detach().reshape(-1)
            sample = flat[:: max(1, flat.numel() // 1024)][:1024].float().cpu()
            h.update(f"{name}:{tuple(p.shape)}".encode())
            h.update(sample.numpy().tobytes())
    return h.hexdigest()[:12]


class _LocalModelJudge(Judge):
    """A judge that runs a loaded model: a saved one, or the policy itself (self-judging). Its id
    carries a fingerprint of the weights, recomputed before every call, so a policy that has trained
    since never reads the verdicts of its former self from the cache; it judges in eval mode (no
    dropout: the same item always gets the same verdict)."""

    def __init__(self, model, visual, cfg: JudgeConfig, cache: JudgmentCache, name: str | None = None, progress: bool = True):
        self.model, self.visual = model, visual
        self.name = name or cfg.model or "policy"
        super().__init__(self._make_id(), cfg, cache, progress)

    def _make_id(self) -> str:
        return f"{self.backend}:{self.name}#{_weights_fingerprint(self.model)}"

    def _begin(self) -> None:
        self.id = self._make_id()

    @contextmanager
    def _evaluating(self):
        was_training = self.model.training
        self.model.eval()
        try:
            yield
        finally:
            self.model.train(was_training)


class HFJudge(_LocalModelJudge, _PromptedJudge):
    backend = "hf"

    def _params(self) -> dict:
        return {"do_sample": False, "max_new_tokens": self.cfg.max_new_tokens}

    def _run(self, tasks: list[_Task], finish: Callable) -> None:
        from vlmalign.model import generation

        size = max(1, self.cfg.batch_size)
        gen = generation.GenerationConfig(max_new_tokens=self.cfg.max_new_tokens, do_sample=False, batch_size=size)
        with self._evaluating():
            for start in range(0, len(tasks), size):
                chunk = tasks[start : start + size]
                replies = generation.generate_answers(self.model, self.visual, [(t.video, t.text) for t in chunk], gen)
                for t, (reply,) in zip(chunk, replies):
                    finish(t, self._record(t, reply, self.name))


# ------------------------------------------------------------------------------------- reward


def _scoring_params(cfg: JudgeConfig, kind: str) -> dict:
    """What a scoring backend's cached verdicts depend on besides the prompt (the tie margin only
    where one is set, so that verdicts cached without one stay valid). A ranking is marked apart:
    the likelihood judge's prompt is the same for every kind, so a comparison of two answers would
    otherwise answer a ranking of the same two; and rankings cached before 2026-12-05 held the
    answers in order of score, not each answer's rank, and must not be read back."""
    return {"max_length": cfg.max_length, **({"tie_margin": cfg.tie_margin} if cfg.tie_margin else {}),
            **({"rank": "ranks per answer"} if kind == "rank" else {})}


def _scored_judgment(judge_id: str, task: _Task, scores: list[float], what: str, model: str,
                     tie_margin: float = 0.0) -> CachedJudgment:
    """The judgment of a backend that gives each answer a number (reward, log-probability): score:
    the number; compare: the higher one (A on equal numbers), or a tie (value None) when they differ
    by less than `tie_margin`; rank: each answer's rank, 0 = best, the number of answers with a
    higher number (equal numbers share a rank, as in `Oracle.rank`; the margin, which is not
    transitive, does not apply). The raw record lists the numbers."""
    if task.kind == "score":
        value = scores[0]
    elif task.kind == "compare":
        value = None if abs(scores[0] - scores[1]) < tie_margin else 0 if scores[0] >= scores[1] else 1
    else:
        value = [sum(other > mine for other in scores) for mine in scores]
    raw = f"{what}: " + ", ".join(f"{x:.6g}" for x in scores)
    return CachedJudgment(judge_id, task.prompt, task.kind, raw, value, True, model)


class RewardJudge(_LocalModelJudge):
    """A trained vlmalign reward model (`train-rm`) as the judge: Oracle-RLAIF's oracle. It sees the
    video and reads question and answer; it ignores any text context. score: the answer's reward (a
    real number, not 1-5); compare: the answer with the higher reward (A on equal rewards; a tie
    under `cfg.tie_margin`); rank: each answer's rank by reward, 0 = best (equal rewards share one).
    The raw record lists the rewards."""

    backend = "reward"

    def _task(self, kind: str, request: JudgeRequest) -> _Task:
        text = json.dumps([request.question, list(request.answers)], ensure_ascii=False)
        key = judgment_key(self.id, f"reward.{kind}", text, request.video, _scoring_params(self.cfg, kind))
        return _Task(kind, f"reward.{kind}", text, request.video, key, len(request.answers), request)

    def _run(self, tasks: list[_Task], finish: Callable) -> None:
        from vlmalign.data.collate import Collator
        from vlmalign.model.reward import score_samples

        collate = Collator(self.model.backbone, self.visual)
        size = max(1, self.cfg.batch_size)
        for start in range(0, len(tasks), size):
            chunk = tasks[start : start + size]
            samples = [self.model.encode(t.request.question, a, t.request.video, self.cfg.max_length, f"judge {i}")
                       for i, t in enumerate(chunk) for a in t.request.answers]
            rewards = score_samples(self.model, collate, samples, size).tolist()
            for t in chunk:
                own, rewards = rewards[: t.n], rewards[t.n :]
                finish(t, _scored_judgment(self.id, t, own, "rewards", self.name, self.cfg.tie_margin))


# --------------------------------------------------------------------------------- likelihood


def likelihood_prompt(question: str, context: str, prompts=None, video=None) -> tuple[str, str]:
    """(prompt id, text) of judge.likelihood for one question: what the likelihood judge puts
    before each answer, and what a judge trained for it (`gym.reader_records`) learns to answer."""
    prompt = load_prompt("judge.likelihood", prompts)
    text = prompt.render(context_block=context_block(context, prompts), question=_PLACEHOLDER.sub("", question))
    return prompt.id, (_PLACEHOLDER.sub("", text) if video is None else text)


class LikelihoodJudge(_LocalModelJudge):
    """A local model judges by reading: each answer's score is the log-probability the model gives
    it as its reply to judge.likelihood (the context, then the question), summed over the answer's
    tokens. compare: the likelier answer (A on equal log-probabilities; a tie when they differ by less
    than `cfg.tie_margin` nats); rank: each answer's rank by log-probability, 0 = best (equal ones
    share a rank); score: the log-probability itself (a real number, not 1-5). Nothing is
    generated, so no reply can be unreadable; the raw record lists the log-probabilities.

    A model trained on true answers after a caption or a narrative (`vlmalign gym`'s reader judge)
    prefers the answer the context supports; without context it has only what it learnt of the
    answers in general. With `cfg.read_video` false the video is not shown (a text-only judge)."""

    backend = "likelihood"

    def _task(self, kind: str, request: JudgeRequest) -> _Task:
        video = request.video if self.cfg.read_video else None
        prompt_id, text = likelihood_prompt(request.question, request.context, self.cfg.prompts, video)
        answers = [_PLACEHOLDER.sub("", a) for a in request.answers]
        key = judgment_key(self.id, prompt_id, json.dumps([text, answers], ensure_ascii=False), video,
                           _scoring_params(self.cfg, kind))
        return _Task(kind, prompt_id, text, video, key, len(answers), dataclasses.replace(request, answers=tuple(answers)))

    def _run(self, tasks: list[_Task], finish: Callable) -> None:
        import torch

        from vlmalign.data.collate import Collator, EncodedSample
        from vlmalign.data.formats import Turn
        from vlmalign.losses import sequence_logps
        from vlmalign.model.policy import labelled_logits

        collate = Collator(self.model, self.visual)
        size = max(1, self.cfg.batch_size)
        with self._evaluating():
            for start in range(0, len(tasks), size):
                chunk = tasks[start : start + size]
                rows = []
                for i, t in enumerate(chunk):
                    layout = self.model.video_layout(t.video)
                    for a in t.request.answers:
                        enc = self.model.encode_conversation([Turn("user", t.text), Turn("assistant", a)], self.cfg.max_length,
                                                             sample_id=f"likelihood judge {i}", layout=layout)
                        rows.append(EncodedSample(str(i), enc.input_ids, enc.labels, t.video))
                batch = collate(rows)
                with torch.no_grad():
                    logps = sequence_logps(*labelled_logits(self.model, batch, self.model.device)).tolist()
                for t in chunk:
                    own, logps = logps[: t.n], logps[t.n :]
                    finish(t, _scored_judgment(self.id, t, own, "log-probs", self.name, self.cfg.tie_margin))


# -------------------------------------------------------------------------------------- build


def build_judge(cfg: JudgeConfig, cache_path=None, model=None, visual=None, progress: bool = True) -> Judge:
    """The judge `cfg` describes, caching to `cfg.cache` or else `cache_path` (the caller's
    run-dir default). hf: cfg.model names a saved model to load, or is "policy" (or empty): then the
    judge is `model`, the loaded policy, with `visual` (its VisualInputs; default: no feature cache)."""
    if cfg.tie_margin < 0 or (cfg.tie_margin and cfg.backend not in ("likelihood", "reward")):
        raise JudgeError(f"judge.tie_margin: {cfg.tie_margin} (a margin of 0 or more, for the likelihood and reward "
                         f"backends, which score answers; {cfg.backend} does not)")
    path = cfg.cache or cache_path
    if path is None:
        raise JudgeError("no judgment cache file: set judge.cache (or pass the run's cache path)")
    cache = JudgmentCache(path)
    if cfg.backend == "oracle":
        if not cfg.bench:
            raise JudgeError("the oracle judge needs judge.bench: the synthetic benchmark folder")
        return OracleJudge(cfg.bench, cfg, cache, progress)
    if cfg.backend == "openai":
        return OpenAIJudge(cfg, cache, progress)
    if cfg.backend in ("hf", "likelihood"):
        if cfg.model and cfg.model != "policy":  # a saved judge of its own, even where a policy is at hand
            from vlmalign.model.policy import load_model

            model, visual = load_model(cfg.model), None
        elif model is None:
            raise JudgeError(f"the {cfg.backend} judge needs judge.model (a saved model path), or the policy model passed in")
        if visual is None:
            visual = model.visual_inputs(None)
        judge_class = HFJudge if cfg.backend == "hf" else LikelihoodJudge
        return judge_class(model, visual, cfg, cache, progress=progress)
    if cfg.backend == "random":
        return RandomJudge(cfg, cache, progress)
    if cfg.backend == "reward":
        from vlmalign.model.reward import load_reward_model

        if not cfg.model:
            raise JudgeError("the reward judge needs judge.model: a reward model folder written by `vlmalign train-rm`")
        reward_model = load_reward_model(cfg.model).to(model.device if model is not None else "cpu")
        cache_dir = visual.cache_dir.parent if visual is not None and visual.cache_dir is not None else None
        return RewardJudge(reward_model, reward_model.backbone.visual_inputs(cache_dir), cfg, cache, progress=progress)
    raise JudgeError(f"unknown judge backend {cfg.backend!r} (oracle, hf, likelihood, openai, random, reward)")
