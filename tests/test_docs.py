"""The reference docs are generated from the code; these tests keep them current."""

import importlib.util
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _generator():
    spec = importlib.util.spec_from_file_location("generate_reference", ROOT / "docs" / "generate_reference.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize(("name", "builder"), [("config.md", "config_markdown"), ("cli.md", "cli_markdown")])
def test_reference_docs_are_up_to_date(name, builder):
    expected = getattr(_generator(), builder)()
    actual = (ROOT / "docs" / name).read_text(encoding="utf-8")
    assert actual == expected, f"docs/{name} is stale: run .venv/bin/python docs/generate_reference.py"


def test_every_config_field_is_in_the_config_reference():
    from medseg.config import field_docs

    text = (ROOT / "docs" / "config.md").read_text(encoding="utf-8")
    missing = [key for key, *_ in field_docs() if f"`{key}`" not in text]
    assert not missing


# --------------------------------------------------------------------------- coverage of the hand-written docs

import ast  # noqa: E402
import importlib  # noqa: E402
import re  # noqa: E402

DOCS = ROOT / "docs"
_LINK = re.compile(r"(?<!!)\[[^\]]*\]\(([^)\s]+)\)")
_FENCE = re.compile(r"^(```|~~~)")


def _prose_lines(text: str) -> list[str]:
    """Lines outside fenced code blocks."""
    out, fenced = [], False
    for line in text.splitlines():
        if _FENCE.match(line.strip()):
            fenced = not fenced
            continue
        if not fenced:
            out.append(line)
    return out


def _links(path: Path) -> list[str]:
    """Relative link targets in a Markdown file (outside code blocks and inline code)."""
    targets = []
    for line in _prose_lines(path.read_text(encoding="utf-8")):
        line = re.sub(r"`[^`]*`", "", line)
        targets += [t for t in _LINK.findall(line) if not re.match(r"^[a-z]+:", t)]
    return targets


def _anchors(path: Path) -> set[str]:
    """GitHub's heading anchors: lower case, punctuation dropped, spaces to '-', duplicates numbered."""
    seen: dict[str, int] = {}
    anchors = set()
    for line in _prose_lines(path.read_text(encoding="utf-8")):
        m = re.match(r"^#{1,6}\s+(.*?)\s*#*\s*$", line)
        if not m:
            continue
        slug = re.sub(r"[^\w\- ]", "", m.group(1).strip().lower()).replace(" ", "-")
        n = seen.get(slug, 0)
        seen[slug] = n + 1
        anchors.add(slug if n == 0 else f"{slug}-{n}")
    return anchors


def _doc_pages() -> list[Path]:
    return sorted(DOCS.glob("*.md"))


def test_every_docs_page_linked_from_the_readme_exists():
    linked = [t.split("#")[0] for t in _links(ROOT / "README.md") if t.startswith("docs/")]
    assert linked, "README.md links no docs page"
    missing = sorted({t for t in linked if not (ROOT / t).is_file()})
    assert not missing, f"README.md links missing pages: {missing}"


def test_the_readme_and_the_docs_index_link_every_docs_page():
    pages = {p.name for p in _doc_pages()} - {"README.md"}
    readme = {Path(t.split("#")[0]).name for t in _links(ROOT / "README.md") if t.startswith("docs/")}
    index = {t.split("#")[0] for t in _links(DOCS / "README.md")}
    assert not pages - readme, f"pages missing from README.md's docs index: {sorted(pages - readme)}"
    assert not pages - index, f"pages missing from docs/README.md: {sorted(pages - index)}"


@pytest.mark.parametrize("page", [ROOT / "README.md", *_doc_pages()], ids=lambda p: p.name)
def test_relative_links_and_anchors_resolve(page):
    broken = []
    for target in _links(page):
        file_part, _, anchor = target.partition("#")
        dest = (page.parent / file_part).resolve() if file_part else page
        if not dest.exists():
            broken.append(f"{target} (no such file)")
        elif anchor and dest.suffix == ".md" and anchor not in _anchors(dest):
            broken.append(f"{target} (no heading #{anchor} in {dest.name})")
    assert not broken, f"{page.name}: broken links: {broken}"


def test_every_error_class_is_in_troubleshooting():
    tree = ast.parse((ROOT / "medseg" / "errors.py").read_text(encoding="utf-8"))
    classes = [node.name for node in tree.body if isinstance(node, ast.ClassDef)]
    assert "MedsegError" in classes
    headings = set(_anchors(DOCS / "troubleshooting.md"))
    missing = [name for name in classes if name.lower() not in headings]
    assert not missing, f"docs/troubleshooting.md has no '## `Name`' section for: {missing}"


@pytest.mark.parametrize(
    ("module", "page"),
    [
        ("medseg", "python_api.md"),
        ("medseg.device", "python_api.md"),
        ("medseg.io", "python_api.md"),
        ("medseg.data", "python_api.md"),
        ("medseg.models", "python_api.md"),
        ("medseg.losses", "python_api.md"),
        ("medseg.metrics", "python_api.md"),
        ("medseg.evaluation", "python_api.md"),
        ("medseg.training.run", "python_api.md"),
        ("medseg.inference.segmenter", "python_api.md"),
        ("medseg.demo", "python_api.md"),
    ],
)
def test_every_public_name_is_in_the_python_api_page(module, page):
    text = (DOCS / page).read_text(encoding="utf-8")
    code_spans = " ".join(re.findall(r"`[^`\n]+`", text) + re.findall(r"```python\n(.*?)```", text, re.S))
    names = importlib.import_module(module).__all__
    missing = [n for n in names if not re.search(rf"(?<![\w.]){re.escape(n)}\b|\.{re.escape(n)}\b", code_spans)]
    assert not missing, f"{module}.__all__ names missing from docs/{page}: {missing}"
