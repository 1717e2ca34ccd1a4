"""The comparison on other sampling seeds of a finished demo (jobs/compare.py's work)."""

from __future__ import annotations

import json
import shutil

import numpy as np

from pipeline.data.shards import read_image_shards
from pipeline.data.storage import open_store
from pipeline.orchestration.compare_store import compare_demo_store


def test_compare_job_on_other_seeds_of_a_finished_demo(demo_quick_store, tmp_path):
    store = tmp_path / "store"  # a copy: the session's demo store is shared read-only
    shutil.copytree(demo_quick_store[0], store)
    section, uri = compare_demo_store(
        str(store), 1, {"contenders": ["ddim"], "num_samples": 8}
    )  # one contender: each one's run is the quick demo's test above
    assert [r["name"] for r in section["rows"]] == ["ddim"]
    assert section["seed_offset"] == 1 and section["num_samples"] == 8
    assert uri.endswith("reports/demo/comparison-seed1.md")
    out = store / "reports" / "demo"
    saved = json.loads((out / "comparison-seed1.json").read_text())
    assert saved["seed_offset"] == 1 and saved["rows"][0]["num_samples"] == 8
    assert "| ddim |" in (out / "comparison-seed1.md").read_text()
    assert (out / "comparison-seed1.png").stat().st_size > 1000
    # fresh samples on the next seeds, under their own run, beside the demo's untouched ones
    fresh = read_image_shards(open_store(str(store)), "samples/demo-cmp1/ddim")
    main = read_image_shards(open_store(demo_quick_store[0]), "samples/demo/ddim")
    assert len(fresh) == 8 and len(main) == 64
    assert not np.array_equal(fresh.images, main.images[:8])
