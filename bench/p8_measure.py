"""P8's measuring parts: a job's process tree sampled for RSS, and the Ray-free arithmetic of the goals.

- :class:`TreeRss` samples, every 0.2 s, the RSS of every process of a job's tree (the job process,
  the "driver", and everything under it: Ray's daemons and workers); :func:`stage_memory` reduces the
  peaks to the two numbers the goal is about: the largest process whatever its name, and the driver.
- :func:`marginal_costs` and :func:`marginal_ratio`: time per unit of work as the slope between sizes,
  so start-up (a constant) cancels.
- :func:`near_threshold_mask`, :func:`pick_near_threshold` and :func:`decision_stats`: the index's
  near-threshold queries and how its decisions compare with exact search.
- :func:`count_requests`: S3 requests by method from a moto server's request log.
"""

from __future__ import annotations

import itertools
import os
import re
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
MB = 2**20
SAMPLE_S = 0.2  # the RSS sampling interval


# ------------------------------------------------------------------------------- process roles
def role_of(cmdline: list[str], name: str) -> str:
    """A process's kind, for the details only (the goals ignore names): a Ray worker by its title
    (``ray::ReplicaScorer``, ``ray::_add_part``...), a Ray daemon, or ``other <name>``."""
    cmd = " ".join(cmdline)
    title = cmdline[0] if cmdline else name
    if title.startswith(("ray::DashboardAgent", "ray::RuntimeEnvAgent")):
        return "ray_daemon " + title.removeprefix("ray::")
    if title.startswith("ray::"):
        label = re.sub(r"[^A-Za-z0-9_:.]", "", title.split()[0])
        return "ray_worker " + label.removesuffix(":").split(".")[0]
    for daemon in ("raylet", "gcs_server", "dashboard", "log_monitor", "monitor.py", "agent"):
        if daemon in cmd:
            return f"ray_daemon {daemon}"
    return "other " + name


def fold_peak(old: tuple[str, int] | None, role: str, rss: int) -> tuple[str, int]:
    """One process's (role, peak RSS) after a new reading: the peak only grows, and a worker keeps
    its busy title (``ray::IDLE`` or an exited process never overwrite a named role)."""
    if old is None:
        return role, rss
    keep = old[0] if ("IDLE" in role or role == "gone") else role
    return keep, max(rss, old[1])


def stage_memory(peaks: dict[int, tuple[str, int]], driver_pid: int) -> dict:
    """Peak RSS of a job in MB: ``largest_mb`` (the largest process of the tree, whatever its name,
    with its ``largest_role``), ``driver_mb`` (the job process on its own), ``processes`` (how many
    were seen) and ``by_role`` (the largest of each role, details only)."""
    if not peaks:
        raise ValueError("no process was sampled")
    pid, (role, rss) = max(peaks.items(), key=lambda kv: kv[1][1])
    by_role: dict[str, float] = {}
    for r, b in peaks.values():
        by_role[r] = max(by_role.get(r, 0.0), b / MB)
    driver = peaks.get(driver_pid, ("driver", 0))[1]
    return {
        "largest_mb": round(rss / MB, 1), "largest_role": "driver" if pid == driver_pid else role,
        "driver_mb": round(driver / MB, 1), "processes": len(peaks),
        "by_role": {k: round(v, 1) for k, v in sorted(by_role.items())},
    }  # fmt: skip


class TreeRss:
    """Peak RSS per process of a process tree, sampled every ``interval`` seconds in a thread. RSS
    counts the pages a process touched, Ray's shared object store included where it mapped them."""

    def __init__(self, pid: int, interval: float = SAMPLE_S):
        import psutil

        self.root = psutil.Process(pid)
        self.interval = interval
        self.peaks: dict[int, tuple[str, int]] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)
        self._thread.start()

    def _loop(self) -> None:
        import psutil

        while not self._stop.is_set():
            try:
                procs = [self.root, *self.root.children(recursive=True)]
            except psutil.NoSuchProcess:
                break
            for p in procs:
                try:
                    rss = p.memory_info().rss
                    role = role_of(p.cmdline(), p.name())
                except psutil.Error:
                    continue
                self.peaks[p.pid] = fold_peak(self.peaks.get(p.pid), role, rss)
            self._stop.wait(self.interval)

    def stop(self) -> dict:
        """:func:`stage_memory` of what was sampled."""
        self._stop.set()
        self._thread.join()
        return stage_memory(self.peaks, self.root.pid)


