"""The public integration module: its names, and that importing it loads no Ray, FAISS or boto3."""

from __future__ import annotations

import json
import os
import subprocess
import sys


def test_import_is_light():
    code = (
        "import json, sys\n"
        "import pipeline.integrations.diffusers as d\n"
        "heavy = [m for m in ('ray', 'faiss', 'boto3', 'botocore', 'pyarrow') if m in sys.modules]\n"
        "print(json.dumps({'heavy': heavy, 'names': sorted(d.__all__)}))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    got = json.loads(out.stdout.strip().splitlines()[-1])
    assert got["heavy"] == []
    assert {"CPSampleClassifier", "CPSamplePipeline", "CPSampleStableDiffusionPipeline",
            "ReplicaGuard"} <= set(got["names"])  # fmt: skip


def test_the_docs_examples_run(tmp_path):
    """Every block of docs/diffusers.md marked runnable runs as written, in a fresh interpreter."""
    from pathlib import Path

    from tests.docs_blocks import runnable_blocks

    page = Path(__file__).resolve().parents[2] / "docs" / "diffusers.md"
    blocks = runnable_blocks(page)
    assert [lang for lang, _, _ in blocks] == ["python", "python"]
    env = {**os.environ, "PYTHONPATH": str(page.parents[1])}
    printed = ["4 images; guidance acted on", "(16, 16)"]  # what each block prints
    for (_, code, line), want in zip(blocks, printed, strict=True):
        run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                             cwd=tmp_path, env=env)  # fmt: skip
        assert run.returncode == 0, f"docs/diffusers.md line {line}:\n{run.stderr[-3000:]}"
        assert want in run.stdout, run.stdout
