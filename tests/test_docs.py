"""The user docs: the CLI reference is current, and every docs page is reachable from the README."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
LINK = re.compile(r"\]\(((?:docs/)?[\w./-]+\.md)(?:#[\w-]*)?\)")


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
