"""The documentation: the site builds strictly (a broken link or a page left out of the
navigation fails), and README stays a front door whose links lead somewhere."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

from tests.conftest import ROOT


def build(config: Path, out: Path) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "-f", str(config), "-d", str(out)],
        capture_output=True,
        text=True,
        timeout=300,
    )


def test_the_documentation_site_builds_strictly(tmp_path):
    result = build(ROOT / "mkdocs.yml", tmp_path / "site")
    assert result.returncode == 0, result.stdout + result.stderr
    assert (tmp_path / "site" / "architecture" / "index.html").is_file()


def test_a_broken_link_or_a_page_missing_from_the_navigation_fails_the_build(tmp_path):
    for broken in ("[gone](no-such-page.md)", None):
        copy = tmp_path / ("link" if broken else "orphan")
        shutil.copytree(ROOT / "docs", copy / "docs")
        shutil.copy(ROOT / "mkdocs.yml", copy / "mkdocs.yml")
        if broken:
            page = copy / "docs" / "status.md"
            page.write_text(page.read_text() + f"\n{broken}\n")
        else:
            (copy / "docs" / "orphan.md").write_text("# not in the navigation\n")
        result = build(copy / "mkdocs.yml", copy / "site")
        assert result.returncode != 0, f"{broken or 'orphan page'} did not fail the build"
        assert ("no-such-page.md" if broken else "orphan.md") in result.stdout + result.stderr


def test_readme_is_a_short_front_door_whose_links_exist():
    text = (ROOT / "README.md").read_text()
    assert len(text.splitlines()) <= 250, "README grew: move detail into a docs/ page"
    quick = text.split("## Quick start", 1)[1].split("```", 2)[1]
    commands = [line.split("#")[0].strip() for line in quick.splitlines()[1:] if line.strip()]
    assert commands == ["bash scripts/demo.sh", "bash scripts/test.sh"], commands
    for target in re.findall(r"\]\(([^)#]+)\)", text):
        if not target.startswith("http"):
            assert (ROOT / target).exists(), f"README links to {target}, which does not exist"


def test_the_fault_table_names_only_tests_that_exist():
    page = (ROOT / "docs" / "faults.md").read_text()
    sources = {path: path.read_text() for path in (ROOT / "tests").rglob("test_*.py")}
    named = re.findall(r"`(tests/[\w/]+\.py)(?:::(\w+))?`", page)
    assert len(named) > 20
    for path, test in named:
        assert (ROOT / path).is_file(), f"docs/faults.md names {path}, which does not exist"
        if test:
            assert f"def {test}(" in sources[ROOT / path], f"{path} has no {test}"
    for test in re.findall(r"`(test_\w+)`", page):
        assert any(f"def {test}(" in text for text in sources.values()), f"no test {test}"
