"""The core scenarios: the real daemon splitting real connections between real namespaces.

Every scenario runs in both modes (REDIRECT, TPROXY) and over both IP versions; the daemon
always splits both families (the default), the variant picks the mode and the traffic's family.
"""

from __future__ import annotations

import errno
import os
import signal
from collections.abc import Iterator

import pytest
import trio

from pep.topology import Topology
from tests.netenv import (
    ADDRS,
    INGRESS,
    Addrs,
    PepProcess,
    connect,
    duplex,
    gateway_topology,
    listen,
    recv_to_eof,
    rules_in,
    send_all,
    sending,
    serve,
    sha,
)

pytestmark = pytest.mark.netns

PORT = 8080
VARIANTS = [("redirect", 4), ("tproxy", 4), ("redirect", 6), ("tproxy", 6)]


@pytest.fixture(params=VARIANTS, ids=[f"{m}-ipv{f}" for m, f in VARIANTS])
def variant(request: pytest.FixtureRequest) -> tuple[str, int]:
    return request.param


@pytest.fixture
def net(variant: tuple[str, int]) -> Addrs:
    return ADDRS[variant[1]]


@pytest.fixture
def pep_args(variant: tuple[str, int]) -> list[str]:
    return ["--interface", INGRESS, "--log-level", "debug", "--mode", variant[0]]


@pytest.fixture
def topo() -> Iterator[Topology]:
    with gateway_topology() as t:
        yield t


@pytest.fixture
def pep(topo: Topology, pep_args: list[str]) -> Iterator[PepProcess]:
    p = PepProcess(topo, "gw", pep_args)
    try:
        yield p.start()
    finally:
        p.stop()


def hostport(host: str, port: int) -> str:
    """How pep's log writes an address: host:port (IPv6 without brackets)."""
    return f"{host}:{port}"


async def echo_upper(conn: trio.socket.SocketType) -> None:
    data = await recv_to_eof(conn)
    await send_all(conn, data.upper())


async def request(
    topo: Topology, payload: bytes, server: str = ADDRS[4].server
) -> tuple[bytes, tuple[str, int]]:
    """One request/response from the client; returns the reply and the client's peer."""
    sock = await connect(topo.ns("client"), (server, PORT))
    with sock:
        peer = sock.getpeername()[:2]
        await send_all(sock, payload)
        sock.shutdown(trio.socket.SHUT_WR)
        return await recv_to_eof(sock), peer


async def test_request_response_is_split(topo: Topology, pep: PepProcess, net: Addrs) -> None:
    accepted: list[tuple[str, int]] = []
    with trio.fail_after(20):
        async with trio.open_nursery() as n:
            n.start_soon(
                serve, await listen(topo.ns("server"), net.server, PORT), echo_upper, accepted
            )
            reply, peer = await request(topo, b"hello pep", net.server)
            n.cancel_scope.cancel()
    assert reply == b"HELLO PEP"
    assert peer == (net.server, PORT)  # the client believes it talks to the server
    assert [a[0] for a in accepted] == [net.gw_server]  # the server sees the gateway: split
    [rec] = pep.closed_lines(expect=1)
    assert rec["dst"] == hostport(net.server, PORT)  # SO_ORIGINAL_DST / TPROXY socket address
    assert rec["flow"] == rec["dst"]  # flow table entry recorded from the SYN agrees
    assert rec["client"].startswith(net.client + ":")
    assert (rec["up"], rec["down"]) == ("9", "9")


async def test_100mib_each_way_byte_exact(topo: Topology, pep: PepProcess, net: Addrs) -> None:
    size = 100 * 1024 * 1024
    upload, download = os.urandom(size), os.urandom(size)
    d = await duplex(topo, net.server, PORT, sending(upload), sending(download), timeout=120)
    assert d.server_got == (sha(upload), size)
    assert d.client_got == (sha(download), size)


async def test_half_close_then_10mib_reply(topo: Topology, pep: PepProcess, net: Addrs) -> None:
    reply = os.urandom(10 * 1024 * 1024)
    got_request: list[bytes] = []

    async def server_side(conn: trio.socket.SocketType) -> None:
        got_request.append(await recv_to_eof(conn))  # reads until the client's FIN
        await send_all(conn, reply)

    with trio.fail_after(30):
        async with trio.open_nursery() as n:
            n.start_soon(serve, await listen(topo.ns("server"), net.server, PORT), server_side, [])
            sock = await connect(topo.ns("client"), (net.server, PORT))
            with sock:
                await send_all(sock, b"GET /big")
                sock.shutdown(trio.socket.SHUT_WR)
                received = await recv_to_eof(sock)
            n.cancel_scope.cancel()
    assert got_request == [b"GET /big"]
    assert sha(received) == sha(reply) and len(received) == len(reply)


