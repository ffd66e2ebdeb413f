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


@pytest.mark.skipif(shutil.which("iperf3") is None, reason="iperf3 not installed")
def test_bulk_bench_smoke(tmp_path: Path) -> None:
    out = tmp_path / "bulk.json"
    r = subprocess.run(
        [sys.executable, "-m", "bench.bulk", "--seconds", "1", "--rounds", "1", "--json", str(out)],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=Path(__file__).parent.parent,
    )
    assert r.returncode == 0, r.stderr
    assert "median ratio" in r.stdout
    res = json.loads(out.read_text())
    assert res["rounds"] == 1 and len(res["kernel_gbit"]) == len(res["pep_gbit"]) == 1
    assert res["kernel_gbit"][0] > 0 and res["pep_gbit"][0] > 0
    assert res["ratio_median"] > 0
