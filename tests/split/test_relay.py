"""Relay resources: idle connections hold no splice pipes; pipes are pooled and reused."""

from __future__ import annotations

import os

import pytest
import trio

from pep.split.pipes import PipePool
from pep.testing.daemon import StartPep
from pep.testing.netenv import ADDRS, PORT
from pep.testing.topology import Topology
from pep.testing.traffic import connect, exchange, serving

NET = ADDRS[4]


def test_pipe_pool_reuses_and_bounds_idle_pipes() -> None:
    pool = PipePool(keep=2)
    a, b, c = pool.get(65536), pool.get(65536), pool.get(65536)
    assert pool.created == 3 and pool.lent == 3
    for p in (a, b, c):
        pool.put(65536, p)
    assert pool.idle() == 2 and pool.lent == 0  # the third was closed, not kept
    with pytest.raises(OSError):
        os.fstat(c[0])
    again = pool.get(65536)
    assert again in (a, b) and pool.created == 3  # reused, not created
    pool.discard(again)  # maybe not empty: closed
    with pytest.raises(OSError):
        os.fstat(again[0])


def fds(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


@pytest.mark.netns
async def test_idle_connections_hold_two_fds_each(topo: Topology, start_pep: StartPep) -> None:
    pid = start_pep().pid
    count = 100
    with trio.fail_after(30):
        async with serving(topo, (NET.server, PORT)):
            base = fds(pid)
            socks = [await connect(topo.ns("client"), (NET.server, PORT)) for _ in range(count)]
            await trio.sleep(0.5)  # every connection accepted and connected upstream
            idle = fds(pid) - base
            # Each idle split connection: the client socket and the upstream socket.
            assert idle <= 2 * count + 4, f"{idle} fds for {count} idle connections"
            for i, s in enumerate(socks):
                with s:
                    payload = f"conn {i} ".encode() * 1000
                    assert await exchange(s, payload) == payload.upper()
            await trio.sleep(0.5)
            after = fds(pid) - base
            # All closed: what remains are pooled pipes (two fds each), reused by the
            # connections one after another rather than one pair per connection.
            assert after <= 2 * 4, f"{after} fds left after closing everything"
