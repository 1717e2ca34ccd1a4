"""The code blocks of a Markdown page that are marked ``<!-- runnable -->`` (the line before the
fence): what the docs tests run."""

from __future__ import annotations

import re
from pathlib import Path

FENCE = re.compile(r"<!-- runnable -->\n```(\w+)\n(.*?)\n```", re.DOTALL)


def runnable_blocks(page: str | Path) -> list[tuple[str, str, int]]:
    """``(language, code, line)`` of every marked block, in page order."""
    text = Path(page).read_text()
    return [
        (m.group(1), m.group(2), text.count("\n", 0, m.start()) + 2) for m in FENCE.finditer(text)
    ]
