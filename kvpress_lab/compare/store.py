"""The result directory of a comparison: rows (JSONL), shard files, metadata.

Rows are appended and flushed one at a time, so an interrupted run leaves only complete rows
behind. A rerun with the same directory reads every row already there (``results.jsonl`` and any
``shards/*.jsonl``) and skips their keys. A sharded run writes ``shards/results-<i>-of-<n>.jsonl``;
:func:`merge` folds shard files into ``results.jsonl`` (deduplicated by key, in a stable order).
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from kvpress_lab.errors import InputError

__all__ = [
    "CHECKED_METADATA",
    "RESULTS",
    "append_row",
    "check_metadata",
    "jsonable",
    "merge",
    "read_rows",
    "row_key",
    "shard_path",
    "write_json",
]

RESULTS = "results.jsonl"
METADATA = "metadata.json"
SHARDS = "shards"
# a directory's rows are only comparable with new ones when these agree
CHECKED_METADATA = ("model", "seed", "protocol", "max_new_tokens")


def jsonable(value: Any) -> Any:
    """Plain JSON types for a policy's parameters (tuples become lists, objects their repr)."""
    if isinstance(value, (str, int, float, bool, type(None))):
        return value
    if isinstance(value, (list, tuple)):
        return [jsonable(v) for v in value]
    if isinstance(value, dict):
        return {str(k): jsonable(v) for k, v in value.items()}
    return repr(value)


def row_key(
    spec: str, params: dict, task: str, length: int, keep: float | None, sample_id: str
) -> str:
    """The identity of a row: policy spec and resolved parameters, task, length, keep, sample."""
    return json.dumps([spec, jsonable(params), task, length, keep, sample_id], sort_keys=True)


def shard_path(out: Path, shard: tuple[int, int]) -> Path:
    i, n = shard
    return out / SHARDS / f"results-{i}-of-{n}.jsonl"


def _result_files(out: Path) -> list[Path]:
    files = [out / RESULTS] if (out / RESULTS).exists() else []
    if (out / SHARDS).is_dir():
        files += sorted((out / SHARDS).glob("*.jsonl"))
    return files


def read_rows(out: Path) -> list[dict]:
    """Every complete row in the directory (a torn last line from a crash is ignored)."""
    rows: dict[str, dict] = {}
    for path in _result_files(out):
        with path.open(encoding="utf-8") as f:
            for line in f:
                line = line.strip()
                if not line:
                    continue
                try:
                    row = json.loads(line)
                except json.JSONDecodeError:
                    continue  # a line cut short by a kill; its row runs again
                if isinstance(row, dict) and "key" in row:
                    rows.setdefault(row["key"], row)
    return list(rows.values())


def append_row(path: Path, row: dict) -> None:
    """Append one row and flush it to disk before returning."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("a", encoding="utf-8") as f:
        f.write(json.dumps(row) + "\n")
        f.flush()
        os.fsync(f.fileno())


def write_json(path: Path, data: Any) -> None:
    """Write JSON atomically (temporary file, then rename)."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(data, indent=2, sort_keys=False) + "\n", encoding="utf-8")
    os.replace(tmp, path)


def _write_rows(path: Path, rows: Iterable[dict]) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with tmp.open("w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row) + "\n")
    os.replace(tmp, path)


def sort_key(row: dict) -> tuple:
    keep = row.get("keep_ratio")
    return (
        row["task"],
        row["target_length"],
        row["sample_index"],
        row["spec"] != "full",
        row["spec"],
        -(keep if keep is not None else 2.0),
    )


def merge(out: Path) -> list[dict]:
    """Fold shard files into ``results.jsonl`` (stable order) and remove them; returns the rows."""
    rows = sorted(read_rows(out), key=sort_key)
    _write_rows(out / RESULTS, rows)
    shard_dir = out / SHARDS
    if shard_dir.is_dir():
        for path in shard_dir.glob("*.jsonl"):
            path.unlink()
        try:
            shard_dir.rmdir()
        except OSError:
            pass
    return rows


def check_metadata(out: Path, expected: dict) -> dict | None:
    """Refuse a directory whose earlier run used another model, seed or protocol."""
    path = out / METADATA
    if not path.exists():
        return None
    try:
        old = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as exc:
        raise InputError(f"{path} is not readable JSON ({exc}); use another --out") from None
    for field in CHECKED_METADATA:
        if field in old and old[field] != expected[field]:
            raise InputError(
                f"{out} holds results for {field}={old[field]!r}, but this run uses "
                f"{field}={expected[field]!r}; use another --out directory (or the same {field})"
            )
    return old
