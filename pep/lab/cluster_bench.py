"""What the two-gateway labs measure (``pep lab bench --topology ha|ecmp``): failover and spread.

``failover`` (ha): the master's pep is killed (SIGKILL: a dead process, as a crash or the OOM
killer leaves it) and from then on the client opens a new connection (a 1 KB fetch, checked)
every 50 ms, each on its own, as clients keep arriving. The failover time is from the kill to
the first connection that succeeds *split by the backup* (its `pep status` counts it); the
connections that failed, took over 0.5 s or went through unsplit meanwhile are counted, and
when the backup held both addresses. Then the
killed pep is started again; with ``nopreempt`` its gateway stays backup, so the next run kills
the other one. ``spread`` (ecmp): 400 connections (10 KB each, checked), 20 at a time; each
gateway's share of them from its `pep status`; then gwa's pep killed and 100 more: the ones
hashed to gwa cross it unsplit, and all must succeed.
"""

from __future__ import annotations

import os
import statistics
import subprocess
import time
from typing import Any

import trio

from pep.lab import objects
from pep.lab.cluster import (
    GATEWAYS,
    VIPS,
    keepalived_argv,
    log_size,
    server_ip,
    sigkill,
    vips_held,
    wait_master,
    wait_state,
)
from pep.lab.state import Lab
from pep.ops.status.socket import fetch as fetch_status

__all__ = ["failover", "spread"]

PROBE_EVERY = 0.05  # seconds between the client's new connections during a failover
PROBE_TIMEOUT = 2.0  # a probe that takes longer counts as failed
SLOW = 0.5  # a probe that succeeds but takes longer counts as slow (a 1 KB fetch: ~5 ms)


def splits(lab: Lab, gw: str) -> int:
    doc = fetch_status(str(lab.dir / f"{gw}.sock"))
    return int(doc["listener"]["split"])  # type: ignore[index]


async def _probe(lab: Lab, size: int = 1000) -> bool:
    with trio.move_on_after(PROBE_TIMEOUT):
        try:
            await objects.fetch(lab.ns("client"), (server_ip(lab.topology), 80), size)
        except (OSError, objects.FetchError):
            return False
        return True
    return False


FAILURES = ("pep", "box", "link")


def _fail(lab: Lab, gw: str, what: str) -> None:
    """``pep``: its process killed. ``box``: its links down, then every process of the gateway
    killed, as a box that lost power: it sends nothing more (killed first, keepalived's VRRP
    child would still say goodbye, a priority-0 advert, and its kernel would still answer).
    ``link``: its client-side link down."""
    if what in ("box", "link"):
        for ifname in ("lan0", "wan0") if what == "box" else ("lan0",):
            subprocess.run(["ip", "-n", lab.ns(gw), "link", "set", ifname, "down"], check=True)
    if what in ("pep", "box"):
        sigkill(lab, gw)
    if what == "box":  # keepalived and its VRRP child: its own session (Lab.launch)
        sigkill(lab, f"keepalived-{gw}", group=True)


def _repair(lab: Lab, gw: str, what: str) -> None:
    """Back as it was, and wait until its keepalived is backup again (``nopreempt``: it does
    not take the addresses back)."""
    since = log_size(lab, gw)
    if what in ("box", "link"):
        for ifname in ("lan0", "wan0"):
            if what == "box":  # the addresses the killed keepalived left behind
                for vip in VIPS.values():
                    subprocess.run(
                        ["ip", "-n", lab.ns(gw), "addr", "del", f"{vip}/24", "dev", ifname],
                        capture_output=True,
                    )
            subprocess.run(["ip", "-n", lab.ns(gw), "link", "set", ifname, "up"], check=True)
    if what in ("pep", "box"):
        lab.stop(gw)
        lab.launch(gw, gw, lab.pep_argv(gw))
        lab.wait_ready(gw, "ready:")
    if what == "box":
        lab.stop(f"keepalived-{gw}")
        _wait_gone(lab, gw)
        lab.launch(f"keepalived-{gw}", gw, keepalived_argv(lab, gw))
    wait_state(lab, gw, since)


