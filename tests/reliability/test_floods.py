"""Floods, against the real daemon: a SYN flood, and a SYN burst while the reader is stalled.
The SYNs are crafted with a raw socket in the client namespace and never leave it and the
gateway and server namespaces."""

from __future__ import annotations

import os
import signal
import time

import pytest
import trio

from bench.paths import rss_kib
from pep.testing.daemon import StartPep, kernel_queue, settle, status_json
from pep.testing.netenv import CLIENT_IP, GW_SERVER_IP, PORT, SERVER_IP
from pep.testing.topology import Topology
from pep.testing.traffic import request, serving
from tests.helpers.packets import raw_sender, raw_syns, send_packets

pytestmark = pytest.mark.netns

SERVER = (SERVER_IP, PORT)


async def flood(topo: Topology, count: int, seconds: float, seed: int = 1) -> float:
    """``count`` SYNs to the server from distinct client ports, spread over ``seconds``;
    returns how long the sending took. Sent from a thread, so the test's own connections
    carry on meanwhile."""
    packets = list(raw_syns(CLIENT_IP, SERVER_IP, PORT, count, seed))
    batches = max(1, int(seconds / 0.05))
    per = -(-count // batches)

    def send() -> float:
        sock = raw_sender(topo)
        t0 = time.monotonic()
        with sock:
            for i in range(0, count, per):
                send_packets(sock, packets[i : i + per], SERVER_IP)
                time.sleep(max(0.0, t0 + (i // per + 1) * 0.05 - time.monotonic()))
        return time.monotonic() - t0

    return await trio.to_thread.run_sync(send)


async def test_syn_flood_keeps_the_flow_table_and_memory_bounded_and_serves_real_clients(
    topo: Topology, start_pep: StartPep
) -> None:
    table = 4096
    pep = start_pep(config=f"flow_table_size = {table}\n")
    pid = pep.pid
    syns = 20_000
    replies: list[bool] = []

    async def legit(i: int) -> None:
        payload = b"legit %d " % i + os.urandom(100_000)
        replies.append(await request(topo, SERVER, payload) == payload.upper())

    with trio.fail_after(60):
        async with serving(topo, SERVER) as accepted:
            await legit(-1)
            rss_before = rss_kib(pid)
            async with trio.open_nursery() as f:
                took: list[float] = []

                async def run_flood() -> None:
                    took.append(await flood(topo, syns, 3.0))

                f.start_soon(run_flood)
                for i in range(30):  # real clients during the flood, one every 0.1 s
                    f.start_soon(legit, i)
                    await trio.sleep(0.1)
            # Every queued SYN got its verdict.
            kq = await settle(lambda: kernel_queue(topo), lambda q: q is not None and not q.waiting)
            rss_after = rss_kib(pid)
            doc = await status_json(pep)
            await legit(100)  # and afterwards
    assert kq is not None
    print(
        f"{syns} SYNs in {took[0]:.2f}s; kernel queued {kq.last_id}, pep {doc['syn']}, "
        f"flows {doc['flows']}, RSS {rss_before} -> {rss_after} KiB"
    )
    assert replies == [True] * 32  # every real client was served, byte-exact
    assert sum(a[0] == GW_SERVER_IP for a in accepted) == 32  # ...and split
    assert kq.waiting == 0 and kq.user_dropped == 0
    assert doc["syn"]["queued"] == kq.last_id >= syns  # read and verdicted: every one
    flows = doc["flows"]
    assert flows["pending"] <= table  # bounded...
    # ...by evicting the oldest (a real client's SYN may also claim or replace a record)
    assert flows["evicted"] >= syns - table - flows["expired"] - 32
    assert rss_after - rss_before < 32 << 10, "RSS grew by more than 32 MiB under the flood"
    assert pep.running


async def test_reader_stalled_under_a_syn_burst_fails_open_then_recovers_and_counts_it(
    topo: Topology, start_pep: StartPep
) -> None:
    # A small netlink buffer: the burst overflows it while the reader is stopped.
    pep = start_pep(config="queue_rcvbuf = 65536\n")
    burst = 2000
    times: list[float] = []
    with trio.fail_after(40):
        async with serving(topo, SERVER) as accepted:
            assert await request(topo, SERVER, b"before") == b"BEFORE"
            pep.signal(signal.SIGSTOP)
            try:
                await flood(topo, burst, 0.5)
                stalled = kernel_queue(topo)
                for i in range(20):  # new connections while the reader is stopped
                    t0 = trio.current_time()
                    assert await request(topo, SERVER, b"s%d" % i) == b"S%d" % i
                    times.append(trio.current_time() - t0)
                during = [a[0] for a in accepted[1:]]
            finally:
                pep.signal(signal.SIGCONT)
            kq = await settle(lambda: kernel_queue(topo), lambda q: q is not None and not q.waiting)
            doc = await status_json(pep)
            before = len(accepted)
            assert await request(topo, SERVER, b"after") == b"AFTER"
            split_again = accepted[before][0]
    assert stalled is not None and kq is not None
    print(
        f"stalled: {stalled}; after: {kq}; pep {doc['syn']}; "
        f"connect+echo while stopped: max {max(times) * 1000:.1f} ms"
    )
    assert stalled.waiting > 0  # SYNs were held while the reader was stopped...
    assert during == [CLIENT_IP] * 20  # ...yet every new connection went end to end
    assert max(times) < 0.5  # at once, not after a SYN retransmission
    assert kq.waiting == 0  # after SIGCONT every held SYN got its verdict
    assert doc["syn"]["enobufs"] >= 1  # the overflow is counted, and survived
    assert doc["syn"]["queued"] < burst  # the rest passed the kernel unsplit (FAIL_OPEN)
    assert split_again == GW_SERVER_IP
    assert pep.running
