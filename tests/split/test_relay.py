"""The relay engine over loopback TCP (no root): every byte both ways, half-close each way, a
reset passed on as an RST, the idle timeout, cancellation, the link legs' hooks, and the pipes
lent only while bytes move. Then, in a namespace, what idle connections cost the daemon."""

from __future__ import annotations

import contextlib
import os
import socket
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from typing import Any

import pytest
import trio

from pep.split.pipes import PipePool
from pep.split.relay import Relayer
from pep.split.relay_state import RelayStats
from pep.testing.daemon import StartPep
from pep.testing.netenv import ADDRS, PORT
from pep.testing.topology import Topology
from pep.testing.traffic import (
    both_ways,
    connect,
    exchange,
    read_until_end,
    recv_to_eof,
    send_all,
    sending,
    serving,
    sha,
)
from tests.helpers.fakes import Leg
from tests.helpers.loopback import App, aborted, tcp_pair

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


@pytest.fixture
async def relayer(nursery: trio.Nursery) -> AsyncIterator[Relayer]:
    """A running engine with its own pipe pool; every test ends with no pipe lent."""
    engine = Relayer(PipePool())
    await nursery.start(engine.run)
    yield engine
    assert engine.pipes.lent == 0, "a pipe was not given back"


@dataclass
class Split:
    """A split connection's four sockets: the applications' and pep's legs (loopback TCP)."""

    client: App
    server: App
    pep_client: socket.socket  # pep's client-side leg
    pep_upstream: socket.socket  # pep's upstream leg
    stats: RelayStats = field(default_factory=RelayStats)

    async def relay(self, relayer: Relayer, **options: Any) -> None:
        await relayer.relay(self.pep_client, self.pep_upstream, self.stats, **options)


@contextlib.contextmanager
def split() -> Iterator[Split]:
    client, pep_client = tcp_pair()
    server, pep_upstream = tcp_pair()
    try:
        yield Split(client, server, pep_client, pep_upstream)
    finally:
        for sock in (client, server, pep_client, pep_upstream):
            sock.close()


@pytest.mark.parametrize("pipe_size", [4096, 1 << 20])
async def test_every_byte_both_ways_at_once(relayer: Relayer, pipe_size: int) -> None:
    up, down = os.urandom(3 << 20), os.urandom(5 << 20)
    with trio.fail_after(30), split() as s:
        async with trio.open_nursery() as n:
            n.start_soon(lambda: s.relay(relayer, pipe_size=pipe_size))
            client_got, server_got = await both_ways(s.client, s.server, sending(up), sending(down))
        assert (client_got, server_got) == ((sha(down), len(down)), (sha(up), len(up)))
        assert (s.stats.up, s.stats.down, s.stats.close_reason) == (len(up), len(down), "eof")
        assert s.pep_client.fileno() == s.pep_upstream.fileno() == -1  # both closed
    pool = relayer.pipes
    assert pool.lent == 0 and pool.idle() == pool.created > 0  # lent while moving, all back


@pytest.mark.parametrize("first", ["client", "server"])
async def test_half_close_either_side_first(relayer: Relayer, first: str) -> None:
    """RFC 9293 3.6: the side that sent its FIN first still gets everything the other sends
    after it (PEPsal v2 lost that tail)."""
    with trio.fail_after(10), split() as s:
        closer, other = (s.client, s.server) if first == "client" else (s.server, s.client)
        async with trio.open_nursery() as n:
            n.start_soon(lambda: s.relay(relayer))
            await send_all(closer, b"request")
            closer.shutdown(socket.SHUT_WR)
            assert await recv_to_eof(other) == b"request"
            # Half-closed: one direction done, the other still open (pep status shows it).
            assert (s.stats.up_eof, s.stats.down_eof) == (first == "client", first == "server")
            tail = os.urandom(1 << 20)
            await send_all(other, tail)
            other.shutdown(socket.SHUT_WR)
            assert await recv_to_eof(closer) == tail
        assert s.stats.close_reason == "eof"


@pytest.mark.parametrize("failing", ["client", "upstream"])
async def test_a_reset_is_passed_on_as_a_reset(relayer: Relayer, failing: str) -> None:
    """A truncated transfer must not look complete: the other side gets an RST, not a FIN."""
    with trio.fail_after(10), split() as s:
        gone, other = (s.client, s.server) if failing == "client" else (s.server, s.client)
        async with trio.open_nursery() as n:
            n.start_soon(lambda: s.relay(relayer))
            await send_all(gone, b"part of it")
            assert await other.recv(100) == b"part of it"
            aborted(gone)
            assert (await read_until_end(other))[0] == "reset"
        assert s.stats.close_reason.startswith(f"{failing} error: ")


async def test_an_idle_connection_is_closed_with_a_fin(relayer: Relayer) -> None:
    with trio.fail_after(10), split() as s:
        async with trio.open_nursery() as n:
            n.start_soon(lambda: s.relay(relayer, idle_timeout=0.3))
            assert await read_until_end(s.client) == ("eof", 0)
            assert await read_until_end(s.server) == ("eof", 0)
        assert s.stats.close_reason == "idle timeout"


async def test_traffic_keeps_a_connection_from_idling_out(relayer: Relayer) -> None:
    """The engine moves the idle deadline on as bytes move (generous: 2 s of idle allowed,
    a byte every 0.1 s for 3 s)."""
    with trio.fail_after(20), split() as s:
        async with trio.open_nursery() as n:
            n.start_soon(lambda: s.relay(relayer, idle_timeout=2.0))
            for _ in range(30):
                await send_all(s.client, b"x")
                assert await s.server.recv(10) == b"x"
                await trio.sleep(0.1)
            assert s.stats.close_reason == ""  # still relaying
        assert s.stats.close_reason == "idle timeout"


async def test_cancelling_a_relay_resets_both_sides(relayer: Relayer) -> None:
    """The daemon stopping: neither peer may take the cut-off connection for a complete one."""
    with trio.fail_after(10), split() as s:
        async with trio.open_nursery() as n:
            n.start_soon(lambda: s.relay(relayer))
            await send_all(s.client, b"hello")
            assert await s.server.recv(10) == b"hello"
            n.cancel_scope.cancel()
        assert s.stats.close_reason == "cancelled"
        assert (await read_until_end(s.client))[0] == "reset"
        assert (await read_until_end(s.server))[0] == "reset"


async def test_a_link_leg_is_woken_before_its_first_byte_and_closed_at_the_end(
    relayer: Relayer,
) -> None:
    upstream_leg, client_leg = Leg(), Leg()
    with trio.fail_after(10), split() as s:
        async with trio.open_nursery() as n:
            n.start_soon(lambda: s.relay(relayer, links=(client_leg, upstream_leg)))
            for _ in range(3):
                await send_all(s.client, b"up")
                assert await s.server.recv(10) == b"up"
            assert (upstream_leg.woken, client_leg.woken) == (1, 0)  # once, while idle
            upstream_leg.active = False  # the sharer found it idle
            await send_all(s.client, b"again")
            assert await s.server.recv(10) == b"again"
            assert upstream_leg.woken == 2
            s.client.shutdown(socket.SHUT_WR)
            s.server.shutdown(socket.SHUT_WR)
        assert (upstream_leg.closed, client_leg.closed) == (1, 1)


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