def _wait_gone(lab: Lab, gw: str, timeout: float = 5) -> None:
    """Until the killed keepalived's VRRP child is reaped: a new keepalived that finds its pid
    (in keepalived-GW-vrrp.pid) still alive says "daemon is already running" and exits."""
    pidfile = lab.dir / f"keepalived-{gw}-vrrp.pid"
    try:
        pid = int(pidfile.read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return
        time.sleep(0.02)


async def _one_failover(lab: Lab, what: str) -> dict[str, Any]:
    active = wait_master(lab)  # blocks for a moment; nothing else runs yet
    backup = next(gw for gw in GATEWAYS if gw != active)
    before = splits(lab, backup)
    counts = {"failed": 0, "unsplit": 0, "slow": 0}
    took = moved = None

    async def watch() -> None:
        nonlocal moved
        while len(await trio.to_thread.run_sync(vips_held, lab.ns(backup))) < 2:
            await trio.sleep(0.01)  # a look takes about 20 ms
        moved = time.monotonic() - t0

    async def probe() -> None:
        nonlocal took
        started = time.monotonic()
        ok = await _probe(lab)
        if time.monotonic() - started > SLOW:
            counts["slow"] += 1  # e.g. a SYN lost in the dying pep's queue: retried after 1 s
        if not ok:
            counts["failed"] += 1
        elif splits(lab, backup) > before:
            took = took or time.monotonic() - t0
        else:
            counts["unsplit"] += 1  # through the old master, whose rules fail open

    _fail(lab, active, what)
    t0 = time.monotonic()
    async with trio.open_nursery() as nursery:
        nursery.start_soon(watch)
        # A new connection every PROBE_EVERY, each on its own: as clients keep arriving.
        while took is None and time.monotonic() - t0 < 30:
            nursery.start_soon(probe)
            await trio.sleep(PROBE_EVERY)
        if took is None:
            nursery.cancel_scope.cancel()  # no failover within 30 s: reported as such
        else:  # the probes in flight end by themselves (PROBE_TIMEOUT), the watcher too
            nursery.cancel_scope.deadline = trio.current_time() + PROBE_TIMEOUT + 1
    _repair(lab, active, what)
    return {
        "failed_gateway": active,
        "backup": backup,
        "failover_s": None if took is None else round(took, 3),
        "addresses_moved_s": None if moved is None else round(moved, 3),
        "succeeded_unsplit": counts["unsplit"],
        "slow": counts["slow"],
        "failed": counts["failed"],
    }


def failover(lab: Lab, runs: int = 5, what: str = "pep") -> dict[str, Any]:
    out = []
    for _ in range(runs):
        out.append(trio.run(_one_failover, lab, what))
        time.sleep(1.0)  # the repaired gateway is backup again: a few adverts more

    def median(key: str) -> float | None:
        xs = [r[key] for r in out if r[key] is not None]
        return round(statistics.median(xs), 3) if xs else None

    return {
        "workload": "failover",
        "failure": what,
        "runs": out,
        "failover_median_s": median("failover_s"),
        "addresses_moved_median_s": median("addresses_moved_s"),
        "no_failover": sum(r["failover_s"] is None for r in out),
        "failed_total": sum(r["failed"] for r in out),
        "unsplit_total": sum(r["succeeded_unsplit"] for r in out),
        "slow_total": sum(r["slow"] for r in out),
    }


async def _spread(lab: Lab, n: int, parallel: int) -> int:
    failed = 0
    todo = iter(range(n))

    async def worker() -> None:
        nonlocal failed
        for _ in todo:
            if not await _probe(lab, 10_000):
                failed += 1

    async with trio.open_nursery() as nursery:
        for _ in range(parallel):
            nursery.start_soon(worker)
    return failed


def spread(lab: Lab, n: int = 400, parallel: int = 20, after: int = 100) -> dict[str, Any]:
    before = {gw: splits(lab, gw) for gw in GATEWAYS}
    failed = trio.run(_spread, lab, n, parallel)
    got = {gw: splits(lab, gw) - before[gw] for gw in GATEWAYS}
    # gwa's pep killed: the flows hashed to gwa cross it unsplit (fail-open).
    sigkill(lab, "gwa")
    lab.stop("gwa")
    b0 = splits(lab, "gwb")
    failed_after = trio.run(_spread, lab, after, parallel)
    return {
        "workload": "spread",
        "connections": n,
        "failed": failed,
        "split": got,
        "share": {gw: round(v / n, 3) for gw, v in got.items()},
        "after_gwa_killed": {
            "connections": after,
            "failed": failed_after,
            "split_by_gwb": splits(lab, "gwb") - b0,
        },
    }
