"""Citations of docs/ARCHITECTURE.md point at sections that exist, and nothing cites an outside document.

Code comments and docs cite the architecture page by number ("ARCHITECTURE.md section N", or
"ARCHITECTURE.md sections N, M and K"), so its numbered ``## N.`` headings are an API: renumbering one
must fail here, naming every file:line whose citation broke.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Iterator
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DOC = ROOT / "docs" / "ARCHITECTURE.md"
SCANNED_DIRS = ("pipeline", "tests", "bench", "slurm", "configs", "launch", "docs")
SCANNED_FILES = ("README.md",)
SUFFIXES = (".py", ".md", ".yaml", ".sh", ".sbatch")

EXPECTED_HEADINGS = {
    1: "What the pipeline is",
    2: "Layers and data flow",
    3: "Prompted CLIP",
    4: "Stage 1: meta-pretraining",
    5: "Stage 2: ProMetaR fine-tuning",
    6: "Evaluation protocol",
    7: "Distributed design",
    8: "Performance",
    9: "Reliability",
    10: "Conventions",
    11: "The suite: a benchmark where the method's effect can be seen",
}

# One number ("section N") or several ("sections N and M", "sections N, M and K"); the words may be split
# over lines, also across comment markers (a "#" or "*" starting the next line).
_SEP = r"[\s#*>(,:]*"
_NUMBERS = r"\d+(?:(?:\s*,\s*(?:and\s+|or\s+)?|\s+(?:and|or|&)\s+)\d+)*"
CITATION = re.compile(rf"ARCHITECTURE\.md{_SEP}sections?[\s#]+(?P<numbers>{_NUMBERS})")
# citing the design document that is not shipped with the repository (built from parts, so that this
# file does not cite it itself)
OUTSIDE = re.compile("DESIGN" + r"(?:\.md)?[\s#]+" + "sections?" + r"\b")


def scanned_files() -> list[Path]:
    """Every file whose citations are checked (sorted, repository-relative order)."""
    files = [ROOT / name for name in SCANNED_FILES if (ROOT / name).is_file()]
    for folder in SCANNED_DIRS:
        base = ROOT / folder
        if base.is_dir():
            files += [p for p in base.rglob("*") if p.is_file() and p.suffix in SUFFIXES
                      and "__pycache__" not in p.parts]
    return sorted(set(files))


def _line_of(text: str, offset: int) -> int:
    return text.count("\n", 0, offset) + 1


def citations(text: str) -> Iterator[tuple[int, list[int]]]:
    """``(line, [section numbers])`` for every architecture citation in ``text``."""
    for m in CITATION.finditer(text):
        yield _line_of(text, m.start()), [int(n) for n in re.findall(r"\d+", m.group("numbers"))]


def doc_sections(doc_text: str) -> dict[int, str]:
    """Numbered top-level headings ``## N. Title`` of the doc (fenced code blocks ignored)."""
    out: dict[int, str] = {}
    fenced = False
    for line in doc_text.splitlines():
        if line.lstrip().startswith("```"):
            fenced = not fenced
            continue
        m = re.match(r"^## (\d+)\.\s+(.*?)\s*$", line)
        if m and not fenced:
            out[int(m.group(1))] = m.group(2)
    return out


def broken_citations(files: Iterable[tuple[str, str]], sections: Iterable[int]) -> list[str]:
    """``"path:line: cites section N"`` for every cited number that is not in ``sections``.

    ``files``: ``(display name, text)`` pairs.
    """
    known = set(sections)
    problems = []
    for name, text in files:
        for line, numbers in citations(text):
            for n in numbers:
                if n not in known:
                    problems.append(f"{name}:{line}: cites ARCHITECTURE.md section {n}, which has no '## {n}.' heading")
    return problems


def outside_citations(files: Iterable[tuple[str, str]]) -> list[str]:
    """``"path:line: ..."`` for every citation of the design document outside the repository."""
    problems = []
    for name, text in files:
        for m in OUTSIDE.finditer(text):
            snippet = " ".join(m.group(0).split())
            problems.append(f"{name}:{_line_of(text, m.start())}: {snippet!r} cites a document outside the "
                            "repository; cite docs/ARCHITECTURE.md section N instead")
    return problems


def _read_all() -> list[tuple[str, str]]:
    return [(str(p.relative_to(ROOT)), p.read_text(encoding="utf-8", errors="replace")) for p in scanned_files()]


# ----------------------------------------------------------------------------- the helpers themselves
def test_citation_parser_reads_one_or_several_numbers():
    doc = "ARCHITECTURE" + ".md"  # built from parts: this file's own text must not cite anything
    text = "\n".join([
        f"x  # see docs/{doc} section 4 for why",
        f"y  (docs/{doc} sections 4 and 5)",
        f"z  docs/{doc} sections 2, 7 and 10.",
        f"w  # docs/{doc}\n   # section 3",
        f"no citation: {doc} section N, {doc} sections",
    ])
    assert list(citations(text)) == [(1, [4]), (2, [4, 5]), (3, [2, 7, 10]), (4, [3])]


def test_a_missing_section_is_reported_with_file_and_line():
    doc = "ARCHITECTURE" + ".md"
    files = [("pipeline/fake.py", f'"""Fine (docs/{doc} section 4)."""\n# bad: docs/{doc} sections 4 and 99\n')]
    problems = broken_citations(files, sections=range(1, 11))
    assert len(problems) == 1
    assert problems[0].startswith("pipeline/fake.py:2:") and "section 99" in problems[0]
    assert broken_citations([("a.md", f"{doc} section 4")], sections=[4]) == []


def test_outside_citations_are_found():
    word = "DESIGN"
    files = [("a.py", f"ok\n# see {word} section 7\n"), ("b.md", f"{word}.md sections 4 and 5"),
             ("c.md", "the design section is fine")]
    problems = outside_citations(files)
    assert [p.split(":")[0] + ":" + p.split(":")[1] for p in problems] == ["a.py:2", "b.md:1"]


# ----------------------------------------------------------------------------- the repository
def test_doc_has_the_numbered_sections():
    assert DOC.is_file(), "docs/ARCHITECTURE.md is missing"
    assert doc_sections(DOC.read_text(encoding="utf-8")) == EXPECTED_HEADINGS


def test_every_architecture_citation_has_a_section():
    sections = doc_sections(DOC.read_text(encoding="utf-8"))
    files = _read_all()
    assert files, "no files scanned"
    problems = broken_citations(files, sections)
    assert not problems, "citations of missing sections:\n" + "\n".join(problems)


def test_nothing_cites_the_outside_design_document():
    problems = outside_citations(_read_all())
    assert not problems, f"{len(problems)} citation(s) of a document outside the repository:\n" + "\n".join(problems)


@pytest.mark.parametrize("number", sorted(EXPECTED_HEADINGS))
def test_sections_are_not_empty(number):
    text = DOC.read_text(encoding="utf-8")
    start = text.index(f"\n## {number}. ")
    nxt = text.find("\n## ", start + 1)
    body = text[start:nxt if nxt >= 0 else len(text)].split("\n", 2)[-1]
    assert len(body.split()) >= 40, f"section {number} of docs/ARCHITECTURE.md is nearly empty"
