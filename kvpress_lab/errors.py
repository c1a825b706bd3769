"""User-facing errors.

Every error a user can cause by bad input derives from :class:`KvlabError`; the CLI prints its
message on one line and exits with its ``exit_code``: 2 for bad input or environment, 3 when a
plugin (policy, scorer, selector or budgeter) failed while running. Messages name the problem and
the fix.
"""

from __future__ import annotations

EXIT_BAD_INPUT = 2
EXIT_PLUGIN_FAILED = 3


class KvlabError(Exception):
    """Base class for errors caused by user input or environment, not by a bug."""

    exit_code = EXIT_BAD_INPUT


class ConfigError(KvlabError, ValueError):
    """An invalid policy, parameter, budget or engine setting."""


class UnknownPolicyError(ConfigError, KeyError):
    """A policy or plugin name that no installed plugin provides."""

    def __str__(self) -> str:  # KeyError would add quotes around the message
        return str(self.args[0]) if self.args else ""


class InputError(KvlabError, ValueError):
    """Bad input data: a missing or empty file, an empty question, a malformed JSONL line."""


class ContextTooLongError(InputError):
    """Context plus question do not fit in the model's maximum positions."""


class ModelLoadError(KvlabError, OSError):
    """A model path or id that cannot be loaded, or a missing model package."""


class PluginError(KvlabError):
    """A plugin that misbehaved at run time: it raised, or returned output the engine refuses.

    Exit status 3 ("a plugin failed"), so scripts can tell a broken plugin from bad input.
    Plugins that fail to *load* are not raised: discovery records them and skips them.
    """

    exit_code = EXIT_PLUGIN_FAILED
