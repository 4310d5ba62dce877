"""The repository as a reader meets it: the README stays an index, and every link between the documents resolves.

    python -m pytest -q tests/test_house.py
"""
import re

import pytest

from conftest import REPO

DOCS = ["README.md", "PAPER.md", "COURSE.md", *sorted(p.relative_to(REPO).as_posix() for p in REPO.glob("docs/*.md"))]


def test_readme_is_an_index():
    """Measurements and internals live in docs/; the README is read in five minutes (nanoGPT's is 14 KB)."""
    assert (REPO / "README.md").stat().st_size <= 30_000


@pytest.mark.parametrize("doc", DOCS)
def test_relative_links_resolve(doc):
    """[text](path) and [text](path#anchor) to a file of the repository: the file exists, seen from the document."""
    path = REPO / doc
    links = re.findall(r"\]\(([^)\s]+)\)", path.read_text())
    local = [link.split("#")[0] for link in links if not re.match(r"[a-z]+:", link) and not link.startswith("#")]
    missing = [link for link in local if not (path.parent / link).exists()]
    assert not missing, f"{doc}: links to {missing}, which do not exist"


def test_no_document_sends_a_reader_outside_the_repository():
    """What a reader needs is written here: no pointer to notes that users do not get."""
    for doc in DOCS + [p.relative_to(REPO).as_posix() for p in [*REPO.glob("*.py"), *REPO.glob("tests/*.py")]]:
        text = (REPO / doc).read_text()
        assert ".." + "/shared" not in text and "style" + ".md" not in text, doc
