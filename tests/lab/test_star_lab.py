"""The star lab for real: a hub and two terminals (their own peps, [peer] to the hub), parallel
fetches on both terminals, every byte checked (pep.lab.objects raises on a wrong body), with
and without pep; the hub's pep status names each terminal; a plan change reaches the modem
and the hub. The lab is pep's pytest plugin's (the satlab fixture builds it and removes it
whatever happens). No timing assertions: pep lab bench measures."""

from __future__ import annotations

import subprocess
import sys

import pytest
import trio

from pep.lab import star_bench
from pep.lab.star import Plan
from pep.lab.star_build import change_plan, plans_of, queue_drops
from pep.lab.state import Lab
from pep.testing.satlab import SatLab

pytestmark = pytest.mark.netns


async def fetch_on_both(lab: Lab) -> list[float]:
    """Three 300 KB fetches from each terminal's client at once."""
    jobs = [(f"c{i}", 300_000) for i in (1, 2) for _ in range(3)]
    return await star_bench._flows(jobs, lab)


@pytest.mark.satlab("leo", topology="star", terminals=2)
def test_a_star_lab_serves_two_terminals_byte_exact_with_and_without_pep(satlab: SatLab) -> None:
    lab, prefix = satlab.lab, satlab.prefix
    assert lab.pep_nodes == ["hub", "t1", "t2"]
    times = trio.run(fetch_on_both, lab)
    assert len(times) == 6 and all(t > 0 for t in times)
    doc = satlab.pep_status("hub")
    rows = {r["name"]: r for r in doc["link"]["terminals"]}  # type: ignore[index]
    assert {"t1", "t2"} <= set(rows), rows
    assert all(rows[t]["bytes_sent"] >= 900_000 for t in ("t1", "t2")), rows
    assert rows["t1"]["egress_bps"] == 50_000_000  # half LEO's 100 Mbit/s carrier
    assert doc["peer"]["listener"]["flows"] >= 6  # type: ignore[index]  # pooled legs
    status = subprocess.run(
        [sys.executable, "-m", "pep.ops.cli", "lab", "status", "--prefix", prefix],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert status.returncode == 0, status.stderr
    assert "t1: plan 50/10 Mbit/s down/up" in status.stdout, status.stdout
    assert "dropped at its queue" in status.stdout

    change_plan(lab, 1, Plan(25_000_000, 10_000_000))
    assert plans_of(lab)[0] == Plan(25_000_000, 10_000_000)
    r = subprocess.run(
        ["ip", "netns", "exec", lab.ns("link"), "tc", "class", "show", "dev", "br0"],
        capture_output=True, text=True, timeout=30,
    )  # fmt: skip
    assert "ceil 25Mbit" in r.stdout, r.stdout
    assert "t1 25000000bit" in (lab.dir / "terminals.txt").read_text()

    satlab.set_mode("none")  # without pep: the same fetches, routed end to end
    assert len(trio.run(fetch_on_both, lab)) == 6
    assert set(queue_drops(lab)) == {"t1", "t2"}
