"""The docs hold together: every relative link in README.md and docs/*.md leads to a file
that exists and, when it names a ``#anchor`` in a Markdown file, to a heading there (as
GitHub turns headings into anchors)."""

from __future__ import annotations

import re
from collections import Counter
from pathlib import Path

import pytest

from .conftest import REPO

DOCS = sorted([REPO / "README.md", *(REPO / "docs").glob("*.md")])

_FENCE = re.compile(r"^(```|~~~).*?^\1[ \t]*$", re.M | re.S)
_CODE_SPAN = re.compile(r"(`+).+?\1", re.S)
_LINK = re.compile(r"!?\[(?:[^\[\]]|\[[^\]]*\])*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")
_HEADING = re.compile(r"^#{1,6}[ \t]+(.+?)[ \t#]*$", re.M)


def _prose(text: str) -> str:
    """The text outside fenced code blocks: a ``#`` line in a shell block is no heading,
    and a ``[x](y)`` in code is no link."""
    return _FENCE.sub("", text)


def slug(heading: str) -> str:
    """GitHub's anchor for a heading: the rendered text (code spans and links reduced to
    their text, emphasis marks gone), lower-cased, every character but letters, digits,
    ``_``, ``-`` and spaces dropped, each space a ``-``."""
    text = re.sub(r"!?\[([^\]]*)\]\([^)]*\)", r"\1", heading)
    text = text.replace("`", "").replace("*", "")
    text = re.sub(r"[^\w\- ]", "", text.lower())
    return text.replace(" ", "-")


def anchors(path: Path) -> set[str]:
    """Every anchor GitHub makes for ``path``'s headings; a repeated slug gets ``-1``,
    ``-2``, ... in order."""
    seen: Counter[str] = Counter()
    found = set()
    for heading in _HEADING.findall(_prose(path.read_text())):
        base = slug(heading)
        found.add(f"{base}-{seen[base]}" if seen[base] else base)
        seen[base] += 1
    return found


def links(path: Path) -> list[str]:
    """The targets of ``path``'s inline links and images, outside code."""
    return _LINK.findall(_CODE_SPAN.sub("", _prose(path.read_text())))


def broken_links(path: Path) -> list[str]:
    """``path``'s relative links that lead nowhere, each with the reason."""
    broken = []
    for target in links(path):
        if re.match(r"[a-z][a-z0-9+.-]*:", target, re.I) or target.startswith("//"):
            continue  # http:, https:, mailto:: not ours to check
        name, _, anchor = target.partition("#")
        dest = (path.parent / name).resolve() if name else path
        if not dest.exists():
            broken.append(f"{target}: no file {dest}")
        elif anchor and dest.suffix == ".md" and anchor not in anchors(dest):
            broken.append(f"{target}: no heading #{anchor} in {dest.name}")
    return broken


def test_the_docs_exist() -> None:
    names = {p.relative_to(REPO).as_posix() for p in DOCS}
    assert {
        "README.md",
        "docs/protocol.md",
        "docs/operations.md",
        "docs/performance.md",
        "docs/development.md",
    } <= names


@pytest.mark.parametrize("path", DOCS, ids=lambda p: p.relative_to(REPO).as_posix())
def test_every_relative_link_resolves(path: Path) -> None:
    assert links(path), f"{path} links to nothing"
    assert broken_links(path) == []


@pytest.mark.parametrize(
    ("heading", "anchor"),
    [
        ("Close codes and error codes", "close-codes-and-error-codes"),
        ("Apps: realtime sessions (`/v1/realtime`)", "apps-realtime-sessions-v1realtime"),
        (
            "Plain HTTP (`/v1/http`), existing clients unchanged",
            "plain-http-v1http-existing-clients-unchanged",
        ),
        ("What openclawd survives", "what-openclawd-survives"),
        ("Start to `READY=1`", "start-to-ready1"),
        ("[Keys](x.md) and **Vault**", "keys-and-vault"),
        ("snake_case and a - dash", "snake_case-and-a---dash"),
    ],
)
def test_slug_follows_github(heading: str, anchor: str) -> None:
    assert slug(heading) == anchor


def test_a_broken_link_is_found(tmp_path: Path) -> None:
    """The check can fail: a missing file, a missing heading, and the same for an anchor
    in the same file; links in code, and links out of the repository, are left alone."""
    (tmp_path / "other.md").write_text("# Other\n\n## A part\n\n## A part\n")
    doc = tmp_path / "doc.md"
    doc.write_text(
        "# Doc\n\n## Here\n\n"
        "[ok](other.md) [ok](other.md#a-part) [ok](other.md#a-part-1) [ok](#here)\n"
        "[gone](missing.md) [no heading](other.md#a-part-2) [no heading](#there)\n"
        "![image](missing.png) [web](https://example.com/x.md) `[code](missing.md)`\n"
        "```sh\n# Here is no heading\n[code](missing.md)\n```\n"
    )
    assert broken_links(doc) == [
        f"missing.md: no file {tmp_path / 'missing.md'}",
        "other.md#a-part-2: no heading #a-part-2 in other.md",
        "#there: no heading #there in doc.md",
        f"missing.png: no file {tmp_path / 'missing.png'}",
    ]
