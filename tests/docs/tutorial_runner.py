"""Execute every code block of a tutorial page, in order, in one namespace.

Usage: ``python tests/docs/tutorial_runner.py PAGE.md WORKDIR`` (the test suite runs it in a
subprocess per page, so installs and registry changes stay isolated). Blocks:

``python``
    executed with :func:`exec` in one namespace shared by the whole page.
``bash``
    one command per line (``\\`` continues a line; ``#`` comments skipped). ``kvlab ...`` runs
    :func:`kvpress_lab.cli.main.main` in-process and must exit 0; ``pip install [-e] PATH``
    installs PATH (relative to the repository) with ``--no-deps`` into a private directory put on
    ``sys.path``, so the plugin's entry points become visible; ``python -m pytest ARGS`` runs in
    a subprocess that sees the same directory. Any other command is an error.
``toml``/``python``/``text`` with ``title="PATH"``
    a file's content shown on the page: it must appear verbatim in PATH (relative to the
    repository), so the page cannot drift from the files it describes. Such a python block is
    not executed.

A block preceded by ``<!-- tutorial: skip -->`` is skipped; the page must say why.
"""

from __future__ import annotations

import contextlib
import importlib
import os
import re
import shlex
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "tests"))

from plugin_install import pip_install_target  # noqa: E402

FENCE = re.compile(
    r"^(?P<skip><!-- tutorial: skip -->\n)?(?P<indent>[ ]*)```(?P<lang>[\w-]*)(?P<attrs>[^\n]*)\n"
    r"(?P<body>.*?)^(?P=indent)```[ ]*$",
    re.M | re.S,
)
TITLE = re.compile(r'title="([^"]+)"')


def blocks(markdown: str):
    for m in FENCE.finditer(markdown):
        body = textwrap.dedent(m["body"]) if m["indent"] else m["body"]
        title = TITLE.search(m["attrs"])
        line = markdown.count("\n", 0, m.start()) + 1 + (1 if m["skip"] else 0)
        yield m["lang"], title[1] if title else None, body, bool(m["skip"]), line


def commands(body: str) -> list[str]:
    out, cur = [], ""
    for raw in body.splitlines():
        line = raw.rstrip()
        if line.endswith("\\"):
            cur += line[:-1] + " "
            continue
        cur += line
        text = cur.strip()
        cur = ""
        if text and not text.startswith("#"):
            out.append(text)
    return out


class Runner:
    def __init__(self, workdir: Path) -> None:
        self.workdir = workdir
        self.site = workdir / ".tutorial-site"
        self.ns: dict = {"__name__": "__tutorial__"}

    def python(self, code: str) -> None:
        exec(compile(code, "<tutorial block>", "exec"), self.ns)

    def shell(self, body: str) -> None:
        for cmd in commands(body):
            argv = shlex.split(cmd)
            print(f"$ {cmd}", flush=True)
            if argv[0] == "kvlab":
                from kvpress_lab.cli.main import main

                rc = main(argv[1:])
                if rc != 0:
                    raise AssertionError(f"`{cmd}` exited with status {rc}")
            elif argv[:2] == ["pip", "install"]:
                self.pip_install([a for a in argv[2:] if a != "-e"])
            elif argv[:3] == ["python", "-m", "pytest"]:
                env = dict(os.environ)
                env["PYTHONPATH"] = os.pathsep.join(
                    p for p in (str(self.site), env.get("PYTHONPATH", "")) if p
                )
                args = [self._repo_path(a) if a.startswith("plugins/") else a for a in argv[3:]]
                proc = subprocess.run(
                    [sys.executable, "-m", "pytest", "-p", "no:cacheprovider", *args],
                    cwd=self.workdir,
                    env=env,
                    capture_output=True,
                    text=True,
                )
                print(proc.stdout[-3000:])
                if proc.returncode != 0:
                    raise AssertionError(
                        f"`{cmd}` failed:\n{proc.stdout[-4000:]}{proc.stderr[-2000:]}"
                    )
            else:
                raise AssertionError(f"the tutorial runner does not know how to run `{cmd}`")

    def _repo_path(self, rel: str) -> str:
        path = REPO / rel
        return str(path) if path.exists() else rel

    def pip_install(self, targets: list[str]) -> None:
        for target in targets:
            src = REPO / target if (REPO / target).exists() else self.workdir / target
            if not src.is_dir():
                raise AssertionError(f"pip install: {target} is not a directory here")
            copy = self.workdir / ".tutorial-src" / src.name
            shutil.rmtree(copy, ignore_errors=True)
            shutil.copytree(
                src, copy, ignore=shutil.ignore_patterns("build", "*.egg-info", "__pycache__")
            )
            pip_install_target(copy, self.site)
        if str(self.site) not in sys.path:
            sys.path.insert(0, str(self.site))
        importlib.invalidate_caches()
        from kvpress_lab.registry import default_registry

        default_registry.cache_clear()

    def shown_file(self, path: str, body: str) -> None:
        file = REPO / path
        if not file.is_file():
            raise AssertionError(f"the page shows {path}, which does not exist in the repository")
        if body.strip() not in file.read_text():
            raise AssertionError(f"the block titled {path} is not a verbatim part of that file")


def run_page(page: Path, workdir: Path) -> None:
    workdir.mkdir(parents=True, exist_ok=True)
    os.chdir(workdir)
    runner = Runner(workdir)
    ran = 0
    for lang, title, body, skip, line in blocks(page.read_text()):
        where = f"{page.name}:{line} ({lang or 'text'} block)"
        if skip:
            print(f"-- skipped {where}")
            continue
        try:
            if title is not None:
                runner.shown_file(title, body)
            elif lang == "python":
                runner.python(body)
            elif lang in ("bash", "console", "shell", "sh"):
                runner.shell(body)
            else:
                continue  # output samples and data formats are not code
        except BaseException as exc:
            raise SystemExit(
                f"TUTORIAL BLOCK FAILED at {where}: {type(exc).__name__}: {exc}"
            ) from exc
        ran += 1
        print(f"-- ok {where}", flush=True)
    print(f"TUTORIAL OK: {ran} blocks")


if __name__ == "__main__":
    with contextlib.suppress(KeyboardInterrupt):
        run_page(Path(sys.argv[1]).resolve(), Path(sys.argv[2]).resolve())
