"""The tree shows the roles (docs/architecture.md), and the docs hold together: imports go one way, the
method stays apart from orchestration, the public API is where the README says, and every link resolves."""

import ast
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def _imports(path: Path) -> set[str]:
    names = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
    for node in ast.walk(ast.parse(path.read_text(), str(path))):  # importlib.import_module("...") strings
        if (
            isinstance(node, ast.Constant)
            and isinstance(node.value, str)
            and re.fullmatch(r"[a-z_.]+", node.value)
        ):
            names.add(node.value)
    return names


def _modules(folder: str) -> list[Path]:
    return sorted((ROOT / folder).rglob("*.py"))


def test_factory_never_imports_trainers():
    bad = {
        str(p.relative_to(ROOT)): sorted(
            n for n in _imports(p) if n == "trainers" or n.startswith("trainers.")
        )
        for p in _modules("factory")
    }
    assert not {k: v for k, v in bad.items() if v}


def test_the_method_does_not_import_ray_and_the_dataset_factory_does_not_import_diffusers():
    method = {
        str(p.relative_to(ROOT))
        for p in _modules("factory/method")
        if any(n == "ray" or n.startswith("ray.") for n in _imports(p))
    }
    dataset = {
        str(p.relative_to(ROOT))
        for p in _modules("factory/dataset")
        if any(n.split(".")[0] in ("diffusers", "transformers") for n in _imports(p))
    }
    assert not method, f"model-facing modules that import Ray: {method}"
    assert not dataset, f"orchestration modules that import diffusers: {dataset}"


def test_the_public_api_imports_from_the_top_level():
    import factory

    for name in factory.__all__:
        assert getattr(factory, name) is not None
    from factory import Concept, Distiller, SampleSpec, load_pipeline, run_job  # noqa: F401

    with pytest.raises(AttributeError):
        factory.no_such_name  # noqa: B018


def test_readme_fits_on_a_screen_and_links_into_docs():
    readme = (ROOT / "README.md").read_text()
    assert len(readme.splitlines()) <= 250
    for page in (
        "architecture",
        "method",
        "factory",
        "finetune",
        "students",
        "toyworld",
        "results",
        "development",
    ):
        assert f"docs/{page}.md" in readme


def _links(md: Path):
    text = md.read_text()
    text = re.sub(r"```.*?```", "", text, flags=re.S)  # links inside code blocks are not links
    for target in re.findall(r"\]\(([^)\s]+)\)", text):
        if not re.match(r"[a-z]+://", target):
            yield target


def _anchors(md: Path) -> set[str]:
    """GitHub's heading anchors: lower case, punctuation dropped, spaces to hyphens."""
    out = set()
    for line in md.read_text().splitlines():
        m = re.match(r"#+ (.*)", line)
        if m:
            out.add(re.sub(r"[^\w\- ]", "", m.group(1).strip().lower()).replace(" ", "-"))
    return out


def test_every_link_in_the_readme_and_docs_resolves():
    pages = [
        ROOT / "README.md",
        ROOT / "CONTRIBUTING.md",
        ROOT / "CHANGELOG.md",
        *sorted((ROOT / "docs").glob("*.md")),
    ]
    broken = []
    for md in pages:
        for target in _links(md):
            path, _, anchor = target.partition("#")
            dest = (md.parent / path).resolve() if path else md
            if not dest.exists():
                broken.append(f"{md.relative_to(ROOT)}: {target}")
            elif anchor and dest.suffix == ".md" and anchor not in _anchors(dest):
                broken.append(f"{md.relative_to(ROOT)}: {target} (no such heading)")
    assert not broken, broken
