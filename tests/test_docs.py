"""The README and docs/ stay navigable: every relative link and image resolves, anchors included, and the
README stays short (the details live in docs/, one page per task)."""

from __future__ import annotations

import re
import unicodedata
from pathlib import Path
from urllib.parse import unquote

import pytest

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
PAGES = [README, *sorted((ROOT / "docs").glob("*.md"))]
README_MAX_LINES = 200
EXTERNAL = ("http://", "https://", "mailto:")

FENCE = re.compile(r"^\s{0,3}(`{3,}|~{3,})")
CODE_SPAN = re.compile(r"(`+)(.+?)\1")
# [text](target) and ![alt](src); the text may hold one level of brackets, such as an image inside a link
LINK = re.compile(r"\[((?:[^\[\]]|\[[^\[\]]*\])*)\]\(\s*<?([^()\s<>]*)>?(?:\s+(?:\"[^\"]*\"|'[^']*'))?\s*\)")
REFERENCE = re.compile(r"^\s{0,3}\[[^\]]+\]:\s*<?(\S+?)>?(?:\s+.*)?$")
HEADING = re.compile(r"^\s{0,3}(#{1,6})\s+(.*?)\s*#*\s*$")
HTML_ANCHOR = re.compile(r"<a\s+[^>]*(?:name|id)=\"([^\"]+)\"", re.I)


def prose_lines(path: Path) -> list[tuple[int, str]]:
    """(line number, text) outside fenced code blocks."""
    lines, fence = [], None
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        match = FENCE.match(line)
        if fence is None and match:
            fence = match.group(1)
        elif fence is not None and match and match.group(1)[0] == fence[0] and len(match.group(1)) >= len(fence):
            fence = None
        elif fence is None:
            lines.append((number, line))
    return lines


def links(path: Path) -> list[tuple[int, str, str]]:
    """(line, text, target) of every link, image and reference definition, code spans left out."""
    found = []
    for number, line in prose_lines(path):
        line = CODE_SPAN.sub(lambda m: " " * len(m.group(0)), line)
        todo = [line]
        while todo:
            for match in LINK.finditer(todo.pop()):
                found.append((number, match.group(1), match.group(2)))
                todo.append(match.group(1))  # an image inside a link's text
        reference = REFERENCE.match(line)
        if reference:
            found.append((number, "", reference.group(1)))
    return found


def slug(heading: str) -> str:
    """GitHub's anchor for a heading: its rendered text, lowercased, punctuation dropped, spaces to hyphens."""
    text = re.sub(r"!?\[([^\]]*)\]\([^)]*\)", r"\1", heading)  # a link's or image's text only
    text = unicodedata.normalize("NFC", text).lower()
    kept = "".join(ch for ch in text if ch in " -_" or unicodedata.category(ch)[0] in "LMN")
    return kept.replace(" ", "-")


def anchors(path: Path) -> set[str]:
    """Every anchor a link may name in a markdown file: its headings' slugs (repeats get -1, -2, ...)."""
    seen: dict[str, int] = {}
    found = set()
    for _, line in prose_lines(path):
        match = HEADING.match(line)
        if match:
            base = slug(match.group(2))
            count = seen.get(base, 0)
            seen[base] = count + 1
            found.add(base if count == 0 else f"{base}-{count}")
        found |= set(HTML_ANCHOR.findall(line))
    return found


def broken(page: Path, target: str) -> str | None:
    """What is missing for `target` as written in `page`, or None when it resolves."""
    address, _, anchor = target.partition("#")
    dest = (page.parent / unquote(address)).resolve() if address else page
    if not dest.exists():
        return f"{dest.relative_to(ROOT) if dest.is_relative_to(ROOT) else dest} does not exist"
    if anchor and dest.suffix.lower() == ".md":
        if dest.is_dir():
            return f"{dest.relative_to(ROOT)} is a folder, not a page with headings"
        if unquote(anchor) not in anchors(dest):
            return f"no heading of {dest.relative_to(ROOT)} has the anchor #{anchor}"
    return None


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(ROOT)))
def test_every_relative_link_resolves(page):
    problems = []
    for line, text, target in links(page):
        if not target or target.lower().startswith(EXTERNAL):
            continue
        missing = broken(page, target)
        if missing:
            problems.append(f"{page.relative_to(ROOT)}:{line}: [{text}]({target}): {missing}")
    assert not problems, "broken links:\n" + "\n".join(problems)


def test_the_readme_stays_short():
    lines = len(README.read_text(encoding="utf-8").splitlines())
    assert lines <= README_MAX_LINES, (
        f"README.md has {lines} lines, over {README_MAX_LINES}: move the details to a page under docs/ and link it")


def test_the_readme_links_every_page():
    linked = {(README.parent / target.partition("#")[0]).resolve() for _, _, target in links(README)}
    orphans = [str(page.relative_to(ROOT)) for page in PAGES[1:] if page.resolve() not in linked]
    assert not orphans, f"README.md links none of {orphans}: a page no one can find from the README"


@pytest.mark.parametrize("heading, anchor", [
    ("Speed and scale", "speed-and-scale"),
    ("At scale: `python benchmarks/scale.py --sizes 300 3000`", "at-scale-python-benchmarksscalepy---sizes-300-3000"),
    ("More than one process: `featurize.processes`", "more-than-one-process-featurizeprocesses"),
    ("Sharing: remote storage and the model registry", "sharing-remote-storage-and-the-model-registry"),
    ("Your own dataset, or the full Food-101", "your-own-dataset-or-the-full-food-101"),
    ("Results (EfficientNet-Lite0, 2-core CPU)", "results-efficientnet-lite0-2-core-cpu"),
    ("Ship it: ONNX and a [web page](x.md)", "ship-it-onnx-and-a-web-page"),
    ("snake_case names", "snake_case-names"),
])
def test_anchors_follow_githubs_rule(heading, anchor):
    assert slug(heading) == anchor