def run_job(args: list[str], log: Path, env: dict | None = None) -> dict:
    """Run ``python <args>`` from the repo root: wall time, :func:`stage_memory`, the last lines."""
    t0 = time.perf_counter()
    with open(log, "w") as out:
        proc = subprocess.Popen(
            [sys.executable, *args], cwd=ROOT, stdout=out, stderr=subprocess.STDOUT,
            env={**os.environ, "RAY_DEDUP_LOGS": "0", **(env or {})},
        )  # fmt: skip
        monitor = TreeRss(proc.pid)
        rc = proc.wait()
    memory = monitor.stop()
    wall = time.perf_counter() - t0
    tail = log.read_text(errors="replace").splitlines()[-12:]
    if rc != 0:
        raise RuntimeError(f"{' '.join(args)} exited {rc} (log {log}):\n" + "\n".join(tail))
    return {"wall_s": round(wall, 3), "memory": memory, "tail": tail}


def last_json(tail: list[str]) -> dict:
    """The last line of a job's output that is a JSON object."""
    import json

    for line in reversed(tail):
        if line.startswith("{"):
            return json.loads(line)
    raise ValueError("no JSON line in the job's output")


# -------------------------------------------------------------------------- memory and time goals
def ratio(big: float | None, small: float | None) -> float | None:
    """``big / small``, None when either is missing or ``small`` is 0."""
    return None if not big or not small else big / small


def memory_ratios(small: dict, big: dict, goal: float = 1.25) -> dict:
    """Largest process and driver, ``big`` size over ``small`` (two :func:`stage_memory` results):
    each ratio, the worse one, and whether it meets ``<= goal``."""
    largest = ratio(big["largest_mb"], small["largest_mb"])
    driver = ratio(big["driver_mb"], small["driver_mb"])
    worst = max(r for r in (largest, driver) if r is not None)
    return {"largest": largest, "driver": driver, "worst": worst, "goal": f"<= {goal}",
            "met": worst <= goal}  # fmt: skip


def marginal_costs(walls: dict[int, float], units: dict[int, float]) -> list[dict]:
    """Seconds per unit of work between consecutive sizes: ``(wall(b) - wall(a)) / (units(b) -
    units(a))`` for sizes a < b (keys of ``walls``, N images), so a stage's start-up, the same at
    every size, cancels; ``units`` is the work each size does (N images, or N/10 samples)."""
    sizes = sorted(walls)
    if len(sizes) < 2:
        raise ValueError("a marginal cost needs at least two sizes")
    out = []
    for a, b in itertools.pairwise(sizes):
        du = units[b] - units[a]
        if du <= 0:
            raise ValueError(f"the work must grow with N: {units[a]} at {a}, {units[b]} at {b}")
        out.append({"from": a, "to": b, "s_per_unit": (walls[b] - walls[a]) / du})
    return out


def startup_s(walls: dict[int, float], units: dict[int, float]) -> float:
    """The fixed part of a stage's wall time: the smallest size's wall minus its work at the first
    interval's marginal cost (the intercept of the line through the two smallest sizes)."""
    first = marginal_costs(walls, units)[0]
    return walls[first["from"]] - first["s_per_unit"] * units[first["from"]]


def marginal_ratio(intervals: list[dict], goal: float = 1.1) -> dict:
    """The "marginal time per image <= 1.1x" goal: the marginal cost over the last interval (e.g.
    110k -> 200k) divided by that over the first (20k -> 110k). Above 1 the cost of one more image
    grows with N; at most ``goal`` meets it. With one interval (two sizes) there is nothing to
    compare: ``met`` is None."""
    if len(intervals) < 2:
        return {"ratio": None, "goal": f"<= {goal}", "met": None,
                "note": "two sizes give one marginal cost: add a middle size to compare"}  # fmt: skip
    first, last = intervals[0]["s_per_unit"], intervals[-1]["s_per_unit"]
    if first <= 0 or last <= 0:  # a wall time fell as the work grew: noise exceeds the work
        return {"ratio": None, "goal": f"<= {goal}", "met": None,
                "note": "a marginal cost <= 0: the sizes are too close for this machine's noise"}  # fmt: skip
    return {"ratio": last / first, "goal": f"<= {goal}", "met": last / first <= goal}


