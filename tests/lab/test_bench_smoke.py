"""The benchmark must keep running: a one-second smoke run, checked for well-formed output.

No timing assertion: benchmarks measure, tests check behaviour.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.netns


def test_bulk_bench_smoke(tmp_path: Path) -> None:
    for tool in ("iperf3", "haproxy"):
        assert shutil.which(tool), f"{tool} missing: deploy/setup.sh installs it"
    out = tmp_path / "bulk.json"
    r = subprocess.run(
        [sys.executable, "-m", "bench.bulk", "--seconds", "1", "--rounds", "1", "--json", str(out)],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=Path(__file__).parents[2],
    )
    assert r.returncode == 0, r.stderr
    assert "pep/kernel" in r.stdout and "pep/haproxy" in r.stdout
    res = json.loads(out.read_text())
    assert res["rounds"] == 1
    assert set(res["gbit"]) == {"kernel", "haproxy", "pep"}
    assert all(len(v) == 1 and v[0] > 0 for v in res["gbit"].values())
    assert res["pep_vs_kernel"] > 0 and res["pep_vs_haproxy"] > 0


def run_bench(tmp_path: Path, module: str, *args: str) -> dict:
    out = tmp_path / f"{module}.json"
    r = subprocess.run(
        [sys.executable, "-m", f"bench.{module}", *args, "--json", str(out)],
        capture_output=True,
        text=True,
        timeout=180,
        cwd=Path(__file__).parents[2],
    )
    assert r.returncode == 0, r.stdout + r.stderr
    return json.loads(out.read_text())


def test_short_connections_bench_smoke(tmp_path: Path) -> None:
    for tool in ("wrk", "nginx"):
        assert shutil.which(tool), f"{tool} missing: deploy/setup.sh installs it"
    res = run_bench(tmp_path, "short", "--seconds", "1", "--rounds", "1")
    assert set(res["median"]) == {"kernel", "haproxy", "pep"}
    for m in res["median"].values():
        assert m["rps"] > 0 and m["p99_ms"] >= m["p50_ms"] > 0
    assert res["pep_vs_haproxy_rps"] > 0


def test_concurrency_bench_smoke(tmp_path: Path) -> None:
    res = run_bench(tmp_path, "concurrency", "--connections", "50", "--workers", "1")
    assert res["still_working_at_close"] == 50
    assert 1.5 < res["fds_per_connection"] < 3  # two sockets per idle connection


def test_churn_bench_smoke(tmp_path: Path) -> None:
    res = run_bench(tmp_path, "churn", "--seconds", "3", "--warmup", "1", "--parallel", "4")
    assert res["completed"] > 0 and res["failed"] == 0
    assert res["rss_kib_end"] > 0 and res["fds_end"] > 0
