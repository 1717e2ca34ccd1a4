"""The user docs: the CLI reference is current, every docs page is reachable from the README, every
link and anchor resolves, and every code block marked ``<!-- runnable -->`` runs as written."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from tests.docs_blocks import runnable_blocks

ROOT = Path(__file__).resolve().parent.parent
LINK = re.compile(r"\]\(((?:docs/)?[\w./-]+\.md)(?:#[\w-]*)?\)")
ANCHORED = re.compile(r"\]\(([\w./-]+\.md)?#([\w-]+)\)")
FENCED = re.compile(r"^```.*?^```", re.MULTILINE | re.DOTALL)
# Pages whose runnable blocks another test runs (tests/integrations/test_diffusers.py).
RUN_ELSEWHERE = {"docs/diffusers.md"}
# What a block may use from the checkout, linked into its temporary directory: the docs' commands are
# written as run from the repository root (python jobs/..., cluster/aws.yaml).
LINKED = ("jobs", "cluster", "configs", "scripts")
BLOCK_TIMEOUT_S = 600


def test_cli_reference_is_current():
    run = subprocess.run([sys.executable, "scripts/cli_reference.py", "--check"], cwd=ROOT,
                         capture_output=True, text=True)  # fmt: skip
    assert run.returncode == 0, run.stdout + run.stderr[-2000:]


def _links(page: Path) -> set[Path]:
    return {(page.parent / m).resolve() for m in LINK.findall(page.read_text())}


def test_every_docs_page_is_reachable_from_the_readme():
    seen, todo = set(), [ROOT / "README.md"]
    while todo:
        page = todo.pop()
        for target in _links(page):
            assert target.exists(), f"{page.relative_to(ROOT)} links to a missing {target}"
            if target not in seen and target.suffix == ".md":
                seen.add(target)
                todo.append(target)
    pages = set((ROOT / "docs").glob("*.md"))
    assert pages - seen == set(), "docs pages no link reaches from the README"


def _pages() -> list[Path]:
    return [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]


def _slug(heading: str) -> str:
    """GitHub's anchor for a Markdown heading: lower case, punctuation dropped, spaces to hyphens."""
    text = re.sub(r"[^\w\- ]", "", heading.strip().lower())
    return text.replace(" ", "-")


def _anchors(page: Path) -> set[str]:
    text = FENCED.sub("", page.read_text())
    return {_slug(m) for m in re.findall(r"^#+ (.+)$", text, re.MULTILINE)}


def test_every_anchor_names_a_heading():
    broken = []
    for page in _pages():
        for target, anchor in ANCHORED.findall(page.read_text()):
            dest = (page.parent / target).resolve() if target else page
            if dest.exists() and anchor not in _anchors(dest):
                broken.append(f"{page.relative_to(ROOT)}: #{anchor} in {target or 'itself'}")
    assert broken == [], "links to headings that do not exist:\n" + "\n".join(broken)


def test_every_figure_exists_and_is_small():
    """Figures are committed (docs/img/, made by scripts/docs_figures.py), so keep them small."""
    for page in _pages():
        for target in re.findall(r"!\[[^\]]*\]\(([\w./-]+\.png)\)", page.read_text()):
            figure = (page.parent / target).resolve()
            assert figure.is_file(), f"{page.relative_to(ROOT)} shows a missing {target}"
    for figure in (ROOT / "docs" / "img").glob("*.png"):
        assert figure.stat().st_size <= 150_000, f"{figure.name} is over 150 KB"


def _runnable_pages() -> list[str]:
    pages = [p.relative_to(ROOT).as_posix() for p in _pages()]
    return [p for p in pages if p not in RUN_ELSEWHERE and runnable_blocks(ROOT / p)]


def _env() -> dict[str, str]:
    """The running interpreter is `python`, the checkout is importable, no cluster is joined."""
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")])
    env["PYTHONPATH"] = str(ROOT)
    return env


@pytest.mark.parametrize("page", _runnable_pages())
def test_the_runnable_blocks_run(page, tmp_path):
    """Each marked block of a page, in page order, in one fresh directory per page (a block may use what
    the blocks before it wrote); a failure names the page and the block's first line."""
    for name in LINKED:
        (tmp_path / name).symlink_to(ROOT / name)
    env = _env()
    for lang, code, line in runnable_blocks(ROOT / page):
        if lang in ("bash", "sh", "shell"):
            argv = ["bash", "-euo", "pipefail", "-c", code]
        elif lang == "python":
            argv = [sys.executable, "-c", code]
        else:
            pytest.fail(f"{page}:{line}: a runnable block must be bash or python, not {lang!r}")
        run = subprocess.run(argv, cwd=tmp_path, env=env, capture_output=True, text=True,
                             timeout=BLOCK_TIMEOUT_S)  # fmt: skip
        assert run.returncode == 0, (
            f"{page}:{line}: the {lang} block exited {run.returncode}\n{code}\n"
            f"--- stdout\n{run.stdout[-2000:]}\n--- stderr\n{run.stderr[-4000:]}"
        )


def test_the_runnable_pages_are_found():
    """The marker is the line right before the fence; a page that loses it would silently run nothing."""
    assert set(_runnable_pages()) >= {"README.md", "docs/data.md", "docs/replicas.md"}
