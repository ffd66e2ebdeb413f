"""The session over loopback TCP (no root): who is refused, a split flow relayed and accounted,
an upstream that refuses, a client gone before the relay, pooled and direct legs, Fast Open's
first bytes taken from the client exactly once, and the link legs entered in the sharer.

TPROXY mode stands in for the kernel's redirection: the original destination of a TPROXY'd
socket is its own address, so a client that connects to a loopback server is, to the session,
a client on its way to that server, and the session's upstream leg is the server's next
connection. The loop guard (pep.split.origdst.LocalAddresses) would refuse 127.0.0.1: the
served tests tell it that 127.0.0.1 stands for a server across the network.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import socket
from collections.abc import AsyncIterator
from dataclasses import dataclass

import pytest
import trio

from pep.capture.flows import FlowTable
from pep.capture.preconnect import UpstreamError
from pep.capture.syn import SynInfo
from pep.config import Config
from pep.split.hooks import NO_LINK, LinkSide, Opened
from pep.split.session import Sessions
from pep.testing.traffic import (
    both_ways,
    exchange,
    read_until_end,
    recv_to_eof,
    send_all,
    sending,
    sha,
)
from tests.helpers.fakes import FakeLink, FakePool
from tests.helpers.loopback import App, accept, listening

TPROXY = Config(mode="tproxy")


@dataclass
class Gateway:
    """A session table in front of one loopback server (``srv``), with a client on its way."""

    sessions: Sessions
    srv: socket.socket
    client: App  # the client application
    pep_client: socket.socket  # the connection as pep accepted it
    nursery: trio.Nursery

    @property
    def server(self) -> tuple[str, int]:
        return self.srv.getsockname()

    def handle(self) -> None:
        self.nursery.start_soon(self.sessions.handle, self.pep_client)

    async def upstream(self) -> App:
        """The server's end of the session's upstream leg."""
        return trio.socket.from_stdlib_socket(await accept(self.srv))

    def nothing_connected(self) -> bool:
        self.srv.setblocking(False)
        try:
            self.srv.accept()[0].close()
        except BlockingIOError:
            return True
        return False


@contextlib.asynccontextmanager
async def gateway(
    cfg: Config = TPROXY, links: LinkSide = NO_LINK, served: bool = True
) -> AsyncIterator[Gateway]:
    """``served``: the loop guard lets 127.0.0.1 through. A test that wants a pool sets
    ``sessions.pools`` (the pool needs the server's address)."""
    sessions = Sessions(cfg, FlowTable(64, 30.0), links)
    if served:
        sessions.local.fn = lambda host: False
    with trio.fail_after(15), listening() as srv:
        client = trio.socket.socket()
        await client.connect(srv.getsockname())
        with client, await accept(srv) as pep_client:
            async with trio.open_nursery() as n:
                await n.start(sessions.relayer.run)
                yield Gateway(sessions, srv, client, pep_client, n)
                n.cancel_scope.cancel()


def syn(src: tuple[str, int], dst: tuple[str, int]) -> SynInfo:
    return SynInfo(4, src[0], src[1], dst[0], dst[1], 0, 64, 1460, 7, True, None)


async def settled(sessions: Sessions) -> None:
    """Until the session's connection has left the table (it was closed and accounted)."""
    while len(sessions.table) or sessions.counters.active:
        await trio.sleep(0.01)


# --- who is served ------------------------------------------------------------------------------


async def test_a_client_that_came_to_the_listener_itself_is_refused() -> None:
    """REDIRECT mode asks conntrack (SO_ORIGINAL_DST); a connection nobody redirected has no
    entry: pep is not an open proxy. The client gets an RST, nothing is connected."""
    async with gateway(Config(mode="redirect")) as g:
        g.handle()
        assert (await read_until_end(g.client))[0] == "reset"
        assert g.sessions.counters.not_redirected == 1 and g.nothing_connected()


async def test_the_loop_guard_refuses_this_gateway_s_own_address() -> None:
    async with gateway(served=False) as g:  # the real guard: 127.0.0.1 is this host's
        g.handle()
        assert (await read_until_end(g.client))[0] == "reset"
        assert g.sessions.counters.refused_local == 1 and g.nothing_connected()


# --- a split flow -------------------------------------------------------------------------------


@pytest.mark.parametrize("recorded", ["same", "other", "none"])
async def test_a_split_flow_is_relayed_byte_exact_and_accounted(recorded: str) -> None:
    """What the SYN reader recorded is only counted: the kernel's destination wins."""
    up, down = os.urandom(1 << 20), os.urandom(3 << 20)
    async with gateway() as g:
        if recorded != "none":
            dst = g.server if recorded == "same" else ("10.9.9.9", 80)
            g.sessions.flows.record(syn(g.client.getsockname(), dst))
        g.handle()
        server = await g.upstream()
        with server:
            got = await both_ways(g.client, server, sending(up), sending(down))
        assert got == ((sha(down), len(down)), (sha(up), len(up)))
        await settled(g.sessions)
        c, table = g.sessions.counters, g.sessions.table
        assert (c.split, c.flow_missing, c.flow_mismatch) == (
            1, recorded == "none", recorded == "other",
        )  # fmt: skip
        assert (table.closed, table.closed_up, table.closed_down) == (1, len(up), len(down))


async def test_an_upstream_that_refuses_resets_the_client() -> None:
    async with gateway() as g:
        g.srv.close()  # the server went away: pep's connect is refused
        g.handle()
        assert (await read_until_end(g.client))[0] == "reset"
        await settled(g.sessions)
        assert g.sessions.counters.upstream_failed == 1
        assert g.sessions.table.failures == {"connect failed: ECONNREFUSED": 1}


@pytest.mark.parametrize("ending", ["client gone", "daemon stopping"])
async def test_nothing_is_left_behind_when_the_relay_never_starts(ending: str) -> None:
    """The upstream connect ends with an OSError (the client went away meanwhile) or is
    cancelled (the daemon stops): the client is reset, the connection leaves the table, and
    a cancellation goes on up."""
    async with gateway() as g:
        peer = g.client.getsockname()
        stopped = trio.CancelScope()

        async def connect() -> Opened:
            if ending == "daemon stopping":
                stopped.cancel()
                await trio.sleep_forever()
            raise ConnectionResetError("the client reset")

        async def refuse(e: UpstreamError) -> None:
            raise AssertionError("not a refusal")

        async def splice() -> None:
            with stopped:
                await g.sessions.splice(
                    g.pep_client, peer=peer, dst=g.server, flow_text="-", client_via=peer[0],
                    connect=connect, refuse=refuse,
                )  # fmt: skip

        g.nursery.start_soon(splice)
        assert (await read_until_end(g.client))[0] == "reset"
        assert stopped.cancelled_caught == (ending == "daemon stopping")
        assert len(g.sessions.table) == 0 and g.sessions.counters.split == 0


# --- pooled and direct legs, Fast Open ----------------------------------------------------------


async def test_a_pool_that_serves_the_destination_carries_the_first_bytes() -> None:
    """The pool's leg got the client's first bytes (peeked); the session then takes them from
    the client, so the server gets every byte exactly once. The link is asked about the pool's
    address, not the destination's."""
    request, reply = b"GET / HTTP/1.1\r\n\r\n" + os.urandom(1000), os.urandom(1 << 20)
    link = FakeLink({"192.0.2.1"})
    async with gateway(links=link) as g:
        pool = FakePool(g.server, {"127.0.0.1"})
        g.sessions.pools = (pool,)
        await send_all(g.client, request)
        g.handle()
        server = await g.upstream()
        with server:
            assert await recv_exactly(server, len(request)) == request
            g.client.shutdown(socket.SHUT_WR)
            assert await recv_to_eof(server) == b""  # nothing sent twice
            await send_all(server, reply)
            server.shutdown(socket.SHUT_WR)
            assert await recv_to_eof(g.client) == reply
        await settled(g.sessions)
        assert pool.opened == [(g.server, g.client.getsockname(), request)] and pool.done == 1
        # The pooled leg, through 192.0.2.1, serving the destination (a hub's terminal's plan).
        assert [(leg.up, leg.far) for leg in link.legs] == [(True, g.server[0])]
        assert g.sessions.table.closed_up == len(request)


@pytest.mark.parametrize("fastopen", [False, True])
async def test_a_pool_with_none_to_give_sends_the_flow_direct(fastopen: bool) -> None:
    """Without Fast Open the peeked bytes stay in the client's socket for the relay; with it,
    they ride the direct connect's SYN and are taken from the client. Once, either way."""
    cfg = dataclasses.replace(TPROXY, tcp_fastopen=fastopen)
    request = os.urandom(5000)
    link = FakeLink({"127.0.0.1"})  # to see the direct leg's socket
    async with gateway(cfg, links=link) as g:
        pool = FakePool(g.server, {"127.0.0.1"}, empty=True)
        g.sessions.pools = (pool,)
        assert await exchanged(g, request) == request.upper()
        assert [first for _, _, first in pool.opened] == [request]
    upstream = [i for i, leg in enumerate(link.legs) if leg.up]
    assert [link.fastopen[i] for i in upstream] == [fastopen]


async def test_a_pool_that_does_not_serve_the_destination_is_not_asked() -> None:
    async with gateway() as g:
        pool = FakePool(g.server, {"10.9.9.9"})
        g.sessions.pools = (pool,)
        assert await exchanged(g, b"ping") == b"PING"
        assert pool.opened == []


async def test_a_pool_s_refusal_resets_the_client() -> None:
    async with gateway() as g:
        g.sessions.pools = (FakePool(g.server, {"127.0.0.1"}, refusal="far end: connect refused"),)
        await send_all(g.client, b"hello")
        g.handle()
        assert (await read_until_end(g.client))[0] == "reset"
        await settled(g.sessions)
        assert g.sessions.counters.upstream_failed == 1 and g.nothing_connected()


@pytest.mark.parametrize("client_first", [True, False], ids=["client-first", "server-first"])
async def test_fast_open_takes_the_first_bytes_from_the_client_once(client_first: bool) -> None:
    """With Fast Open the session waits up to fastopen_wait for the client's first bytes and
    connects with them; a server-speaks-first protocol sends nothing, and its connect is an
    ordinary one."""
    cfg = dataclasses.replace(TPROXY, tcp_fastopen=True, fastopen_wait=0.2)
    request, banner = os.urandom(3000), b"220 ready\r\n"
    async with gateway(cfg) as g:
        if client_first:
            await send_all(g.client, request)
        g.handle()
        server = await g.upstream()
        with server:
            if not client_first:
                await send_all(server, banner)
                assert await recv_exactly(g.client, len(banner)) == banner
                await send_all(g.client, request)
            assert await recv_exactly(server, len(request)) == request
            g.client.shutdown(socket.SHUT_WR)
            assert await recv_to_eof(server) == b""
            server.shutdown(socket.SHUT_WR)
            assert await recv_to_eof(g.client) == b""
        await settled(g.sessions)
        assert g.sessions.table.closed_up == len(request)


# --- the link -----------------------------------------------------------------------------------


async def test_legs_that_face_the_link_join_its_sharer_with_its_tuning() -> None:
    """Both legs face the link here (client and server are both 127.0.0.1): each joins, the
    client leg as the one sending down, both with the link's congestion control, and each
    leaves the sharer when the connection ends."""
    link = FakeLink({"127.0.0.1"}, congestion="reno")
    async with gateway(links=link) as g:
        assert await exchanged(g, b"x" * 70_000) == b"X" * 70_000
    assert sorted(leg.up for leg in link.legs) == [False, True]
    assert link.joined_with == ["reno", "reno"]
    assert [(leg.woken, leg.closed) for leg in link.legs] == [(1, 1), (1, 1)]


# --- helpers ------------------------------------------------------------------------------------


async def exchanged(g: Gateway, request: bytes) -> bytes:
    """One request through the session to an upper-casing server: the reply."""
    g.handle()
    async with trio.open_nursery() as n:

        async def serve() -> None:
            server = await g.upstream()
            with server:
                await send_all(server, (await recv_to_eof(server)).upper())

        n.start_soon(serve)
        reply = await exchange(g.client, request)
    await settled(g.sessions)
    return reply


async def recv_exactly(sock: App, n: int) -> bytes:
    got = b""
    while len(got) < n:
        chunk = await sock.recv(n - len(got))
        assert chunk, f"EOF after {len(got)} of {n} bytes"
        got += chunk
    return got