async def test_closed_upstream_port_resets_client_fast(
    topo: Topology, pep: PepProcess, net: Addrs
) -> None:
    with trio.fail_after(2):
        try:
            # pep accepts first; its reset may arrive before or after connect() returns
            sock = await connect(topo.ns("client"), (net.server, PORT))
            with sock:
                data = await sock.recv(100)
        except OSError as e:
            assert e.errno == errno.ECONNRESET
        else:
            assert data == b""
    assert "connect failed: ECONNREFUSED; resetting client" in pep.log()


async def test_200_concurrent_connections(topo: Topology, pep: PepProcess, net: Addrs) -> None:
    count = 200
    accepted: list[tuple[str, int]] = []
    results: dict[int, bytes] = {}

    async def one(i: int) -> None:
        payload = f"conn-{i}:".encode() + os.urandom(2000 + i * 37)
        reply, _ = await request(topo, payload, net.server)
        results[i] = reply
        assert reply == payload.upper(), f"connection {i} got wrong data"

    with trio.fail_after(60):
        async with trio.open_nursery() as n:
            n.start_soon(
                serve, await listen(topo.ns("server"), net.server, PORT), echo_upper, accepted
            )
            async with trio.open_nursery() as clients:
                for i in range(count):
                    clients.start_soon(one, i)
            n.cancel_scope.cancel()
    assert len(results) == count
    assert len(accepted) == count and {a[0] for a in accepted} == {net.gw_server}
    assert len(pep.closed_lines(expect=count)) == count


async def server_peer(topo: Topology, net: Addrs) -> str:
    """Make one connection and return the address the server saw it from."""
    accepted: list[tuple[str, int]] = []
    with trio.fail_after(10):
        async with trio.open_nursery() as n:
            n.start_soon(
                serve, await listen(topo.ns("server"), net.server, PORT), echo_upper, accepted
            )
            reply, _ = await request(topo, b"ping", net.server)
            n.cancel_scope.cancel()
    assert reply == b"PING"
    return accepted[0][0]


async def test_sigterm_removes_rules_and_traffic_flows_end_to_end(
    topo: Topology, pep: PepProcess, net: Addrs, variant: tuple[str, int]
) -> None:
    before = rules_in(topo, "gw")
    assert await server_peer(topo, net) == net.gw_server
    assert "PEP" in before
    assert ("proto 94" in before) == (variant[0] == "tproxy")  # policy routing: TPROXY only
    pep.signal(signal.SIGTERM)
    assert pep.wait(10) == 0
    after = rules_in(topo, "gw")
    assert "PEP" not in after and "proto 94" not in after
    assert await server_peer(topo, net) == net.client  # routed end to end, unsplit


async def test_kill9_fails_open_and_restart_replaces_stale_rules(
    topo: Topology, pep: PepProcess, net: Addrs, pep_args: list[str]
) -> None:
    assert await server_peer(topo, net) == net.gw_server
    before = rules_in(topo, "gw")
    pep.signal(signal.SIGKILL)
    pep.wait(10)
    assert rules_in(topo, "gw") == before  # stale rules stay behind...
    assert await server_peer(topo, net) == net.client  # ...yet new connections go end to end
    again = PepProcess(topo, "gw", pep_args)
    try:
        again.start()
        assert rules_in(topo, "gw") == before  # exactly one set, not two
        assert await server_peer(topo, net) == net.gw_server  # splitting again
    finally:
        again.stop()


async def test_direct_connection_to_listener_is_refused(
    topo: Topology, pep: PepProcess, net: Addrs
) -> None:
    accepted: list[tuple[str, int]] = []
    with trio.fail_after(10):
        async with trio.open_nursery() as n:
            n.start_soon(
                serve, await listen(topo.ns("server"), net.server, PORT), echo_upper, accepted
            )
            try:
                sock = await connect(topo.ns("client"), (net.gw_client, 5000))
            except (ConnectionRefusedError, ConnectionResetError):
                pass  # reset while connecting: also a refusal
            else:
                with sock:
                    try:
                        await sock.send(b"CONNECT 10.77.2.2:8080\r\n\r\n")
                        data = await sock.recv(100)
                    except OSError as e:
                        assert e.errno in (errno.ECONNRESET, errno.EPIPE)
                    else:
                        assert data == b""
            await trio.sleep(0.2)
            n.cancel_scope.cancel()
    assert accepted == []  # no upstream connection was made
    assert not pep.closed_lines()
