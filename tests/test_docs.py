"""The README and docs/ stay navigable: every relative link and image resolves, anchors included, and the
README stays short (the details live in docs/, one page per task)."""

from __future__ import annotations

import re
import shlex
import unicodedata
from pathlib import Path
from urllib.parse import unquote

import pytest
import yaml

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


# --- the docs stay true to the code: names they give exist ----------------------------------------------------

PARAMS = yaml.safe_load((ROOT / "params.yaml").read_text())
STAGES = yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"]
PACKAGE = ROOT / "src" / "foodvision"
# a params key as the docs write it: `-S train.lr=0.01`, `train.augment: true`, `seed`
SET_PARAM = re.compile(r"(?:-S|--set-param)\s+['\"]?\+?([a-z_][a-z0-9_.]*)=")
SPAN_KEY = re.compile(r"^([a-z_][a-z0-9_]*(?:\.[a-z_][a-z0-9_]*)+):(?:\s|$)")
# a file of the repository: a folder of the source tree, then a path
SOURCE_PATH = re.compile(r"(?<![\w./-])((?:src|stages|tests|benchmarks|docs|\.ci)/[\w./-]*\w)(?:::(\w+))?")
ROOT_FILES = ("dvc.yaml", "params.yaml", "pyproject.toml", "requirements.lock", "package.json", "package-lock.json")
DVC_RUN = re.compile(r"dvc (?:repro|exp run)([^`|;&#\n]*)")
# options of `dvc repro` / `dvc exp run` that take a value (the value is not a stage)
VALUE_OPTIONS = {"-S", "--set-param", "-n", "--name", "-j", "--jobs", "-m", "--message", "--temp-dir"}
MODULE = re.compile(r"(?<![\w/])foodvision((?:\.\w+)+)")


def texts(page: Path) -> list[tuple[int, str]]:
    """(line, text) of every line of the page, code blocks included: commands live there."""
    return list(enumerate(page.read_text(encoding="utf-8").splitlines(), start=1))


def code_spans(page: Path) -> list[tuple[int, str]]:
    return [(n, m.group(2).strip()) for n, line in prose_lines(page) for m in CODE_SPAN.finditer(line)]


def is_param(key: str) -> bool:
    node = PARAMS
    for part in key.split("."):
        if not isinstance(node, dict) or part not in node:
            return False
        node = node[part]
    return True


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(ROOT)))
def test_every_params_key_the_docs_name_exists(page):
    """`-S key=...` in any command, and `key: value` in a code span, name keys of params.yaml."""
    named = [(n, m.group(1)) for n, line in texts(page) for m in SET_PARAM.finditer(line)]
    named += [(n, m.group(1)) for n, span in code_spans(page) if (m := SPAN_KEY.match(span))
              and m.group(1).split(".")[0] in PARAMS]
    # dotted keys: a bare word such as `-S key=value` is a placeholder (top-level keys are few and shown whole)
    wrong = [f"{page.relative_to(ROOT)}:{n}: {key}" for n, key in named if "." in key and not is_param(key)]
    assert not wrong, "params keys not in params.yaml:\n" + "\n".join(wrong)


def test_a_misspelled_key_is_caught():
    assert is_param("train.epochs") and is_param("seed") and not is_param("train.epoch")
    assert SET_PARAM.findall("dvc exp run -S 'train.epoch=3' -S +model.dropout=0.3") == ["train.epoch", "model.dropout"]
    assert SPAN_KEY.match("data.val_fraction: 0").group(1) == "data.val_fraction"


def defined_names(module: Path) -> set[str]:
    import ast

    tree = ast.parse(module.read_text())
    names = set()
    for node in tree.body:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            names.add(node.name)
        elif isinstance(node, (ast.Assign, ast.AnnAssign)):
            targets = node.targets if isinstance(node, ast.Assign) else [node.target]
            names |= {t.id for t in targets if isinstance(t, ast.Name)}
        elif isinstance(node, ast.ImportFrom):
            names |= {a.asname or a.name for a in node.names}
    return names


def missing_path(page: Path, rel: str, function: str | None) -> str | None:
    path = ROOT / rel
    if not path.exists() and not (page.parent / rel).exists():
        return f"{rel} does not exist"
    if function and function not in defined_names(path):
        return f"{rel} has no {function}"
    return None


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(ROOT)))
def test_every_source_file_the_docs_name_exists(page):
    """src/…, stages/…, tests/… (with ::test names), benchmarks/…, docs/… named anywhere on the page."""
    wrong = [f"{page.relative_to(ROOT)}:{n}: {problem}" for n, line in texts(page)
             for m in SOURCE_PATH.finditer(line) if (problem := missing_path(page, m.group(1), m.group(2)))]
    assert not wrong, "named but missing:\n" + "\n".join(wrong)


def missing_module(dotted: str) -> str | None:
    """`.featurize.featurize` (after `foodvision`): the longest prefix that is a module, then a name it defines."""
    parts = dotted.strip(".").split(".")
    for cut in range(len(parts), 0, -1):
        base = PACKAGE.joinpath(*parts[:cut])
        module = base.with_suffix(".py") if base.with_suffix(".py").is_file() else base / "__init__.py"
        if module.is_file():
            rest = parts[cut:]
            if rest and rest[0] not in defined_names(module):
                return f"foodvision{dotted}: {module.relative_to(ROOT)} defines no {rest[0]}"
            return None
    return f"foodvision{dotted}: no such module"


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(ROOT)))
def test_every_module_and_function_the_docs_name_exists(page):
    wrong = [f"{page.relative_to(ROOT)}:{n}: {problem}" for n, span in code_spans(page)
             for m in MODULE.finditer(span) if (problem := missing_module(m.group(1)))]
    assert not wrong, "\n".join(wrong)


def stage_args(args: str) -> list[str]:
    """The positional arguments of a `dvc repro` / `dvc exp run`: stage names (or dvc.yaml:stage)."""
    try:
        words = shlex.split(args)
    except ValueError:  # a quote the line does not close
        words = args.split()
    found, skip = [], False
    for word in words:
        if skip:
            skip = False
        elif word.startswith("-"):
            skip = word in VALUE_OPTIONS
        elif word != "\\" and not word.startswith(("$", "<")):
            found.append(word.split(":")[-1])
    return found


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(ROOT)))
def test_every_stage_the_docs_run_exists(page):
    wrong = [f"{page.relative_to(ROOT)}:{n}: {name}" for n, line in texts(page)
             for m in DVC_RUN.finditer(line) for name in stage_args(m.group(1))
             if name not in STAGES and name != "dvc.yaml"]
    assert not wrong, "stages not in dvc.yaml:\n" + "\n".join(wrong)


def test_the_layout_lists_every_module_of_the_package():
    """docs/development.md's layout names each module of src/foodvision, and only those."""
    text = (ROOT / "docs" / "development.md").read_text()
    block = text[text.index("src/foodvision/        the library"):text.index("stages/                one thin")]
    named = set(re.findall(r"(?<![\w/])([a-z_0-9]+\.py)\b", block))
    actual = {p.name for p in PACKAGE.rglob("*.py") if p.name != "__init__.py"}
    assert named == actual, f"layout lists {sorted(named - actual)} that do not exist, omits {sorted(actual - named)}"