# ------------------------------------------------------------------------ index decision quality
def near_threshold_mask(
    sims: np.ndarray, threshold: float, below: float = 0.03, above: float = 0.01
) -> np.ndarray:
    """Queries whose exact nearest similarity lies in ``[threshold - below, threshold + above]``:
    where a replicate decision is made."""
    s = np.asarray(sims, dtype=np.float64)
    return (s >= threshold - below) & (s <= threshold + above)


def pick_near_threshold(
    sims: np.ndarray, threshold: float, num: int, seed: int = 0, **band
) -> np.ndarray:
    """Up to ``num`` indices (sorted, a seeded random choice) of candidates whose exact nearest
    similarity ``sims`` is in the near-threshold band (:func:`near_threshold_mask`)."""
    inside = np.flatnonzero(near_threshold_mask(sims, threshold, **band))
    if len(inside) <= num:
        return inside
    return np.sort(np.random.default_rng(seed).choice(inside, num, replace=False))


def decision_stats(
    found: np.ndarray, exact: np.ndarray, threshold: float, tol: float = 1e-5
) -> dict:
    """recall@1 (the found neighbour is as similar as the exact nearest, within ``tol``) and the share
    of queries whose replicate decision (similarity >= threshold) is the exact one."""
    f = np.asarray(found, dtype=np.float64).reshape(-1)
    e = np.asarray(exact, dtype=np.float64).reshape(-1)
    if f.shape != e.shape or not f.size:
        raise ValueError(f"found {f.shape} and exact {e.shape} must be the same non-empty shape")
    return {
        "queries": int(f.size),
        "recall_at_1": float((f >= e - tol).mean()),
        "decision_agreement": float(((f >= threshold) == (e >= threshold)).mean()),
        "replicates_exact": int((e >= threshold).sum()),
        "replicates_index": int((f >= threshold).sum()),
    }


# ------------------------------------------------------------------------------ S3 request counts
_REQUEST = re.compile(r'"(?:\x1b\[[0-9;]*m)*([A-Z]+) (\S+) HTTP/[0-9.]+')


def count_requests(lines: list[str]) -> dict[str, int]:
    """Requests by HTTP method in a moto server's request log (werkzeug's access lines, colour codes
    allowed), plus ``total``."""
    out: dict[str, int] = {}
    for line in lines:
        m = _REQUEST.search(line)
        if m:
            out[m.group(1)] = out.get(m.group(1), 0) + 1
    out["total"] = sum(out.values())
    return dict(sorted(out.items()))


class MotoServer:
    """moto's S3 server in its own process on 127.0.0.1 (a real HTTP S3 API), its request log in
    ``log``; ``env`` holds the endpoint, fake credentials and a region for the jobs."""

    def __init__(self, log: Path):
        import socket

        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        self.log = Path(log)
        self.endpoint = f"http://127.0.0.1:{port}"
        self.env = {
            "AWS_ACCESS_KEY_ID": "bench-key", "AWS_SECRET_ACCESS_KEY": "bench-secret",
            "AWS_REGION": "us-east-1", "AWS_DEFAULT_REGION": "us-east-1",
            "AWS_ENDPOINT_URL": self.endpoint,
        }  # fmt: skip
        moto = Path(sys.executable).parent / "moto_server"
        self._out = open(self.log, "w")  # noqa: SIM115 (open while the server runs)
        self.proc = subprocess.Popen(
            [str(moto), "-H", "127.0.0.1", "-p", str(port)],
            stdout=self._out, stderr=subprocess.STDOUT, start_new_session=True,
        )  # fmt: skip
        self._wait_up()

    def _wait_up(self) -> None:
        import urllib.request

        for _ in range(300):
            try:
                urllib.request.urlopen(f"{self.endpoint}/moto-api/", timeout=1)
                return
            except OSError:
                time.sleep(0.1)
        raise RuntimeError(f"moto server at {self.endpoint} did not start (log {self.log})")

    def create_bucket(self, name: str) -> None:
        import boto3

        boto3.client("s3", endpoint_url=self.endpoint, region_name="us-east-1",
                     aws_access_key_id="bench-key", aws_secret_access_key="bench-secret",
                     ).create_bucket(Bucket=name)  # fmt: skip

    def lines(self) -> list[str]:
        """The request log so far."""
        self._out.flush()
        return self.log.read_text(errors="replace").splitlines()

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.wait(timeout=30)
        self._out.close()
