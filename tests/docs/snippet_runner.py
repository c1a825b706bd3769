"""Run the code a newcomer copies from one page (README.md, docs/index.md, docs/quickstart.md).

Usage: ``python tests/docs/snippet_runner.py PAGE WORKDIR [TINY_MODEL_DIR | --python-only]``. Every ``python``
block is executed as written, in order, in one namespace; every ``bash`` line is run: ``kvlab
...`` in-process (it must exit 0), ``pip install ...`` and the venv line are checked to be steps
of the README's main command (which CI runs verbatim, see scripts/test.sh). With a tiny model
directory, ``load_model()`` without a model loads it instead of the default model, which is too
slow for every snippet on a CPU; everything else runs unchanged. ``--python-only`` runs just the
python blocks (on the default model, for the slow check of the README's Python snippet).
"""

from __future__ import annotations

import os
import shlex
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "scripts"))
sys.path.insert(0, str(Path(__file__).parent))

from readme_commands import readme_command  # noqa: E402
from tutorial_runner import blocks, commands  # noqa: E402


def main(page: Path, workdir: Path, tiny: str | None, python_only: bool = False) -> int:
    import kvpress_lab
    import kvpress_lab.models as models

    if tiny:
        # the model-choosing functions, given no model, choose the tiny one instead
        for name in ("load_model", "resolve_model", "load_tokenizer"):
            real = getattr(models, name, None)
            if real is None:
                continue

            def chooser(model=None, *args, _real=real, **kwargs):
                return _real(model if model is not None else tiny, *args, **kwargs)

            setattr(models, name, chooser)
        kvpress_lab.load_model = models.load_model
    from kvpress_lab.cli.main import main as kvlab

    main_steps = [s.strip() for s in readme_command("main").split("&&")]
    workdir.mkdir(parents=True, exist_ok=True)
    os.chdir(workdir)
    # the file the quickstart's examples read ("Put a long text in a file")
    Path("report.txt").write_text(
        "The committee met on Tuesday. " * 60
        + "The meeting was hosted by the city of Lyon. "
        + "Minutes were taken and approved. " * 60
    )
    namespace: dict = {"__name__": "__snippet__"}
    ran = 0
    for lang, title, body, _skip, line in blocks(page.read_text(encoding="utf-8")):
        if title:
            continue
        if lang == "python":
            print(f"--- python block at line {line}", flush=True)
            exec(compile(body, f"{page.name}:{line}", "exec"), namespace)
            ran += 1
        elif lang == "bash" and not python_only:
            for cmd in commands(body):
                argv = shlex.split(cmd.split("  #")[0])
                print(f"$ {cmd}", flush=True)
                if argv[0] == "kvlab":
                    rc = kvlab(argv[1:])
                    if rc != 0:
                        raise SystemExit(f"`{cmd}` exited with status {rc}")
                elif argv[0] in ("pip", "python3", "bash"):
                    steps = [s.strip() for s in cmd.split("#")[0].split("&&")]
                    unknown = [s for s in steps if s not in main_steps + [readme_command("test")]]
                    if unknown:
                        raise SystemExit(
                            f"`{cmd}` is not a step of the README's set-up commands "
                            f"({main_steps}); CI runs only those"
                        )
                else:
                    raise SystemExit(f"the snippet runner does not know how to run `{cmd}`")
            ran += 1
    print(f"SNIPPETS OK: {ran} blocks")
    return 0


if __name__ == "__main__":
    extra = sys.argv[3] if len(sys.argv) > 3 else None
    only = extra == "--python-only"
    sys.exit(main(Path(sys.argv[1]), Path(sys.argv[2]), None if only else extra, only))
