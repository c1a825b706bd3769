"""pluggy hook specifications: the whole plugin contract in one module.

A plugin is a plain module that implements some of these hooks with ``@hookimpl`` and is listed
under the ``kvpress_lab`` entry-point group of its distribution::

    [project.entry-points.kvpress_lab]
    my_policy = "my_package.my_policy"

Each hook returns a list of classes. Names (the classes' ``name`` attribute) must be unique
across all installed plugins; a clash is reported and the later registration skipped.
"""

from __future__ import annotations

import pluggy

PROJECT = "kvpress_lab"
hookspec = pluggy.HookspecMarker(PROJECT)
hookimpl = pluggy.HookimplMarker(PROJECT)


@hookspec
def kvlab_policies() -> list[type]:
    """Policy classes (subclasses of :class:`kvpress_lab.policy.Policy`)."""


@hookspec
def kvlab_scorers() -> list[type]:
    """Scorer classes (subclasses of :class:`kvpress_lab.interfaces.Scorer`)."""


@hookspec
def kvlab_selectors() -> list[type]:
    """Selector classes (subclasses of :class:`kvpress_lab.interfaces.Selector`)."""


@hookspec
def kvlab_budgeters() -> list[type]:
    """Budgeter classes (subclasses of :class:`kvpress_lab.interfaces.Budgeter`)."""


@hookspec
def kvlab_unavailable() -> list[tuple[str, str]]:
    """Components this plugin cannot provide here, as ``(name, reason)`` pairs.

    ``name`` may be a glob (``kvpress.*``). ``kvlab plugins`` lists them with the reason, and
    asking for such a name fails with the reason instead of "unknown". A plugin whose optional
    dependency is missing says so here instead of failing to import.
    """
