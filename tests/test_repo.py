"""Repository-level checks: the README's first lines and CI run the same commands."""

from __future__ import annotations

from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _readme_commands() -> list[str]:
    lines = ROOT.joinpath("README.md").read_text().splitlines()
    # The first indented block after the title holds exactly two commands.
    cmds = [ln.strip() for ln in lines[:6] if ln.startswith("    ")]
    return cmds


def test_readme_opens_with_install_run_and_install_test_commands():
    cmds = _readme_commands()
    assert len(cmds) == 2, cmds
    run_cmd, test_cmd = cmds
    assert run_cmd.startswith("pip install") and "jserve-eval reproduce" in run_cmd
    assert test_cmd.startswith("pip install") and "pytest" in test_cmd


def test_ci_runs_the_readme_test_command():
    test_cmd = _readme_commands()[1]
    ci = ROOT.joinpath(".ci", "run").read_text()
    assert test_cmd in ci.splitlines(), "the .ci/run script must run README.md's test command verbatim"
