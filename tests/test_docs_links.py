"""Every relative link in the documentation reaches a file that exists, and every ``#anchor``
a heading of it (GitHub's slugs): the docs link to each other by section, and a renamed
heading must not leave a dead link behind."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
DOCUMENTS = sorted(
    [ROOT / "README.md", ROOT / "helm/broker/README.md", *(ROOT / "docs").glob("*.md")]
)
LINK = re.compile(r"\]\(([^)\s]+)\)")
HEADING = re.compile(r"^#{1,6} (.+)$", re.MULTILINE)
ANCHOR = re.compile(r'<a id="([^"]+)"')
FENCE = re.compile(r"^```.*?^```", re.MULTILINE | re.DOTALL)


def slug(heading: str) -> str:
    """GitHub's anchor for a heading: its text (code and link marks dropped) in lower case,
    punctuation but ``-`` and ``_`` dropped, spaces to dashes."""
    text = re.sub(r"[`*]|\[([^]]*)\]\([^)]*\)", r"\1", heading).strip().lower()
    return re.sub(r"[^\w\- ]", "", text).replace(" ", "-")


def anchors(document: Path) -> set[str]:
    """The headings' slugs and the explicit ``<a id="...">`` anchors of a document."""
    text = FENCE.sub("", document.read_text(encoding="utf-8"))
    return {slug(h) for h in HEADING.findall(text)} | set(ANCHOR.findall(text))


def test_slugs_are_githubs() -> None:
    assert slug("Where a token request's CPU goes now, and what would reach 0.7x") == (
        "where-a-token-requests-cpu-goes-now-and-what-would-reach-07x"
    )
    assert slug("The background refresher: `bench/refresher.py`") == (
        "the-background-refresher-benchrefresherpy"
    )
    assert slug("Upgrading from 0.1.0") == "upgrading-from-010"
    assert slug("Recover a grant in `reauth_required`") == "recover-a-grant-in-reauth_required"


@pytest.mark.parametrize("document", DOCUMENTS, ids=lambda p: str(p.relative_to(ROOT)))
def test_every_relative_link_and_anchor_exists(document: Path) -> None:
    text = FENCE.sub("", document.read_text(encoding="utf-8"))
    dead = []
    for target in LINK.findall(text):
        if re.match(r"^[a-z]+:", target):  # https:, mailto: ...
            continue
        path, _, anchor = target.partition("#")
        linked = (document.parent / path).resolve() if path else document
        if not linked.exists() or (
            anchor and linked.suffix == ".md" and anchor not in anchors(linked)
        ):
            dead.append(target)
    assert not dead, f"dead links in {document.relative_to(ROOT)}: {dead}"
