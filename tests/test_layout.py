"""The architecture as a test: the import graph of ``pipeline/``, read with ``ast``, obeys the layers.

    orchestration  (4)   stages, demo, cluster configs
    evaluation | integrations (3)   FID/FD, membership inference, sweep, reports | diffusers pipelines
    train | fanout (2)   Ray Train edge | Ray Data edges and the FAISS index (peers: neither imports the other)
    data           (1)   stores, layout, shards, sources, model directories
    core           (0)   maths, models, configs: no ray/boto3/pyarrow/faiss, no data module

A module may import its own subpackage and lower layers only; no import cycles between modules (lazy
imports inside functions count too); no library module imports ``jobs/``; no module over 450 lines;
every test file under ``tests/<layer>/`` is named after the module it tests. The checks are plain
functions, and each is also run on a small synthetic package with the violation it must catch.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
RANKS = {
    "core": 0,
    "data": 1,
    "train": 2,
    "fanout": 2,
    "evaluation": 3,
    "integrations": 3,
    "orchestration": 4,
}
CORE_FORBIDDEN = {"ray", "boto3", "botocore", "pyarrow", "faiss", "s3fs", "fsspec"}
MAX_LINES = 450


def module_name(path: Path, root: Path) -> str:
    parts = list(path.relative_to(root).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def imports_of(path: Path, root: Path) -> set[str]:
    """Every module name imported anywhere in ``path`` (top level or inside functions), absolute.

    ``from a.b import c`` yields ``a.b`` and ``a.b.c`` (``c`` may be a submodule); relative imports are
    resolved against the module's package."""
    name = module_name(path, root)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*anchor, base] if base else anchor)
            found.add(base)
            found.update(f"{base}.{a.name}" for a in node.names)
    return found


def import_graph(root: Path, package: str = "pipeline") -> dict[str, set[str]]:
    """module -> the modules of ``package`` it imports (packages' ``__init__`` included)."""
    files = sorted((root / package).rglob("*.py"))
    modules = {module_name(f, root) for f in files}
    graph = {}
    for f in files:
        imported = imports_of(f, root)
        graph[module_name(f, root)] = {m for m in imported if m in modules} - {module_name(f, root)}
    return graph


