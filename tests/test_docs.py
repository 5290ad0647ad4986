"""The docs match the tree: links resolve inside the repository, named paths exist, nothing points into
../shared except the optional data folder, and every `formulation.md section N` citation names a section
of docs/formulation.md."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from moetuner import PROJECT_ROOT

DOCS = sorted([PROJECT_ROOT / "README.md", *(PROJECT_ROOT / "docs").glob("*.md"),
               *(PROJECT_ROOT / "data").rglob("README.md")])
CODE_DIRS = ("moetuner", "benchmarks", "conf", "workflow")
CODE_SUFFIXES = {".py", ".yaml", ".smk", ".rst", ".sh", ".toml", ".txt"}
FORMULATION = PROJECT_ROOT / "docs" / "formulation.md"
CITATION = re.compile(r"formulation\.md,? sections? (\d+(?:\.\d+)?)")
LINK = re.compile(r"(?<!!)\[[^\]]*\]\(([^)\s]+)\)")
PATH_IN_CODE_SPAN = re.compile(r"`((?:moetuner|conf|workflow|benchmarks|tests|data|docs)/[\w./-]*)`")


def without_code_blocks(text: str) -> str:
    return re.sub(r"^```.*?^```", "", text, flags=re.S | re.M)


def prose(text: str) -> str:
    """Markdown without fenced code blocks and inline code spans (links there are not links)."""
    return re.sub(r"`[^`\n]*`", "", without_code_blocks(text))


def slug(heading: str) -> str:
    """GitHub's anchor of a heading: lower case, punctuation dropped, spaces to hyphens."""
    text = heading.strip().lower().replace("`", "")
    return re.sub(r"[^\w\- ]", "", text).replace(" ", "-")


def anchors(path: Path) -> set[str]:
    text = without_code_blocks(path.read_text())
    return {slug(m.group(1)) for m in re.finditer(r"^#{1,6} (.+)$", text, flags=re.M)}


def code_files() -> list[Path]:
    files = [PROJECT_ROOT / name for name in ("Snakefile", "bootstrap.sh", "requirements.txt", "pyproject.toml")]
    for folder in CODE_DIRS:
        files += [p for p in (PROJECT_ROOT / folder).rglob("*") if p.suffix in CODE_SUFFIXES and p.is_file()]
    return [p for p in files if "__pycache__" not in p.parts]


def formulation_sections() -> set[str]:
    """Section numbers of docs/formulation.md headings: `## 3. Cost model` -> 3, `### 3.2 ...` -> 3.2."""
    found = re.findall(r"^#{2,3} (\d+(?:\.\d+)?)\.? ", FORMULATION.read_text(), flags=re.M)
    return set(found)


@pytest.mark.parametrize("doc", DOCS, ids=lambda p: str(p.relative_to(PROJECT_ROOT)))
def test_relative_links_resolve_inside_the_repository(doc: Path) -> None:
    for target in LINK.findall(prose(doc.read_text())):
        if re.match(r"[a-z]+:", target):  # http(s), mailto
            continue
        file_part, _, fragment = target.partition("#")
        path = (doc.parent / file_part).resolve() if file_part else doc
        assert path.is_relative_to(PROJECT_ROOT), f"{doc.name}: link {target!r} leaves the repository"
        assert path.exists(), f"{doc.name}: link {target!r} points to a missing file"
        if fragment and path.suffix == ".md":
            assert fragment in anchors(path), f"{doc.name}: link {target!r}: no heading with that anchor"


@pytest.mark.parametrize("doc", [d for d in DOCS if d.parent != PROJECT_ROOT / "data" / "published"],
                         ids=lambda p: str(p.relative_to(PROJECT_ROOT)))
def test_repository_paths_named_in_docs_exist(doc: Path) -> None:
    """Paths of this repository named in code spans exist (data/published/README.md names other
    repositories' paths)."""
    for path in PATH_IN_CODE_SPAN.findall(doc.read_text()):
        assert (PROJECT_ROOT / path.rstrip(".")).exists(), f"{doc.name} names `{path}`, which is not in the tree"


def test_shared_is_named_only_as_the_optional_data_folder() -> None:
    """A clone has no ../shared: docs and code may name ../shared/data (the optional `shared_data`
    folder of raw dumps), never anything else there, and no Markdown link may point into it."""
    for path in [*DOCS, *code_files()]:
        text = path.read_text()
        others = re.findall(r"\.\./shared(?!/data)\S*", text)
        assert not others, f"{path.relative_to(PROJECT_ROOT)} points into ../shared: {others}"
        if path.suffix == ".md":
            assert not [t for t in LINK.findall(text) if "shared/" in t], \
                f"{path.relative_to(PROJECT_ROOT)} links into ../shared"


def test_formulation_citations_name_existing_sections() -> None:
    sections = formulation_sections()
    assert {"1", "2", "3", "3.1", "3.2", "3.3", "3.4", "4", "5", "6", "7"} <= sections
    cited = []
    for path in code_files():
        text = path.read_text()
        for match in re.finditer(r"(\S*)formulation\.md", text):
            assert match.group(1).endswith("docs/"), \
                f"{path.relative_to(PROJECT_ROOT)} cites {match.group(0)!r}; cite docs/formulation.md"
        cited += [(path, number) for number in CITATION.findall(text)]
    for path in DOCS:
        cited += [(path, number) for number in CITATION.findall(path.read_text())]
    assert len({p for p, _ in cited if p.suffix == ".py"}) >= 5, "the cost model and solvers cite the formulation"
    missing = [(str(p.relative_to(PROJECT_ROOT)), n) for p, n in cited if n not in sections]
    assert not missing, f"citations of sections docs/formulation.md does not have: {missing}"


def test_readme_layout_names_every_module_package_and_config_group() -> None:
    readme = (PROJECT_ROOT / "README.md").read_text()
    layout = readme[readme.index("## Layout"):]
    package = PROJECT_ROOT / "moetuner"
    expected = [[f"`{p.name}`", f"`moetuner/{p.name}`"] for p in sorted(package.glob("*.py")) if p.name != "__init__.py"]
    expected += [[f"`moetuner/{p.name}/`"] for p in sorted(package.iterdir()) if p.is_dir() and any(p.glob("*.py"))]
    expected += [[f"`{p.name}/"] for p in sorted((PROJECT_ROOT / "conf").iterdir()) if p.is_dir()]
    expected += [[f"`workflow/{p.name}/"] for p in sorted((PROJECT_ROOT / "workflow").iterdir()) if p.is_dir()]
    assert len(expected) > 20
    missing = [names[0] for names in expected if not any(name in layout for name in names)]
    assert not missing, f"README's layout table does not name {missing}"
