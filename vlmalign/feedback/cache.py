"""On-disk cache of judgments: one SQLite row per judged prompt.

Judging is the slow and (for hosted judges) paid part of building preferences, and a judge reply
at temperature 0 is a function of its inputs, so every reply is stored under a key of everything
that can change it (`judgment_key`): the judge id, the prompt id `name@version`, the rendered
prompt text, the video identity and the sampling parameters. Bumping a prompt's version, changing
the judge model or any of those inputs misses the cache; re-running the same work reads it back.

Durability and sharing: each `put` is its own committed transaction, so a crash loses nothing
already judged. The file is opened in WAL mode with a busy timeout, so several processes can share
it (readers never block the writer, writers wait for each other), and one connection guarded by a
lock serves all threads and asyncio tasks of a process.

Rows: key, judge, prompt, kind, raw reply, parsed value (JSON), parse_ok, the model that answered
and the UTC time of the judgment. Only completed judgments are stored (parsed or not); requests
that failed are never cached, so a re-run retries them.
"""

from __future__ import annotations

import hashlib
import json
import os
import sqlite3
import threading
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from vlmalign.errors import JudgeError

__all__ = ["CachedJudgment", "JudgmentCache", "judgment_key", "video_identity", "utc_now"]

_SCHEMA_VERSION = 1
_TABLE = "judgments"
_COLUMNS = ("judge", "prompt", "kind", "raw", "value", "parse_ok", "model", "created")


def utc_now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def video_identity(video) -> str | list[str] | None:
    """The video as the cache sees it: its path string, the list of its frame paths, or None."""
    if video is None:
        return None
    if isinstance(video, (str, os.PathLike)):
        return os.fspath(video)
    return [os.fspath(p) for p in video]


def judgment_key(judge: str, prompt: str, text: str, video, params: dict) -> str:
    """sha256 over (judge id, prompt id, rendered prompt, video identity, sampling params)."""
    payload = json.dumps(
        [judge, prompt, text, video_identity(video), params],
        sort_keys=True, ensure_ascii=False, separators=(",", ":"),
    )
    return hashlib.sha256(payload.encode("utf-8")).hexdigest()


@dataclass
class CachedJudgment:
    """One stored reply. `value` is the parsed value (any JSON value), None when unparsed or when a
    comparison found a tie (parse_ok tells the two apart)."""

    judge: str
    prompt: str
    kind: str
    raw: str
    value: Any
    parse_ok: bool
    model: str
    created: str = field(default_factory=utc_now)


class JudgmentCache:
    """SQLite judgment store at `path` (created with its parent folders when missing)."""

    def __init__(self, path):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()
        self.hits = 0
        self.misses = 0
        self.writes = 0
        try:
            # isolation_level=None: autocommit, so each put is durable the moment it returns.
            self._db = sqlite3.connect(self.path, timeout=30.0, isolation_level=None, check_same_thread=False)
        except sqlite3.Error as e:
            raise JudgeError(f"judgment cache {self.path}: cannot open ({e})") from None
        self._setup()

    def _fail(self, e: Exception) -> JudgeError:
        return JudgeError(
            f"judgment cache {self.path} is not a usable SQLite database ({e}); "
            "move it away or point judge.cache at another file"
        )

    def _setup(self) -> None:
        try:
            with self._lock:
                tables = {r[0] for r in self._db.execute("SELECT name FROM sqlite_master WHERE type='table'")}
                version = self._db.execute("PRAGMA user_version").fetchone()[0]
                if tables and _TABLE not in tables:
                    raise JudgeError(
                        f"judgment cache {self.path} is an SQLite database of something else "
                        f"(tables: {', '.join(sorted(tables))}); point judge.cache at another file"
                    )
                if tables and version != _SCHEMA_VERSION:
                    raise JudgeError(
                        f"judgment cache {self.path} has schema version {version}, this vlmalign "
                        f"writes version {_SCHEMA_VERSION}; point judge.cache at another file"
                    )
                self._db.execute("PRAGMA journal_mode=WAL")
                # NORMAL is durable across application crashes in WAL mode (only an OS crash or
                # power loss can drop the last commits) and much faster than FULL per commit.
                self._db.execute("PRAGMA synchronous=NORMAL")
                self._db.execute(
                    f"CREATE TABLE IF NOT EXISTS {_TABLE} (key TEXT PRIMARY KEY, judge TEXT NOT NULL, "
                    "prompt TEXT NOT NULL, kind TEXT NOT NULL, raw TEXT NOT NULL, value TEXT, "
                    "parse_ok INTEGER NOT NULL, model TEXT NOT NULL, created TEXT NOT NULL)"
                )
                self._db.execute(f"PRAGMA user_version={_SCHEMA_VERSION}")
        except sqlite3.DatabaseError as e:
            self._db.close()
            raise self._fail(e) from None
        except JudgeError:
            self._db.close()
            raise

    def _query(self, sql: str, args: tuple = ()) -> list[tuple]:
        try:
            with self._lock:
                return self._db.execute(sql, args).fetchall()
        except sqlite3.DatabaseError as e:
            raise self._fail(e) from None

    def get(self, key: str) -> CachedJudgment | None:
        rows = self._query(f"SELECT {', '.join(_COLUMNS)} FROM {_TABLE} WHERE key = ?", (key,))
        if not rows:
            self.misses += 1
            return None
        self.hits += 1
        judge, prompt, kind, raw, value, parse_ok, model, created = rows[0]
        return CachedJudgment(judge, prompt, kind, raw, None if value is None else json.loads(value),
                              bool(parse_ok), model, created)

    def put(self, key: str, record: CachedJudgment) -> None:
        value = None if record.value is None else json.dumps(record.value, ensure_ascii=False)
        self._query(
            f"INSERT OR REPLACE INTO {_TABLE} (key, {', '.join(_COLUMNS)}) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
            (key, record.judge, record.prompt, record.kind, record.raw, value, int(record.parse_ok),
             record.model, record.created),
        )
        self.writes += 1

    def __len__(self) -> int:
        return self._query(f"SELECT COUNT(*) FROM {_TABLE}")[0][0]

    def stats(self) -> dict:
        """Rows per (judge, prompt) with their parse failures, plus this instance's hits/misses/writes."""
        rows = self._query(
            f"SELECT judge, prompt, COUNT(*), SUM(parse_ok = 0) FROM {_TABLE} GROUP BY judge, prompt ORDER BY judge, prompt"
        )
        return {
            "path": str(self.path),
            "judgments": sum(r[2] for r in rows),
            "parse_errors": sum(r[3] for r in rows),
            "by_prompt": [{"judge": j, "prompt": p, "judgments": n, "parse_errors": e} for j, p, n, e in rows],
            "hits": self.hits,
            "misses": self.misses,
            "writes": self.writes,
        }

    def close(self) -> None:
        with self._lock:
            self._db.close()

    def __enter__(self) -> "JudgmentCache":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"JudgmentCache({str(self.path)!r})"
