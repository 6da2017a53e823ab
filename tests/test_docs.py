"""The docs point at what exists: docs/results stays small (issue 25: at most 40 files), every
relative link in the docs opens a file (and a heading, where it names one), every results path
the docs quote is a file or a member of an archive, and every row of benchmarks.md's summary
names its results file."""

from __future__ import annotations

import fnmatch
import json
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"
RESULTS = DOCS / "results"
MAX_RESULTS_FILES = 40

LINK = re.compile(r"!?\[[^\]]*\]\(([^)\s]+)\)")
QUOTED_RESULTS = re.compile(r"`(?:docs/)?results/([^`\s]+)`")


def markdown_files() -> list[Path]:
    return sorted(DOCS.rglob("*.md")) + [ROOT / "README.md", ROOT / "benchmarks" / "README.md"]


def slug(heading: str) -> str:
    """GitHub's anchor of a heading: lower case, punctuation dropped, spaces to hyphens."""
    text = re.sub(r"[^\w\- ]", "", heading.strip().lower())
    return text.replace(" ", "-")


def anchors(md: Path) -> set[str]:
    seen: dict[str, int] = {}
    out = set()
    in_code = False
    for line in md.read_text(encoding="utf-8").splitlines():
        if line.startswith("```"):
            in_code = not in_code
        if in_code or not line.startswith("#"):
            continue
        s = slug(line.lstrip("#"))
        n = seen.get(s, 0)
        seen[s] = n + 1
        out.add(s if n == 0 else f"{s}-{n}")
    return out


def links(md: Path) -> list[str]:
    text = re.sub(r"```.*?```", "", md.read_text(encoding="utf-8"), flags=re.S)
    return [t for t in LINK.findall(text) if not re.match(r"[a-z]+:", t)]


def results_names() -> set[str]:
    """Every results file's name under docs/results: the loose files and the archives' members."""
    names = set()
    for f in RESULTS.rglob("*"):
        if not f.is_file():
            continue
        names.add(f.relative_to(RESULTS).as_posix())
        if f.name.startswith("archive_"):
            names.update(json.loads(f.read_text())["files"])
    return names


def expand_braces(pattern: str) -> list[str]:
    m = re.search(r"\{([^{}]*)\}", pattern)
    if not m:
        return [pattern]
    return [p for alt in m.group(1).split(",") for p in expand_braces(pattern[: m.start()] + alt + pattern[m.end():])]


def test_results_folder_holds_at_most_40_files():
    files = [f for f in RESULTS.rglob("*") if f.is_file()]
    assert len(files) <= MAX_RESULTS_FILES, (
        f"docs/results holds {len(files)} files (at most {MAX_RESULTS_FILES}): fold older runs into an archive "
        "with `python benchmarks/results_archive.py fold`")


@pytest.mark.parametrize("md", markdown_files(), ids=lambda p: p.relative_to(ROOT).as_posix())
def test_every_relative_link_opens_a_file_and_its_heading(md):
    broken = []
    for target in links(md):
        path, _, anchor = target.partition("#")
        dest = (md.parent / path).resolve() if path else md
        if not dest.exists():
            broken.append(f"{target}: no such file")
        elif anchor and dest.suffix == ".md" and anchor not in anchors(dest):
            broken.append(f"{target}: no heading #{anchor} in {dest.name}")
    assert not broken, f"{md.relative_to(ROOT)}: " + "; ".join(broken)


@pytest.mark.parametrize("md", markdown_files(), ids=lambda p: p.relative_to(ROOT).as_posix())
def test_every_quoted_results_path_is_a_file_or_an_archive_member(md):
    names = results_names()
    missing = []
    for quoted in QUOTED_RESULTS.findall(md.read_text(encoding="utf-8")):
        if re.search(r"[<>$]|[A-Z]{4,}", quoted) or quoted.endswith("/"):
            continue  # placeholders (`acdc_1000_<method>.json`, `$OUT`, `METHOD`) and folders
        for pattern in expand_braces(quoted):
            if not any(fnmatch.fnmatchcase(n, pattern) for n in names):
                missing.append(pattern)
    assert not missing, f"{md.relative_to(ROOT)} quotes results that are neither files nor archive members: {missing}"


def test_every_row_of_the_benchmark_summary_names_its_results_file():
    text = (DOCS / "benchmarks.md").read_text(encoding="utf-8")
    summary = text.split("## What to expect", 1)[1].split("\n## ", 1)[0]
    rows = [r for r in summary.splitlines() if r.startswith("|") and not r.startswith("|---")]
    data_rows = [r for r in rows if "K = 2" not in r]  # the header rows
    assert len(data_rows) >= 8
    for row in data_rows:
        last = row.strip().strip("|").split("|")[-1]
        targets = LINK.findall(last)
        assert targets or "no file" in last, f"summary row without its results file: {row}"
        for t in targets:
            assert (DOCS / t).is_file(), f"{t} (summary row {row[:60]}...) does not exist"
