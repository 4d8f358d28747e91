"""The design the code refers to lives in the repository (issue 17, item 6).

- No file of the project points outside the repository for its design or references.
- Every page under ``docs/`` that the code, the benchmarks, the tests, the configs or the README
  cite exists.
- ``docs/design.md``'s layout section names every module of ``src/feddistill`` and ``bench``, and
  only modules that exist, so the layout stays true as modules come and go.
"""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"
DESIGN = DOCS / "design.md"

# Built from pieces so that this file does not contain them itself.
SHARED = "shared"
FORBIDDEN = (".." + "/" + SHARED, "/work" + "/" + SHARED)

SCANNED = ("src", "bench", "tests", "scripts", "configs", "README.md")
BUILD_OUTPUTS = ("__pycache__", ".pytest_cache", ".hypothesis")  # plus *.egg-info: generated, never edited

DOC_CITATION = re.compile(r"(?<![\w./-])docs/[\w./-]+?\.md")
LAYOUT_HEADING = "## Package layout"
LAYOUT_ENTRY = re.compile(r"`((?:feddistill|bench)(?:/\w+)*(?:\.py|/))`")


def project_files(*tops: str) -> list[Path]:
    """Every file under ``tops`` (files or folders of the repository), build outputs left out."""
    found: list[Path] = []
    for top in tops:
        path = ROOT / top
        if path.is_file():
            found.append(path)
            continue
        for file in sorted(path.rglob("*")):
            parts = file.relative_to(ROOT).parts
            if not file.is_file() or any(p in BUILD_OUTPUTS or p.endswith(".egg-info") for p in parts):
                continue
            found.append(file)
    return found


def test_nothing_points_outside_the_repository():
    offenders = []
    for file in project_files(*SCANNED):
        data = file.read_bytes()
        offenders += [f"{file.relative_to(ROOT)}: {bad}" for bad in FORBIDDEN if bad.encode() in data]
    assert not offenders, "the design and references live in docs/, not outside the repository:\n" + "\n".join(
        offenders
    )


def test_cited_docs_exist():
    cited: dict[str, set[str]] = {}
    for file in project_files(*SCANNED):
        if file.suffix not in (".py", ".md", ".toml", ".sh"):
            continue
        for path in DOC_CITATION.findall(file.read_text(encoding="utf-8")):
            cited.setdefault(path, set()).add(str(file.relative_to(ROOT)))
    assert "docs/design.md" in cited  # the code does cite its design
    missing = {path: sorted(where) for path, where in cited.items() if not (ROOT / path).is_file()}
    assert not missing, f"cited but not in the repository: {missing}"


def test_links_between_docs_resolve():
    for page in sorted(DOCS.glob("*.md")):
        for target in re.findall(r"\]\(([^)#:]+\.md)\)", page.read_text(encoding="utf-8")):
            assert (page.parent / target).is_file(), f"{page.name} links to missing {target}"


def layout_section() -> str:
    text = DESIGN.read_text(encoding="utf-8")
    assert LAYOUT_HEADING in text, f"docs/design.md has no {LAYOUT_HEADING!r} section"
    section = text.split(LAYOUT_HEADING, 1)[1]
    return section.split("\n## ", 1)[0]


def modules(base: Path, package: str) -> list[str]:
    """Paths of every module of ``package`` relative to ``base``; a package's ``__init__.py``
    as the package folder (``feddistill/client/``)."""
    found = []
    for path in sorted((base / package).rglob("*.py")):
        if "__pycache__" in path.parts:
            continue
        rel = path.relative_to(base).as_posix()
        found.append(rel[: -len("__init__.py")] if path.name == "__init__.py" else rel)
    return found


def test_layout_names_every_module():
    listed = set(LAYOUT_ENTRY.findall(layout_section()))
    wanted = modules(ROOT / "src", "feddistill") + modules(ROOT, "bench")
    unlisted = [m for m in wanted if m not in listed and f"{m}__init__.py" not in listed]
    assert not unlisted, f"docs/design.md, {LAYOUT_HEADING!r}: add one line for each of {unlisted}"


def test_layout_names_only_modules_that_exist():
    listed = LAYOUT_ENTRY.findall(layout_section())
    assert listed
    gone = [m for m in listed if not ((ROOT / "src" / m).exists() or (ROOT / m).exists())]
    assert not gone, f"docs/design.md, {LAYOUT_HEADING!r} names modules that no longer exist: {gone}"
