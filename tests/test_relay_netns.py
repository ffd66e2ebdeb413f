"""Relay resources: idle connections hold no splice pipes; pipes are pooled and reused."""

from __future__ import annotations

import os
import socket
from collections.abc import Iterator

import pytest
import trio

from pep.relay import PipePool
from pep.topology import Topology
from tests.netenv import (
    ADDRS,
    INGRESS,
    PepProcess,
    connect,
    gateway_topology,
    listen,
    recv_to_eof,
    send_all,
    serve,
)
from tests.test_core_netns import PORT, echo_upper

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


@pytest.fixture
def topo() -> Iterator[Topology]:
    with gateway_topology("l") as t:
        yield t


@pytest.mark.netns
async def test_idle_connections_hold_two_fds_each(topo: Topology) -> None:
    pep = PepProcess(topo, "gw", ["--interface", INGRESS]).start()
    assert pep.proc is not None
    pid = pep.proc.pid
    count = 100
    try:
        with trio.fail_after(30):
            async with trio.open_nursery() as n:
                n.start_soon(
                    serve, await listen(topo.ns("server"), NET.server, PORT), echo_upper, []
                )
                base = fds(pid)
                socks = [await connect(topo.ns("client"), (NET.server, PORT)) for _ in range(count)]
                await trio.sleep(0.5)  # every connection accepted and connected upstream
                idle = fds(pid) - base
                # Each idle split connection: the client socket and the upstream socket.
                assert idle <= 2 * count + 4, f"{idle} fds for {count} idle connections"
                for i, s in enumerate(socks):
                    with s:
                        payload = f"conn {i} ".encode() * 1000
                        await send_all(s, payload)
                        s.shutdown(socket.SHUT_WR)
                        assert await recv_to_eof(s) == payload.upper()
                await trio.sleep(0.5)
                after = fds(pid) - base
                # All closed: what remains are pooled pipes (two fds each), reused by the
                # connections one after another rather than one pair per connection.
                assert after <= 2 * 4, f"{after} fds left after closing everything"
                n.cancel_scope.cancel()
    finally:
        pep.stop()
