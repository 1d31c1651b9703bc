"""docs/algorithms.md: sections 1-10 exist, and every reference to it resolves to a heading.

References are `algorithms.md §4`, `algorithms.md §4.2`, lists and ranges such as
`algorithms.md §4, §10` or `algorithms.md §6-8`, and links `algorithms.md#4-policy-losses`, in
`src/`, `README.md`, `docs/` and `recipes/`; links `](#anchor)` inside the page must resolve too.
"""

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).parents[1]
PAGE = ROOT / "docs" / "algorithms.md"
SEARCHED = [ROOT / "src", ROOT / "README.md", ROOT / "docs", ROOT / "recipes"]
SUFFIXES = {".py", ".md", ".yaml", ".yml", ".txt", ".rst", ".toml"}

_HEADING = re.compile(r"^(#{1,6})\s+(.+?)\s*#*\s*$")
_NUMBERED = re.compile(r"^(\d+(?:\.\d+)*)\.?\s")
_SECTION_REF = re.compile(r"algorithms\.md\s*(§[§\d.,\s\-–]*(?:(?:and|or)\s+§?[§\d.,\s\-–]*)*)")
_ANCHOR_REF = re.compile(r"algorithms\.md#([\w\-]+)")
_NUMBER = re.compile(r"\d+(?:\.\d+)*")


def slug(title: str) -> str:
    """GitHub's anchor for a heading: lower case, punctuation dropped, spaces to hyphens."""
    title = re.sub(r"`([^`]*)`", r"\1", title).strip().lower()
    return re.sub(r"[^\w\- ]", "", title).replace(" ", "-")


def headings(text: str) -> list[tuple[int, str]]:
    """(level, title) of every Markdown heading outside fenced code blocks."""
    found, fenced = [], False
    for line in text.splitlines():
        if line.lstrip().startswith("```"):
            fenced = not fenced
            continue
        match = None if fenced else _HEADING.match(line)
        if match:
            found.append((len(match.group(1)), match.group(2)))
    return found


def anchors(text: str) -> set[str]:
    """Every heading anchor, with GitHub's -1, -2 ... suffixes for repeated titles."""
    seen: dict[str, int] = {}
    out = set()
    for _, title in headings(text):
        base = slug(title)
        count = seen.get(base, 0)
        out.add(base if count == 0 else f"{base}-{count}")
        seen[base] = count + 1
    return out


def section_numbers(text: str) -> dict[str, tuple[int, str]]:
    """Numbered headings ("## 4. Policy losses", "### 4.2 Clip-Cov"): number -> (level, title)."""
    numbers: dict[str, tuple[int, str]] = {}
    for level, title in headings(text):
        match = _NUMBERED.match(title)
        if match:
            assert match.group(1) not in numbers, f"section {match.group(1)} is numbered twice"
            numbers[match.group(1)] = (level, title)
    return numbers


def section_refs(text: str) -> list[str]:
    """Section numbers cited as `algorithms.md §n`, including lists and ranges after one `§`."""
    refs = []
    for match in _SECTION_REF.finditer(text):
        refs += [n.rstrip(".") for n in _NUMBER.findall(match.group(1))]
    return refs


def referencing_files() -> list[Path]:
    files = []
    for root in SEARCHED:
        candidates = [root] if root.is_file() else sorted(root.rglob("*"))
        files += [p for p in candidates if p.is_file() and p.suffix in SUFFIXES]
    return files


def all_references() -> list[tuple[str, str, str]]:
    """(file, kind, value) for every reference to the page in the searched files."""
    found = []
    for path in referencing_files():
        text = path.read_text(encoding="utf-8", errors="replace")
        name = str(path.relative_to(ROOT))
        found += [(name, "section", n) for n in section_refs(text)]
        found += [(name, "anchor", a) for a in _ANCHOR_REF.findall(text)]
    return found


def test_reference_parsing():
    text = (
        "see docs/algorithms.md §4.2 and docs/algorithms.md §6-8; docs/algorithms.md §4, §10. "
        "Also docs/algorithms.md §3 Choice, docs/algorithms.md#4-policy-losses, SPEC 5, § 7"
    )
    assert section_refs(text) == ["4.2", "6", "8", "4", "10", "3"]
    assert _ANCHOR_REF.findall(text) == ["4-policy-losses"]
    assert slug("4. Policy losses") == "4-policy-losses"
    assert slug("4.2 Clip-Cov") == "42-clip-cov"
    assert slug("6.4 REINFORCE++ with baseline") == "64-reinforce-with-baseline"
    assert slug("7.3 When position shaping applies: the plateau latch") == (
        "73-when-position-shaping-applies-the-plateau-latch"
    )


def test_sections_one_to_ten_exist_with_stable_anchors():
    text = PAGE.read_text(encoding="utf-8")
    numbers = section_numbers(text)
    page_anchors = anchors(text)
    for n in range(1, 11):
        assert str(n) in numbers, f"docs/algorithms.md has no section {n}"
        level, title = numbers[str(n)]
        assert level == 2, f"section {n} must be a level-2 heading, got {'#' * level} {title}"
        assert title.startswith(f"{n}. "), f"section {n} must be titled '{n}. ...', got {title!r}"
        assert slug(title).startswith(f"{n}-") and slug(title) in page_anchors
    for number, (level, title) in numbers.items():
        parent = number.rsplit(".", 1)[0]
        if "." in number:
            assert parent in numbers, f"subsection {number} ({title}) has no section {parent}"
            assert level > numbers[parent][0], f"subsection {number} is not below {parent}"


def test_links_inside_the_page_resolve():
    text = PAGE.read_text(encoding="utf-8")
    page_anchors = anchors(text)
    broken = sorted({a for a in re.findall(r"\]\(#([^)\s]+)\)", text) if a not in page_anchors})
    assert not broken, f"links to missing headings in docs/algorithms.md: {broken}"


@pytest.mark.parametrize("kind", ["section", "anchor"])
def test_every_reference_to_the_page_resolves(kind):
    text = PAGE.read_text(encoding="utf-8")
    known = set(section_numbers(text)) if kind == "section" else anchors(text)
    broken = [(f, v) for f, k, v in all_references() if k == kind and v not in known]
    assert not broken, f"references to missing {kind}s of docs/algorithms.md: {broken}"


def test_the_configuration_reference_is_current_and_complete():
    """docs/config.md is what `python -m entroprl.config_reference` prints, and every key in it
    has a description (a key added without a docstring fails here)."""
    from entroprl.config_reference import reference

    text = reference()
    assert (ROOT / "docs" / "config.md").read_text() == text, (
        "docs/config.md is out of date: python -m entroprl.config_reference > docs/config.md"
    )
    rows = [line.split("|") for line in text.splitlines() if line.startswith("| `")]
    assert len(rows) > 90
    undocumented = [row[1].strip() for row in rows if not row[4].strip()]
    assert not undocumented, f"keys without a docstring: {undocumented}"


def test_no_file_holds_a_merge_conflict_marker():
    """A merge committed half-resolved once left its markers in the README."""
    marker = re.compile(r"^(<{7} |>{7} |={7}$)", re.M)
    roots = [ROOT / "README.md", ROOT / "docs", ROOT / "src", ROOT / "tests", ROOT / "examples"]
    files = [p for r in roots for p in ([r] if r.is_file() else r.rglob("*")) if p.is_file()]
    texts = [p for p in files if p.suffix in SUFFIXES]
    assert texts and not [str(p) for p in texts if marker.search(p.read_text())]
