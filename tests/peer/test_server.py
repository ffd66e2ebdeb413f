"""The far end's peer listener over loopback (no root), with the real handshake from a
hand-made near end (tests/helpers/peer.py): strangers, wrong keys, garbage, bad headers and
forbidden destinations get an RST and connect nowhere; a good flow is relayed byte for byte.

The far end's loop guard would refuse every 127.0.0.1 destination; the tests that relay tell it
that 127.0.0.1 stands for a server across the network.
"""

from __future__ import annotations

import contextlib
import dataclasses
import ipaddress
import os
import socket
from collections.abc import AsyncIterator

import pytest
import trio

from pep.capture.flows import FlowTable
from pep.config import Config
from pep.config.peer import Peer
from pep.peer import server, wire
from pep.peer.server import PeerListener
from pep.split.session import Sessions
from pep.testing.traffic import both_ways, read_until_end, send_all, sending, sha
from tests.helpers.loopback import App, free_port, listening
from tests.helpers.peer import near_handshake

SECRET = b"k" * 32
CLIENT = ("10.1.2.3", 4567)  # the client the near end splits for (only named in the header)
CFG = Config(family="ipv4")


@contextlib.asynccontextmanager
async def far_end(
    allow: str = "127.0.0.0/8", served: bool = True, cfg: Config = CFG
) -> AsyncIterator[PeerListener]:
    """A far end listening on 127.0.0.1 for near ends from ``allow``; ``served``: the loop
    guard lets 127.0.0.1 through."""
    peer = Peer(
        key_file="/unused", listen=f"127.0.0.1:{free_port()}", allow=(ipaddress.ip_network(allow),)
    )
    sessions = Sessions(cfg, FlowTable(64, 30.0))
    if served:
        sessions.local.fn = lambda host: False
    listener = PeerListener(peer, SECRET, cfg, sessions)
    listener.bind()
    try:
        with trio.fail_after(15):
            async with trio.open_nursery() as n:
                await n.start(sessions.relayer.run)
                n.start_soon(listener.serve, n)
                yield listener
                n.cancel_scope.cancel()
    finally:
        listener.close()


async def near(listener: PeerListener, secret: bytes | None = SECRET) -> App:
    """A connection to the far end, through the handshake with ``secret`` (None: none)."""
    sock = trio.socket.socket()
    await sock.connect(listener.address)
    if secret is not None:
        await near_handshake(sock, secret)
    return sock


async def flow(listener: PeerListener, dst: tuple[str, int]) -> tuple[App, int]:
    """An authenticated connection that asked for a flow to ``dst``: (it, the STATUS byte)."""
    sock = await near(listener)
    await send_all(sock, wire.encode_flow(wire.Flow(dst, CLIENT)))
    status = await sock.recv(1)
    assert status, "closed without a STATUS"
    return sock, status[0]


async def test_a_flow_is_relayed_byte_exact() -> None:
    up, down = os.urandom(1 << 20), os.urandom(2 << 20)
    with listening() as srv:
        async with far_end() as far:
            sock, status = await flow(far, srv.getsockname())
            with sock:
                assert status == wire.CONNECTED
                server_end = trio.socket.from_stdlib_socket(srv.accept()[0])
                with server_end:
                    got = await both_ways(sock, server_end, sending(up), sending(down))
            assert got == ((sha(down), len(down)), (sha(up), len(up)))
            while len(far.sessions.table):
                await trio.sleep(0.01)
            table = far.sessions.table
            assert (table.closed, table.closed_up, table.closed_down) == (1, len(up), len(down))
            assert (far.counters.accepted, far.counters.flows) == (1, 1)


async def test_a_near_end_from_outside_allow_is_reset() -> None:
    async with far_end(allow="10.0.0.0/8") as far:
        with await near(far, secret=None) as sock:
            assert (await read_until_end(sock))[0] == "reset"
        assert (far.counters.not_allowed, far.counters.accepted) == (1, 0)


@pytest.mark.parametrize(
    "junk",
    [b"GET / HTTP/1.1\r\nHost: x\r\n\r\n", wire.encode_flow(wire.Flow(("10.9.9.9", 80), CLIENT))],
    ids=["http", "flow-before-handshake"],
)
async def test_garbage_instead_of_the_handshake_is_reset(junk: bytes) -> None:
    async with far_end() as far:
        with await near(far, secret=None) as sock:
            await send_all(sock, junk + bytes(64))
            assert (await read_until_end(sock))[0] == "reset"
        assert far.counters.auth_failed == 1


async def test_a_wrong_key_gets_no_ready() -> None:
    async with far_end() as far:
        with pytest.raises(ConnectionResetError):
            await near(far, secret=os.urandom(32))
        assert (far.counters.auth_failed, far.counters.accepted) == (1, 0)


async def test_a_silent_near_end_is_reset_after_the_handshake_timeout(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(server, "HANDSHAKE_TIMEOUT", 0.2)
    async with far_end() as far:
        with await near(far, secret=None) as sock:
            assert (await read_until_end(sock))[0] == "reset"
        assert far.counters.auth_failed == 1


@pytest.mark.parametrize(
    "header",
    [b"X" * wire.FLOW_HEAD_LEN, b"F\x05" + bytes(wire.FLOW_HEAD_LEN)],
    ids=["not-a-flow", "family-5"],
)
async def test_a_bad_flow_header_is_reset(header: bytes) -> None:
    async with far_end() as far:
        with await near(far) as sock:
            await send_all(sock, header)
            assert (await read_until_end(sock))[0] == "reset"
        assert (far.counters.accepted, far.counters.bad_header) == (1, 1)


async def test_a_destination_on_the_far_pep_itself_is_forbidden() -> None:
    """The loop guard of every split connection: FORBIDDEN, then an RST; nothing connected."""
    with listening() as srv:
        async with far_end(served=False) as far:
            sock, status = await flow(far, srv.getsockname())
            with sock:
                assert status == wire.FORBIDDEN
                assert (await read_until_end(sock))[0] == "reset"
            assert far.counters.forbidden == 1
        srv.setblocking(False)
        with pytest.raises(BlockingIOError):
            srv.accept()


async def test_a_refusing_destination_is_reported_to_the_near_end() -> None:
    with listening() as srv:
        closed = srv.getsockname()
    async with far_end() as far:
        sock, status = await flow(far, closed)
        with sock:
            assert status == wire.REFUSED
            assert (await read_until_end(sock))[0] == "reset"
        assert (far.counters.upstream_failed, far.counters.flows) == (1, 0)


async def test_a_pooled_connection_waits_until_idle_timeout() -> None:
    """A connection waiting in the near end's pool is reset once it has waited idle_timeout;
    one the near end lets go (FIN) is closed, and counted as nothing wrong."""
    async with far_end(cfg=dataclasses.replace(CFG, idle_timeout=0.3)) as far:
        with await near(far) as waiting:
            assert (await read_until_end(waiting))[0] == "reset"
        with await near(far) as leaving:
            leaving.shutdown(socket.SHUT_WR)
            assert (await read_until_end(leaving))[1] == 0
        c = far.counters
        assert (c.accepted, c.bad_header, c.auth_failed, c.flows) == (2, 0, 0, 0)
        assert far.snapshot()["accepted"] == 2
