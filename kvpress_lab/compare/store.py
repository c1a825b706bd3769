"""The result directory of a comparison: rows (JSONL), shard files, metadata.

Rows are appended one at a time, each with a single ``write`` that is flushed and synced before
the next row is computed, so a finished row is never lost. A kill can still leave the last line
torn (a row cut short); :func:`append_row` cuts such a fragment off before appending, so the next
row starts on its own line instead of being glued to the fragment (and dropped with it). A rerun
with the same directory reads every complete row already there (``results.jsonl`` and any
``shards/*.jsonl``) and skips their keys. A sharded run writes
``shards/results-<i>-of-<n>.jsonl``; :func:`merge` folds shard files into ``results.jsonl``
(deduplicated by key, in a stable order).

A cell whose plugin failed is stored as a *failed row* (``"failed": true`` and the error); it is
run again by the next resume, and a successful row for the same key replaces it.
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
    "SWEEP_FLAGS",
    "append_row",
    "check_metadata",
    "check_sweep",
    "extend_sweep",
    "jsonable",
    "merge",
    "read_rows",
    "repair_tail",
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
    """Every complete row in the directory (a torn last line from a crash is ignored).

    Per key the first successful row wins; a failed row is kept only while no successful row for
    its key exists (the latest failure, so a rerun that failed again shows its own error).
    """
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
                if not isinstance(row, dict) or "key" not in row:
                    continue
                old = rows.get(row["key"])
                if old is None or old.get("failed"):  # anything replaces a failure
                    rows[row["key"]] = row
    return list(rows.values())


def repair_tail(path: Path) -> int:
    """Cut a torn last line (no trailing newline) off ``path``; returns the bytes removed."""
    try:
        f = path.open("r+b")
    except FileNotFoundError:
        return 0
    with f:
        size = f.seek(0, os.SEEK_END)
        if size == 0:
            return 0
        f.seek(size - 1)
        if f.read(1) == b"\n":
            return 0
        f.seek(0)
        data = f.read()
        keep = data.rfind(b"\n") + 1  # 0 when the fragment is the only line
        f.truncate(keep)
        f.flush()
        os.fsync(f.fileno())
        return size - keep


def append_row(path: Path, row: dict) -> None:
    """Append one row as one line, flushed and synced to disk before returning.

    A torn fragment left by an earlier kill is cut off first; the line is written with a single
    ``os.write`` on an ``O_APPEND`` descriptor, so it is never interleaved or split by Python's
    buffering.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    repair_tail(path)
    data = (json.dumps(row) + "\n").encode("utf-8")
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        written = os.write(fd, data)
        while written < len(data):  # regular files write whole; loop for the odd short write
            written += os.write(fd, data[written:])
        os.fsync(fd)
    finally:
        os.close(fd)


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


# the sweep definition a directory holds, and the flag that sets each part
SWEEP_FLAGS = {
    "policies": "--policies",
    "tasks": "--tasks",
    "lengths": "--lengths",
    "keeps": "--keep",
    "samples": "--samples",
}


def _canonical(field: str, value: Any) -> Any:
    if field == "samples":
        return value
    items = [v.strip() if isinstance(v, str) else v for v in value]
    if field == "policies":
        items = [v for v in items if v != "full"]  # the full row is always there
    return sorted(set(items), key=str)


def _show(field: str, value: Any) -> str:
    if field == "samples":
        return str(value)
    return ",".join(str(v) for v in _canonical(field, value)) or "(none)"


def check_sweep(out: Path, old: dict | None, sweep: dict, extend: bool) -> None:
    """One directory, one sweep: refuse a run whose policies, tasks, lengths, keep ratios or
    sample count differ from the directory's, unless ``extend`` asks to add to it."""
    if old is None or extend:
        return
    diffs = [
        f"{flag} {_show(field, old[field])} there, {_show(field, sweep[field])} now"
        for field, flag in SWEEP_FLAGS.items()
        if field in old and _canonical(field, old[field]) != _canonical(field, sweep[field])
    ]
    if diffs:
        raise InputError(
            f"--out {out} holds another sweep ({'; '.join(diffs)}), and mixing them would put "
            "rows of both into one summary; rerun with the same options to resume, add --extend "
            "to add this run's cells to it (metadata.json then records both runs), or give "
            "another --out"
        )


def extend_sweep(old: dict, sweep: dict) -> dict:
    """The union of two sweep definitions (what an extended directory holds)."""
    out: dict = {}
    for field in SWEEP_FLAGS:
        if field == "samples":
            out[field] = max(old.get(field, 0), sweep[field])
        else:
            merged = list(old.get(field, []))
            merged += [v for v in sweep[field] if v not in merged]
            out[field] = merged
    return out
