"""The documentation site's API reference covers the public names; the README stays a short page whose links
resolve. (`mkdocs build --strict`, in the README's test command, checks the rest: links, docstring references,
notebooks.)"""

import re
from pathlib import Path

import mmdit_probe

ROOT = Path(__file__).resolve().parents[1]


def documented_names() -> set[str]:
    """The last component of every `::: module.name` directive in the API reference pages."""
    text = "\n".join(p.read_text() for p in (ROOT / "docs" / "api").glob("*.md"))
    return {path.rsplit(".", 1)[-1] for path in re.findall(r"^::: ([\w.]+)", text, flags=re.M)}


def test_every_public_name_is_in_the_api_reference():
    missing = sorted(set(mmdit_probe.__all__) - documented_names())
    assert not missing, f"add these to docs/api/index.md: {missing}"


def test_readme_is_short_and_its_links_resolve():
    readme = (ROOT / "README.md").read_text()
    assert len(readme.splitlines()) < 200
    links = [t for t in re.findall(r"\]\(([^)#\s]+)", readme) if not t.startswith(("http://", "https://"))]
    assert links, "the README links to the documentation pages"
    missing = [t for t in links if not (ROOT / t).exists()]
    assert not missing, f"README links to missing files: {missing}"
