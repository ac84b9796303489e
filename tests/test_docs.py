"""Every Python block of the README and docs/ runs as written, and every relative link resolves.

The Python blocks of one page run in order in one namespace (a later block may use what an
earlier one defined). A block preceded by `<!-- requires: cuda -->` (or mlx, mac) runs only where
that is available; no other block is skipped.
"""

from __future__ import annotations

import importlib.util
import re
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
PAGES = [REPO / "README.md"] + sorted((REPO / "docs").glob("*.md"))
BLOCK = re.compile(r"(?:<!--\s*requires:\s*(?P<needs>[\w, ]+?)\s*-->\s*\n)?^```python\n(?P<code>.*?)^```",
                   re.S | re.M)
LINK = re.compile(r"\]\(([^)\s#]+)(?:#[^)]*)?\)")
WRITTEN_ELSEWHERE = {"docs/install.md"}  # wheels and platforms: another part of the project writes it


def available(need: str) -> bool:
    if need == "mlx":
        return importlib.util.find_spec("mlx") is not None
    if need == "mac":
        return sys.platform == "darwin"
    if need == "cuda":
        import torch

        return torch.cuda.is_available()
    raise ValueError(f"unknown requirement {need!r} in a docs block")


def python_blocks(page: Path):
    """(line number, requirements, code) of every ```python block of a page."""
    text = page.read_text()
    for m in BLOCK.finditer(text):
        needs = [n.strip() for n in (m.group("needs") or "").split(",") if n.strip()]
        yield text.count("\n", 0, m.start("code")) + 1, needs, m.group("code")


PAGES_WITH_CODE = [p for p in PAGES if any(True for _ in python_blocks(p))]


@pytest.mark.parametrize("page", PAGES_WITH_CODE, ids=[str(p.relative_to(REPO)) for p in PAGES_WITH_CODE])
def test_python_blocks_run_as_written(page, monkeypatch, tmp_path):
    monkeypatch.chdir(tmp_path)  # a block that writes files writes them here
    namespace: dict = {"__name__": "__docs__"}
    ran = 0
    for line, needs, code in python_blocks(page):
        missing = [n for n in needs if not available(n)]
        if missing:
            continue
        exec(compile(code, f"{page.name}:{line}", "exec"), namespace)
        ran += 1
    if ran == 0:
        pytest.skip(f"every block of {page.name} needs what this machine lacks")


def test_pages_have_the_blocks_this_test_expects():
    """The README's example and the mixers' snippets are Python blocks (the parser finds them)."""
    assert any("GaussianMixtureAttention" in code for _, _, code in python_blocks(REPO / "README.md"))
    mixers = list(python_blocks(REPO / "docs" / "mixers.md"))
    assert any("build_model" in code for _, needs, code in mixers if not needs)
    assert any(needs == ["mlx"] for _, needs, _ in mixers)


@pytest.mark.parametrize("page", PAGES, ids=[str(p.relative_to(REPO)) for p in PAGES])
def test_relative_links_resolve(page):
    broken = []
    for target in LINK.findall(page.read_text()):
        if re.match(r"[a-z]+:", target):  # http:, https:, mailto:
            continue
        path = (page.parent / target).resolve()
        written_elsewhere = path.is_relative_to(REPO) and path.relative_to(REPO).as_posix() in WRITTEN_ELSEWHERE
        if not path.exists() and not written_elsewhere:
            broken.append(target)
    assert not broken, f"{page.name}: links to missing files {broken}"


def test_readme_starts_with_the_three_commands():
    """CI runs the first two as written; the third is the main job."""
    first = REPO.joinpath("README.md").read_text().split("```")[1].splitlines()
    commands = [line.split("#")[0].strip() for line in first[1:] if line.strip()]
    assert commands[:3] == ['python3.11 -m pip install ".[test]" torch==2.13.0', "python3.11 -m pytest tests -q",
                            "python3.11 benchmarks/compare.py"]
    assert (REPO / "benchmarks" / "compare.py").is_file()
