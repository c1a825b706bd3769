"""Long-context evaluation tasks, generated offline and deterministic by seed.

Built-in tasks follow RULER (Hsieh et al. 2024): its 13 tasks ``ruler:niah_single_1`` ..
``ruler:qa_2`` (see :mod:`kvpress_lab.tasks.ruler_suite`), and the earlier short forms ``niah``,
``niah-multikey``, ``vt``; and BABILong (Kuratov et al. 2024): ``babilong-qa1`` ..
``babilong-qa5``. A group name stands for several tasks: ``ruler`` is all 13 RULER tasks. A path
to a ``.jsonl`` file is accepted as a task as well (see :mod:`kvpress_lab.tasks.jsonl`).
"""

from __future__ import annotations

import os
import types
from collections.abc import Mapping

from kvpress_lab.errors import InputError
from kvpress_lab.tasks.babilong import babilong_generator
from kvpress_lab.tasks.base import (
    METRICS,
    CountTokens,
    Sample,
    SampleGenerator,
    check_generation_args,
)
from kvpress_lab.tasks.jsonl import read_jsonl
from kvpress_lab.tasks.ruler import niah, niah_multikey, variable_tracking
from kvpress_lab.tasks.ruler_suite import RULER_TASKS
from kvpress_lab.tasks.scoring import babilong_match, string_match_all, string_match_part

__all__ = [
    "METRICS",
    "TASKS",
    "TASK_GROUPS",
    "CountTokens",
    "Sample",
    "SampleGenerator",
    "available_tasks",
    "babilong_match",
    "expand_tasks",
    "generate_samples",
    "score",
    "string_match_all",
    "string_match_part",
]

TASKS: Mapping[str, SampleGenerator] = types.MappingProxyType(
    {
        "niah": niah,
        "niah-multikey": niah_multikey,
        "vt": variable_tracking,
        **{f"babilong-qa{i}": babilong_generator(f"qa{i}") for i in range(1, 6)},
        **RULER_TASKS,
    }
)
"""Read-only registry: task name -> generator of one sample."""

TASK_GROUPS: Mapping[str, tuple[str, ...]] = types.MappingProxyType({"ruler": tuple(RULER_TASKS)})
"""Read-only registry: group name -> the tasks it stands for (``ruler``: RULER's 13 tasks)."""


def available_tasks() -> list[str]:
    """Names of the built-in tasks and task groups, sorted."""
    return sorted([*TASKS, *TASK_GROUPS])


def expand_tasks(tasks: list[str]) -> list[str]:
    """``tasks`` with every group name replaced by its tasks (order kept, duplicates dropped)."""
    out: dict[str, None] = {}
    for task in tasks:
        for name in TASK_GROUPS.get(task, (task,)) if isinstance(task, str) else (task,):
            out.setdefault(name, None)
    return list(out)


def _looks_like_path(task: str) -> bool:
    return task.lower().endswith(".jsonl") or os.sep in task or "/" in task


def generate_samples(
    task: str | os.PathLike[str],
    target_tokens: int,
    n_samples: int,
    seed: int,
    count_tokens: CountTokens,
) -> list[Sample]:
    """``n_samples`` samples of ``task`` whose contexts are ``target_tokens`` long (within 2 %).

    ``task`` is a built-in name, a group name or a path to a ``.jsonl`` file. A group gives
    ``n_samples`` samples of each of its tasks, task after task (each sample's ``task`` names
    its own task). For a file, ``target_tokens`` is only checked and recorded, and the file's
    first ``n_samples`` samples are returned. The same arguments always give the same samples.
    """
    check_generation_args(target_tokens, n_samples, seed)
    if not isinstance(task, str | os.PathLike):
        raise InputError(f"task must be a task name or a path, got {task!r}")
    name = os.fspath(task)
    if isinstance(task, str) and name in TASK_GROUPS:
        return [
            sample
            for member in TASK_GROUPS[name]
            for sample in generate_samples(member, target_tokens, n_samples, seed, count_tokens)
        ]
    if isinstance(task, str) and name in TASKS:
        generator = TASKS[name]
        return [
            generator(target_tokens=target_tokens, seed=seed, index=i, count_tokens=count_tokens)
            for i in range(n_samples)
        ]
    if not isinstance(task, str) or _looks_like_path(name):
        samples = read_jsonl(name, n_samples, count_tokens)
        for s in samples:
            s.meta["target_tokens"] = target_tokens
        return samples
    raise InputError(
        f"unknown task {name!r}; available tasks: {', '.join(available_tasks())}, "
        "or a path to a .jsonl file"
    )


def score(sample: Sample, prediction: str) -> float:
    """Score ``prediction`` for ``sample`` with the sample's metric (1.0 is right)."""
    if sample.metric == "string_match_all":
        return string_match_all(prediction, sample.answers)
    if sample.metric == "string_match_part":
        return string_match_part(prediction, sample.answers)
    if sample.metric == "babilong":
        if not sample.answers:
            raise InputError(f"sample {sample.sample_id!r} has no answer to score against")
        return babilong_match(prediction, sample.answers[0], sample.question, sample.labels)
    raise InputError(
        f"sample {sample.sample_id!r} has unknown metric {sample.metric!r}; "
        f"choose one of {', '.join(METRICS)}"
    )
