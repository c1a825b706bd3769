"""``kvlab new-plugin`` scaffolds a distribution that passes its own tests unchanged."""

from __future__ import annotations

import sys

import pytest
from kit_helpers import pip_install_target, run_with_path

from kvpress_lab.cli.main import main
from kvpress_lab.cli.new_plugin import render


def test_scaffold_installs_and_passes_its_tests(tmp_path, capsys):
    dist = tmp_path / "kvlab-attnsum"
    assert main(["new-plugin", "attn_sum", "--dir", str(dist)]) == 0
    assert f"wrote plugin attn_sum to {dist}/" in capsys.readouterr().out.replace("\n", "")
    assert sorted(p.relative_to(dist).as_posix() for p in dist.rglob("*") if p.is_file()) == [
        "README.md",
        "kvlab_attn_sum/__init__.py",
        "kvlab_attn_sum/plugin.py",
        "pyproject.toml",
        "tests/test_attn_sum.py",
    ]
    pyproject = (dist / "pyproject.toml").read_text()
    assert '[project.entry-points.kvpress_lab]\nattn_sum = "kvlab_attn_sum.plugin"' in pyproject
    site = tmp_path / "site"
    pip_install_target(dist, site)
    proc = run_with_path(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "tests"], site, dist
    )
    assert proc.returncode == 0, proc.stdout[-4000:]
    assert "8 passed" in proc.stdout


def test_scaffold_code_is_valid_python():
    for path, text in render("my_policy").items():
        if path.endswith(".py"):
            compile(text, path, "exec")
    plugin = render("my_policy")["kvlab_my_policy/plugin.py"]
    # the policy exposes its plugins' parameters instead of declaring them again
    assert "class MyPolicyPolicy(\n    policy_with(\n        MyPolicyScorer," in plugin
    assert "attrs.field(" not in plugin.split("class MyPolicyPolicy")[1]


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["new-plugin", "Bad-Name"], "plugin name 'Bad-Name' is invalid: use lowercase letters"),
        (["new-plugin", "class"], "plugin name 'class' is invalid"),
        (
            ["new-plugin", "snapkv"],
            "a policy named 'snapkv' is already installed (from kvpress-lab)",
        ),
    ],
)
def test_bad_names_rejected(argv, message, capsys):
    assert main(argv) == 2
    assert message in capsys.readouterr().err


def test_refuses_non_empty_dir(tmp_path, capsys):
    (tmp_path / "x.txt").write_text("keep me")
    assert main(["new-plugin", "fresh", "--dir", str(tmp_path)]) == 2
    assert "already exists and is not an empty directory" in capsys.readouterr().err
    assert (tmp_path / "x.txt").read_text() == "keep me"
