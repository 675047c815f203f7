"""The import layers of docs/architecture.md, enforced: every import in raykd/ (module level, inside
functions and under TYPE_CHECKING alike) points down or sideways, and no forbidden edge exists."""

from __future__ import annotations

import ast
import fnmatch
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DOC = ROOT / "docs" / "architecture.md"


def _table(name: str) -> list[list[str]]:
    text = DOC.read_text(encoding="utf-8")
    m = re.search(rf"<!-- {name} -->\n(.*?)<!-- /{name} -->", text, re.S)
    assert m, f"docs/architecture.md has no <!-- {name} --> table"
    rows = [ln for ln in m.group(1).splitlines() if ln.startswith("|") and not ln.startswith("|---")][1:]
    return [[c.strip() for c in ln.strip().strip("|").split("|")] for ln in rows]


def _names(cell: str) -> list[str]:
    return re.findall(r"`([^`]+)`", cell)


def layers() -> dict[str, int]:
    """Module prefix -> layer number."""
    return {name: int(row[0]) for row in _table("layers") for name in _names(row[1])}


def forbidden() -> list[tuple[list[str], list[str], list[str]]]:
    return [(_names(r[0]), _names(r[1]), _names(r[2])) for r in _table("forbidden")]


def module_name(path: Path) -> str:
    rel = path.relative_to(ROOT).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def imports_of(path: Path) -> set[str]:
    """Every raykd module ``path`` imports (``from raykd.x import y`` counts as raykd.x, and as
    raykd.x.y when that is a module)."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    out: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out.update(a.name for a in node.names if a.name.split(".")[0] == "raykd")
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            if node.module.split(".")[0] != "raykd":
                continue
            out.add(node.module)
            for a in node.names:
                sub = ROOT / Path(*f"{node.module}.{a.name}".split("."))
                if sub.with_suffix(".py").exists() or (sub / "__init__.py").exists():
                    out.add(f"{node.module}.{a.name}")
    return out


def layer_of(module: str, table: dict[str, int]) -> int | None:
    best = None
    for prefix, layer in table.items():
        if module == prefix or module.startswith(prefix + "."):
            if best is None or len(prefix) > len(best[0]):
                best = (prefix, layer)
    return None if best is None else best[1]


SOURCES = sorted((ROOT / "raykd").rglob("*.py"))


def test_every_module_has_a_layer():
    table = layers()
    missing = [module_name(p) for p in SOURCES if layer_of(module_name(p), table) is None]
    assert not missing, f"add these to the layers table of docs/architecture.md: {missing}"


@pytest.mark.parametrize("path", SOURCES, ids=lambda p: module_name(p))
def test_imports_point_down(path):
    table = layers()
    src = module_name(path)
    mine = layer_of(src, table)
    up = sorted(dst for dst in imports_of(path) if (layer_of(dst, table) or 0) > mine)
    assert not up, f"{src} (layer {mine}) imports upward: {up}"
    bad = []
    for froms, tos, excepts in forbidden():
        if not any(fnmatch.fnmatch(src, f) for f in froms):
            continue
        for dst in imports_of(path):
            if dst == src or dst in excepts:
                continue
            if any(fnmatch.fnmatch(dst, t) for t in tos):
                bad.append(dst)
    assert not bad, f"{src} imports what docs/architecture.md forbids: {sorted(bad)}"


def test_the_checker_sees_a_violation(tmp_path):
    """The rules bite: a method importing a sibling or the training layer is caught."""
    table = layers()
    assert layer_of("raykd.train.loop", table) > layer_of("raykd.methods.fixmatch", table)
    sibling = [t for f, t, e in forbidden() if "raykd.methods.*" in f]
    assert sibling and any(fnmatch.fnmatch("raykd.methods.fixmatch", p) for p in sibling[0])
    assert "raykd.methods.common" in forbidden()[0][2]


def test_no_docstring_cites_a_document_outside_the_repository():
    outside = re.compile(r"METHODS\.md|RAY\.md|DESIGN\.md|STYLE\.md|shared/")
    hits = [f"{module_name(p)}: {m.group(0)}" for p in SOURCES for m in outside.finditer(p.read_text())]
    assert not hits, hits


def test_no_shipped_file_cites_a_document_outside_the_repository():
    """Study files, docs, README, benchmarks and tests ship; the design notes they were written from do not."""
    root = Path(__file__).resolve().parents[1]
    outside = re.compile(r"\b(METHODS|RAY|DESIGN|STYLE)\.md")
    shipped = [root / "README.md", *root.glob("docs/*.md"), *root.glob("studies/*.yaml"), *root.glob("benchmarks/*.py"),
               *root.glob("tests/*.py")]
    shipped.remove(Path(__file__).resolve())  # the patterns themselves
    hits = [f"{p.relative_to(root)}: {m.group(0)}" for p in shipped for m in outside.finditer(p.read_text())]
    assert not hits, hits
