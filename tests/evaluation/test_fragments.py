"""The report log: fragments fold in order, concurrent jobs lose nothing, old report.json files migrate."""

from __future__ import annotations

import json
import multiprocessing as mp
from concurrent.futures import ThreadPoolExecutor

import pytest

from pipeline.data.storage import open_store
from pipeline.evaluation.fragments import (
    PARTS,
    fold,
    fragment_names,
    read_report,
    write_fragment,
)
from pipeline.evaluation.report import merge_report


def test_fold_replaces_shallow_and_deep_in_order():
    frags = [
        {"mode": "replace", "updates": {"a": {"x": 1, "y": 2}, "b": 1}},
        {"mode": "deep", "updates": {"a": {"y": 3, "z": 4}}},
        {"mode": "shallow", "updates": {"b": {"k": 1}}},
        {"mode": "deep", "updates": {"b": {"j": 2}}},
    ]
    assert fold(frags) == {"a": {"x": 1, "y": 3, "z": 4}, "b": {"k": 1, "j": 2}}
    assert fold(frags[1:2], {"a": 5}) == {"a": {"y": 3, "z": 4}}
    assert fold([*frags, {"mode": "replace", "updates": {"c": 0}}]) == {"c": 0}


def test_a_full_replacement_prunes_what_it_supersedes(tmp_path):
    store = open_store(str(tmp_path))
    write_fragment(store, "r", {"a": 1}, "shallow")
    write_fragment(store, "r", {"b": 1}, "deep")
    assert len(fragment_names(store, "r")) == 2
    write_fragment(store, "r", {"c": 1}, "replace")
    assert len(fragment_names(store, "r")) == 1 and read_report(store, "r") == {"c": 1}
    with pytest.raises(ValueError, match="unknown fragment mode"):
        write_fragment(store, "r", {}, "append")


def test_a_report_json_from_before_fragments_is_the_base(tmp_path):
    store = open_store(str(tmp_path))
    store.write_bytes(json.dumps({"old": {"k": 1}}).encode(), "reports", "r", "report.json")
    assert read_report(store, "r") == {"old": {"k": 1}}
    merge_report(store, "r", {"old": {"j": 2}}, deep=True)
    assert read_report(store, "r") == {"old": {"k": 1, "j": 2}}
    assert json.loads(store.read_bytes("reports", "r", "report.json")) == read_report(store, "r")
    assert read_report(store, "never-written") == {}


def _merge_many(root: str, worker: int, count: int) -> None:
    store = open_store(root)
    for i in range(count):
        merge_report(store, "r", {"sampling": {f"w{worker}-{i}": {"n": i}}}, deep=True)


def test_concurrent_processes_merging_into_one_run_lose_nothing(tmp_path):
    """Four processes each merge six sections into the same run at once (a read-modify-write of one
    report.json drops sections here); the folded report holds all 24."""
    ctx = mp.get_context("spawn")
    procs = [ctx.Process(target=_merge_many, args=(str(tmp_path), w, 6)) for w in range(4)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(120)
        assert p.exitcode == 0
    store = open_store(str(tmp_path))
    expected = {f"w{w}-{i}" for w in range(4) for i in range(6)}
    assert set(read_report(store, "r")["sampling"]) == expected
    assert len(store.listdir("reports", "r", PARTS)) == 24
    # the next merge materialises everything into report.json as well
    merge_report(store, "r", {"note": 1})
    on_disk = json.loads(store.read_bytes("reports", "r", "report.json"))
    assert set(on_disk["sampling"]) == expected and on_disk["note"] == 1


def test_concurrent_merges_on_the_loopback_s3_lose_nothing(s3_bucket):
    store = open_store(f"s3://{s3_bucket}/fragments")
    with ThreadPoolExecutor(4) as pool:
        list(pool.map(lambda w: _merge_many(store.uri, w, 3), range(4)))
    assert set(read_report(store, "r")["sampling"]) == {
        f"w{w}-{i}" for w in range(4) for i in range(3)
    }
