"""`workers = 2`: two processes share the listener (SO_REUSEPORT) and the queues."""

from __future__ import annotations

import os
import signal

import pytest
import trio

from pep.testing.daemon import PepProcess, StartPep, status_json, wait_for
from pep.testing.netenv import ADDRS, PORT, rules_in
from pep.testing.topology import Topology
from pep.testing.traffic import request, serving, sha

pytestmark = pytest.mark.netns

NET = ADDRS[4]


@pytest.fixture
def pep(start_pep: StartPep) -> PepProcess:
    return start_pep(config="workers = 2\ndrain_timeout = 5.0\n", timeout=30)


def worker_pids(doc: dict) -> list[int]:
    return [w["pid"] for w in doc["workers"]]


async def many(topo: Topology, count: int) -> list[tuple[str, int]]:
    """``count`` concurrent request/responses, each checked byte for byte."""
    done = 0

    async def one(i: int) -> None:
        nonlocal done
        payload = f"conn-{i}:".encode() + os.urandom(2000 + i * 37)
        reply = await request(topo, (NET.server, PORT), payload)
        assert sha(reply) == sha(payload.upper()), f"connection {i} got wrong data"
        done += 1

    with trio.fail_after(60):
        async with serving(topo, (NET.server, PORT)) as accepted, trio.open_nursery() as clients:
            for i in range(count):
                clients.start_soon(one, i)
    assert done == count
    return accepted


async def test_two_workers_200_concurrent_connections(topo: Topology, pep: PepProcess) -> None:
    rules = rules_in(topo, "gw")
    assert "--queue-balance 0:1" in rules
    doc = await status_json(pep)
    assert [w["state"] for w in doc["workers"]] == ["running", "running"]
    assert len(set(worker_pids(doc)) | {pep.pid}) == 3
    assert sorted(q["queue"] for q in doc["kernel_queues"]) == [0, 1]
    assert all(q["portid"] for q in doc["kernel_queues"])  # both queues bound

    accepted = await many(topo, 200)
    assert len(accepted) == 200 and {a[0] for a in accepted} == {NET.gw_server}  # all split
    assert len(pep.closed_lines(expect=200)) == 200

    async def settled() -> bool:
        return (await status_json(pep))["totals"]["closed"] == 200

    await wait_for(settled, 5, "200 closed connections in status")
    doc = await status_json(pep)
    assert doc["listener"]["split"] == 200 and doc["syn"]["split"] == 200
    assert doc["totals"]["active"] == 0
    # SO_REUSEPORT spread the connections over both workers (all on one: p = 2**-199).
    per_worker = [w["accepted"] for w in doc["workers"]]
    assert sum(per_worker) == 200 and min(per_worker) > 0, per_worker
    # A SYN recorded by one worker and accepted by the other is expected (pep.ops.workers).
    assert doc["listener"]["flow_missing"] + doc["listener"]["flow_mismatch"] <= 200

    pids = worker_pids(doc)
    pep.signal(signal.SIGTERM)
    assert await trio.to_thread.run_sync(pep.wait, 20) == 0
    assert "PEP" not in rules_in(topo, "gw")
    for pid in pids:
        assert not os.path.exists(f"/proc/{pid}") or _zombie(pid)


def _zombie(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] == "Z"
    except OSError:
        return True


async def test_a_dead_worker_is_restarted_and_traffic_keeps_flowing(
    topo: Topology, pep: PepProcess
) -> None:
    doc = await status_json(pep)
    victim = doc["workers"][0]["pid"]
    os.kill(victim, signal.SIGKILL)

    async def replaced() -> bool:
        d = await status_json(pep)
        w = d["workers"][0]
        return w["state"] == "running" and w["pid"] != victim and w["restarts"] == 1

    await wait_for(replaced, 15, "worker 0 restarted", step=0.2)
    assert f"worker 0 (pid {victim}) exited" in pep.log()
    accepted = await many(topo, 50)
    assert {a[0] for a in accepted} == {NET.gw_server}
