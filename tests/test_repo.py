"""The repository's promises to a newcomer: the README's test command is what CI runs."""

from __future__ import annotations

import re

from .conftest import REPO


def readme_test_command() -> str:
    text = (REPO / "README.md").read_text()
    section = text.split("## The two commands", 1)[1].split("\n## ", 1)[0]
    blocks = re.findall(r"```sh\n(.*?)```", section, re.S)
    commands = [b.strip() for b in blocks if "pytest" in b]
    assert len(commands) == 1, blocks
    return commands[0]


def test_ci_runs_exactly_the_readme_test_command() -> None:
    script = (REPO / ".ci" / "run").read_text().splitlines()
    commands = [ln for ln in script if ln and not ln.startswith("#")]
    assert commands[-1] == readme_test_command()
    # Anything before it only sets the shell up; nothing else runs in CI.
    assert commands[:-1] == ["set -euo pipefail", 'cd "$(dirname "$0")/.."']


def test_readme_commands_are_near_the_top() -> None:
    text = (REPO / "README.md").read_text()
    assert text.index(readme_test_command()) < len(text) // 4