def external_imports(root: Path, package: str = "pipeline") -> dict[str, set[str]]:
    """module -> the top-level names of everything it imports."""
    return {
        module_name(f, root): {m.split(".")[0] for m in imports_of(f, root)}
        for f in sorted((root / package).rglob("*.py"))
    }


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import cycle as a list of modules (first == last), or None (iterative three-colour DFS)."""
    colour: dict[str, int] = {}
    for start in sorted(graph):
        if colour.get(start):
            continue
        stack = [(start, iter(sorted(graph[start])))]
        path = [start]
        colour[start] = 1
        while stack:
            node, children = stack[-1]
            child = next(children, None)
            if child is None:
                colour[node] = 2
                stack.pop()
                path.pop()
            elif colour.get(child) == 1:
                return [*path[path.index(child) :], child]
            elif not colour.get(child):
                colour[child] = 1
                path.append(child)
                stack.append((child, iter(sorted(graph.get(child, ())))))
    return None


def layer_of(module: str) -> str | None:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else None


def layer_violations(graph: dict[str, set[str]]) -> list[str]:
    """Imports that reach up, sideways (between peers) or into an unknown subpackage."""
    bad = []
    for module, deps in sorted(graph.items()):
        own = layer_of(module)
        if own is None:
            continue  # the package's own __init__ (a docstring)
        if own not in RANKS:
            bad.append(f"{module}: subpackage {own!r} is not a known layer {sorted(RANKS)}")
            continue
        for dep in sorted(deps):
            other = layer_of(dep)
            if other is None or other == own:
                continue
            if other not in RANKS or RANKS[other] >= RANKS[own]:
                bad.append(f"{module} imports {dep} ({own} may not import {other})")
    return bad


def core_violations(externals: dict[str, set[str]], graph: dict[str, set[str]]) -> list[str]:
    bad = []
    for module in sorted(m for m in graph if layer_of(m) == "core"):
        for name in sorted(externals[module] & CORE_FORBIDDEN):
            bad.append(f"{module} imports {name}")
    return bad


def jobs_violations(externals: dict[str, set[str]], job_names: set[str]) -> list[str]:
    return [
        f"{module} imports jobs/{name}"
        for module, names in sorted(externals.items())
        for name in sorted(names & job_names)
    ]


def stray_modules(root: Path, package: str = "pipeline") -> list[str]:
    """Modules outside the layers: everything but the package docstring lives in a subpackage."""
    return [
        module_name(f, root)
        for f in sorted((root / package).glob("*.py"))
        if f.name != "__init__.py"
    ]


def long_modules(root: Path, package: str = "pipeline") -> list[str]:
    return [
        f"{f.relative_to(root)}: {n} lines"
        for f in sorted((root / package).rglob("*.py"))
        if (n := len(f.read_text().splitlines())) > MAX_LINES
    ]


def unmapped_tests(root: Path) -> list[str]:
    """``tests/<layer>/test_<name>[_<aspect>].py`` must name a module of ``pipeline/<layer>/``;
    ``tests/jobs/test_<name>...`` a script in ``jobs/``."""
    bad = []
    for test in sorted((root / "tests").glob("*/test_*.py")):
        folder = test.parent.name
        targets = root / (folder if folder in ("jobs", "bench") else f"pipeline/{folder}")
        if folder not in ("jobs", "bench") and folder not in RANKS:
            bad.append(f"{test.relative_to(root)}: tests/{folder}/ mirrors no layer")
            continue
        stem = test.stem.removeprefix("test_")
        names = {f.stem for f in targets.glob("*.py")} - {"__init__"}
        if not any(stem == n or stem.startswith(n + "_") for n in names):
            bad.append(
                f"{test.relative_to(root)}: no module {stem!r} in {targets.relative_to(root)}"
            )
    return bad


def untested_modules(root: Path) -> list[str]:
    """Modules of a layer with no test file named after them."""
    bad = []
    for layer in RANKS:
        tests = [t.stem.removeprefix("test_") for t in (root / "tests" / layer).glob("test_*.py")]
        for f in sorted((root / "pipeline" / layer).glob("*.py")):
            if f.stem != "__init__" and not any(
                s == f.stem or s.startswith(f.stem + "_") for s in tests
            ):
                bad.append(f"pipeline/{layer}/{f.name}")
    return bad


# ------------------------------------------------------------------------------- the real package
def test_no_import_cycles():
    assert find_cycle(import_graph(ROOT)) is None


def test_layers_import_only_downwards():
    assert layer_violations(import_graph(ROOT)) == []


def test_core_is_ray_free_and_io_free():
    assert core_violations(external_imports(ROOT), import_graph(ROOT)) == []


def test_no_library_module_imports_jobs():
    job_names = {f.stem for f in (ROOT / "jobs").glob("*.py")} | {"jobs"}
    assert jobs_violations(external_imports(ROOT), job_names) == []


def test_every_module_lives_in_a_layer_and_is_short():
    assert stray_modules(ROOT) == []
    assert long_modules(ROOT) == []
    assert {
        p.name for p in (ROOT / "pipeline").iterdir() if p.is_dir() and p.name != "__pycache__"
    } == set(RANKS)


def test_tests_mirror_the_layers():
    assert unmapped_tests(ROOT) == []
    assert untested_modules(ROOT) == []


def test_every_layer_says_what_it_may_import():
    for layer in RANKS:
        doc = ast.get_docstring(ast.parse((ROOT / "pipeline" / layer / "__init__.py").read_text()))
        assert doc and len(doc.splitlines()) >= 2, layer


def test_core_imports_without_ray_boto3_or_pyarrow():
    """Importing every core module in a fresh interpreter loads none of the heavy edges."""
    import subprocess
    import sys

    modules = sorted(m for m in import_graph(ROOT) if layer_of(m) == "core")
    code = (
        "import importlib, sys\n"
        f"for m in {modules!r}: importlib.import_module(m)\n"
        f"print(sorted(n for n in {sorted(CORE_FORBIDDEN)!r} if n in sys.modules))"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, check=True
    )
    assert out.stdout.strip() == "[]"


# ------------------------------------------------------------- the checks catch what they must
def _package(tmp_path: Path, files: dict[str, str]) -> Path:
    for rel, text in files.items():
        path = tmp_path / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    for layer in RANKS:
        (tmp_path / "pipeline" / layer).mkdir(parents=True, exist_ok=True)
        (tmp_path / "pipeline" / layer / "__init__.py").touch()
    (tmp_path / "pipeline" / "__init__.py").touch()
    return tmp_path


def test_a_cycle_is_found_even_through_a_lazy_import(tmp_path):
    root = _package(
        tmp_path,
        {
            "pipeline/fanout/a.py": "from pipeline.fanout.b import x\n",
            "pipeline/fanout/b.py": "def f():\n    from pipeline.fanout import a\n",
        },
    )
    cycle = find_cycle(import_graph(root))
    assert cycle is not None and set(cycle) == {"pipeline.fanout.a", "pipeline.fanout.b"}


@pytest.mark.parametrize(
    ("module", "text", "expected"),
    [
        (
            "pipeline/data/x.py",
            "from pipeline.orchestration.stages import s\n",
            "data may not import orchestration",
        ),
        ("pipeline/train/x.py", "from ..fanout import sampling\n", "train may not import fanout"),
        (
            "pipeline/evaluation/x.py",
            "import pipeline.orchestration.demo\n",
            "evaluation may not import orchestration",
        ),
        (
            "pipeline/core/x.py",
            "def f():\n    from pipeline.data.storage import Store\n",
            "core may not import data",
        ),
    ],
)
def test_reaching_up_or_sideways_is_a_violation(tmp_path, module, text, expected):
    files = {
        module: text,
        "pipeline/orchestration/stages.py": "",
        "pipeline/orchestration/demo.py": "",
        "pipeline/fanout/sampling.py": "",
        "pipeline/data/storage.py": "",
    }
    bad = layer_violations(import_graph(_package(tmp_path, files)))
    assert bad and all(b.startswith(module[:-3].replace("/", ".")) and expected in b for b in bad)


def test_core_importing_ray_or_faiss_is_a_violation(tmp_path):
    root = _package(
        tmp_path,
        {
            "pipeline/core/m.py": "import torch\n\ndef f():\n    import ray\n    from faiss import IndexFlatIP\n"
        },
    )
    assert core_violations(external_imports(root), import_graph(root)) == [
        "pipeline.core.m imports faiss",
        "pipeline.core.m imports ray",
    ]


def test_importing_jobs_strays_and_long_modules_are_violations(tmp_path):
    root = _package(
        tmp_path,
        {
            "pipeline/evaluation/m.py": "from _common import run_main\n",
            "pipeline/loose.py": "",
            "pipeline/data/big.py": "x = 1\n" * (MAX_LINES + 1),
        },
    )
    assert jobs_violations(external_imports(root), {"_common", "jobs"}) == [
        "pipeline.evaluation.m imports jobs/_common"
    ]
    assert stray_modules(root) == ["pipeline.loose"]
    assert long_modules(root) == [f"pipeline/data/big.py: {MAX_LINES + 1} lines"]


def test_misplaced_tests_and_untested_modules_are_violations(tmp_path):
    root = _package(
        tmp_path,
        {
            "pipeline/data/storage.py": "",
            "pipeline/data/shards.py": "",
            "tests/data/test_storage_s3.py": "",
            "tests/data/test_sampling.py": "",
            "tests/misc/test_x.py": "",
        },
    )
    assert unmapped_tests(root) == [
        "tests/data/test_sampling.py: no module 'sampling' in pipeline/data",
        "tests/misc/test_x.py: tests/misc/ mirrors no layer",
    ]
    assert untested_modules(root) == ["pipeline/data/shards.py"]
