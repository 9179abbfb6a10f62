"""The one reader of the JSON and JSONL files inspect reads: run artifacts and annotation files.

Kept apart from runs.py so that `inspect --agreement` (which reads only an annotation file) does
not import torch through runs.py's imports. Every error is one line naming the file, and for
JSONL the line.
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable

from vlmalign.data.formats import iter_json_records, read_json
from vlmalign.errors import DataError


def read_jsonl(path: Path, check: Callable[[dict], str | None] | None = None) -> list[dict]:
    """The file's rows, each a JSON object (read by the data loaders' reader); `check(row)` says
    what is wrong with a row (one line naming the field) or None, so a caller's rules report the
    row's line."""
    rows = []
    for line, row in iter_json_records(path):
        problem = check(row) if check else None
        if problem:
            raise DataError(f"{path}:{line}: {problem}")
        rows.append(row)
    return rows


def read_json_object(path: Path) -> dict:
    """A file that must hold a JSON object (stats.json, report.json): read as one, or a one-line
    error, rather than failing later on the first `.get`."""
    value = read_json(path)
    if not isinstance(value, dict):
        raise DataError(f"{path}: expected a JSON object, not {type(value).__name__}")
    return value
