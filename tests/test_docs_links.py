"""The README and docs stand alone: every link stays inside the repository and resolves."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md")), ROOT / "compose" / "README.md"]
LINK = re.compile(r"\[[^\]]*\]\(([^)\s]+)\)")


@pytest.mark.parametrize("doc", DOCS, ids=lambda p: str(p.relative_to(ROOT)))
def test_links_stay_in_the_repository_and_resolve(doc):
    for target in LINK.findall(doc.read_text()):
        assert not re.match(r"^[a-z]+:", target), f"{doc.name} links outside the repository: {target}"
        path = target.split("#")[0]
        if path:
            resolved = (doc.parent / path).resolve()
            assert resolved.is_relative_to(ROOT), f"{doc.name} links outside the repository: {target}"
            assert resolved.exists(), f"{doc.name} links to {target}, which does not exist"


def test_readme_links_the_design():
    assert "(docs/design.md)" in (ROOT / "README.md").read_text()


@pytest.mark.parametrize("doc", DOCS, ids=lambda p: str(p.relative_to(ROOT)))
def test_no_internal_work_items_in_user_docs(doc):
    text = doc.read_text()
    for phrase in ("../shared", "issue lands", "once the observability issue"):
        assert phrase not in text, f"{doc.name} mentions {phrase!r}"
