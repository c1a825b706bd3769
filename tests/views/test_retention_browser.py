"""The retention page rendered by a real headless browser (Debian's ``chromium`` package).

CI installs it with ``apt-get install -y --no-install-recommends chromium``; a missing browser is a
failure, not a skip, so the page is always checked in a real renderer.
"""

from __future__ import annotations

import re
import shutil
import subprocess

import numpy as np
import pytest

from kvpress_lab import run
from kvpress_lab.testing import tiny_model
from kvpress_lab.views import write_retention_html

CONTEXT = (
    "Mara keeps bees behind the old mill.\nThe pass key is 4721. Tom fixed the red bicycle on "
    "Tuesday. Rain fell over the harbour while the ferry waited. "
) * 2
FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
]


@pytest.fixture(scope="module")
def chromium():
    exe = shutil.which("chromium") or shutil.which("chromium-browser")
    if exe is None:
        pytest.fail(
            "chromium is not installed; install it with: "
            "apt-get install -y --no-install-recommends chromium"
        )
    return exe


@pytest.fixture(scope="module")
def page(tmp_path_factory):
    lm = tiny_model(layers=2, heads=4, kv_heads=2)
    # per-head random selection gives fully kept, partly kept and dropped tokens
    result = run(lm, "random:keep_ratio=0.3,granularity=head", CONTEXT, "What is the pass key?")
    path = tmp_path_factory.mktemp("page") / "retention.html"
    write_retention_html(result, lm.tokenizer, path, "What is the pass key?", "The pass key is")
    return result, path


def _browser(chromium, tmp_path, *args) -> subprocess.CompletedProcess:
    return subprocess.run(
        [chromium, *FLAGS, f"--user-data-dir={tmp_path / 'profile'}", *args],
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_dom_has_kept_token_marks(chromium, page, tmp_path):
    result, path = page
    proc = _browser(chromium, tmp_path, "--dump-dom", path.as_uri())
    assert proc.returncode == 0, proc.stderr[-2000:]
    dom = proc.stdout
    marks = re.findall(
        r'class="tok (kept|partial|dropped)[^"]*" data-i="(\d+)" data-kept="([0-9.]+)"', dom
    )
    assert len(marks) == result.context_tokens
    expected = [f"{v:.2f}" for v in result.retention.tolist()]
    assert [m[2] for m in marks] == expected
    assert [int(m[1]) for m in marks] == list(range(result.context_tokens))
    states = {m[0] for m in marks}
    assert states == {"kept", "partial", "dropped"}
    for state, _, kept in marks:
        assert (state == "kept") == (kept == "1.00") and (state == "dropped") == (kept == "0.00")
    assert '<span id="question">What is the pass key?</span>' in dom


def test_screenshot_shows_shaded_and_plain_tokens(chromium, page, tmp_path):
    import matplotlib.image as mpimg

    _, path = page
    png = tmp_path / "shot.png"
    proc = _browser(
        chromium, tmp_path, f"--screenshot={png}", "--window-size=1200,900", path.as_uri()
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert png.is_file() and png.stat().st_size > 5000
    img = (mpimg.imread(png)[..., :3] * 255).astype(np.int16)
    assert img.shape[:2] == (900, 1200)
    r, g, b = img[..., 0], img[..., 1], img[..., 2]
    white = (r > 250) & (g > 250) & (b > 250)
    # fully kept tokens: rgba(46,160,67,.80) over white ~ (88,179,105)
    strong = (abs(r - 88) < 12) & (abs(g - 179) < 12) & (abs(b - 105) < 12)
    # lightly kept tokens: a pale green, green clearly above red and blue
    pale = (g - r > 25) & (g - b > 15) & (r > 130)
    assert white.mean() > 0.5, "the page background should be mostly white"
    assert strong.sum() > 500, "no fully kept (dark green) tokens rendered"
    assert pale.sum() > 200, "no partly kept (pale green) tokens rendered"
