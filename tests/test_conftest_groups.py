"""The xdist grouping of tests/conftest.py: whole files, merged where they share a costly fixture."""

from __future__ import annotations

from tests.conftest import _group_by_file_and_shared_fixture


class FakeItem:
    def __init__(self, nodeid: str, fixtures=(), slow: bool = False):
        self.nodeid, self.fixturenames, self.slow, self.groups = nodeid, list(fixtures), slow, []

    def get_closest_marker(self, name: str):
        return object() if name == "slow" and self.slow else None

    def add_marker(self, mark) -> None:
        self.groups.append(mark.args[0])


def test_files_sharing_a_session_fixture_share_a_group_and_slow_groups_go_first():
    items = [
        FakeItem("tests/a.py::t1"),
        FakeItem("tests/b.py::t1", ["demo_quick_store", "demo_quick_run"]),
        FakeItem("tests/b.py::t2"),
        FakeItem("tests/c.py::t1", ["headline_models"]),
        FakeItem("tests/d.py::t1", ["demo_quick_run"]),
        FakeItem("tests/e.py::t1", slow=True),
        FakeItem("tests/f.py::t1", ["headline_models", "demo_quick_run"]),  # joins both groups
    ]
    _group_by_file_and_shared_fixture(items)
    group = {i.nodeid: i.groups for i in items}
    assert all(len(g) == 1 for g in group.values())
    # b, c, d and f are one group (f links the demo's and the headline models' files); a and e alone
    shared = {group[n][0] for n in ("tests/b.py::t1", "tests/b.py::t2", "tests/c.py::t1",
                                    "tests/d.py::t1", "tests/f.py::t1")}  # fmt: skip
    assert len(shared) == 1
    assert len({group["tests/a.py::t1"][0], group["tests/e.py::t1"][0], *shared}) == 3
    # slow groups first, each group's tests together; the fast file a.py last
    order = [i.nodeid for i in items]
    assert order[-1] == "tests/a.py::t1"
    firsts = [group[n][0] for n in order]
    assert firsts == sorted(firsts, key=firsts.index)  # contiguous
