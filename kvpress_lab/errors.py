"""User-facing errors.

Every error a user can cause by bad input derives from :class:`KvlabError`; the CLI prints its
message on one line and exits with status 2. Messages name the problem and the fix.
"""

from __future__ import annotations


class KvlabError(Exception):
    """Base class for errors caused by user input or environment, not by a bug."""

    exit_code = 2


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
    """A plugin that failed to load or registered a clashing name."""
