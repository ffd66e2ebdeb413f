"""The core scenarios: the real daemon splitting real connections between real namespaces.

Every scenario runs in both modes (REDIRECT, TPROXY) and over both IP versions; the daemon
always splits both families (the default), the variant picks the mode and the traffic's family.
"""

from __future__ import annotations

import errno
import os
import signal

import pytest
import trio

from pep.testing.daemon import PepProcess, StartPep
from pep.testing.netenv import ADDRS, PORT, Addrs, rules_in
from pep.testing.topology import Topology
from pep.testing.traffic import (
    connect,
    duplex,
    exchange,
    peer_of,
    recv_to_eof,
    request,
    send_all,
    sending,
    serving,
    sha,
)

pytestmark = pytest.mark.netns

VARIANTS = [("redirect", 4), ("tproxy", 4), ("redirect", 6), ("tproxy", 6)]


@pytest.fixture(params=VARIANTS, ids=[f"{m}-ipv{f}" for m, f in VARIANTS])
def variant(request: pytest.FixtureRequest) -> tuple[str, int]:
    return request.param


@pytest.fixture
def net(variant: tuple[str, int]) -> Addrs:
    return ADDRS[variant[1]]


@pytest.fixture
def pep_args(variant: tuple[str, int]) -> list[str]:
    return ["--log-level", "debug", "--mode", variant[0]]


@pytest.fixture
def pep(start_pep: StartPep, pep_args: list[str]) -> PepProcess:
    return start_pep(*pep_args)


def hostport(host: str, port: int) -> str:
    """How pep's log writes an address: host:port (IPv6 without brackets)."""
    return f"{host}:{port}"


async def test_request_response_is_split(topo: Topology, pep: PepProcess, net: Addrs) -> None:
    with trio.fail_after(20):
        async with serving(topo, (net.server, PORT)) as accepted:
            sock = await connect(topo.ns("client"), (net.server, PORT))
            with sock:
                peer = sock.getpeername()[:2]
                reply = await exchange(sock, b"hello pep")
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
        async with serving(topo, (net.server, PORT), server_side):
            received = await request(topo, (net.server, PORT), b"GET /big")
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
    results: dict[int, bytes] = {}

    async def one(i: int) -> None:
        payload = f"conn-{i}:".encode() + os.urandom(2000 + i * 37)
        reply = await request(topo, (net.server, PORT), payload)
        results[i] = reply
        assert reply == payload.upper(), f"connection {i} got wrong data"

    with trio.fail_after(60):
        async with serving(topo, (net.server, PORT)) as accepted, trio.open_nursery() as clients:
            for i in range(count):
                clients.start_soon(one, i)
    assert len(results) == count
    assert len(accepted) == count and {a[0] for a in accepted} == {net.gw_server}
    assert len(pep.closed_lines(expect=count)) == count


async def test_sigterm_removes_rules_and_traffic_flows_end_to_end(
    topo: Topology, pep: PepProcess, net: Addrs, variant: tuple[str, int]
) -> None:
    dst = (net.server, PORT)
    before = rules_in(topo, "gw")
    assert await peer_of(topo, dst) == net.gw_server
    assert "PEP" in before
    assert ("proto 94" in before) == (variant[0] == "tproxy")  # policy routing: TPROXY only
    pep.signal(signal.SIGTERM)
    assert pep.wait(10) == 0
    after = rules_in(topo, "gw")
    assert "PEP" not in after and "proto 94" not in after
    assert await peer_of(topo, dst) == net.client  # routed end to end, unsplit


async def test_kill9_fails_open_and_restart_replaces_stale_rules(
    topo: Topology, pep: PepProcess, net: Addrs, pep_args: list[str], start_pep: StartPep
) -> None:
    dst = (net.server, PORT)
    assert await peer_of(topo, dst) == net.gw_server
    before = rules_in(topo, "gw")
    pep.signal(signal.SIGKILL)
    pep.wait(10)
    assert rules_in(topo, "gw") == before  # stale rules stay behind...
    assert await peer_of(topo, dst) == net.client  # ...yet new connections go end to end
    start_pep(*pep_args)
    assert rules_in(topo, "gw") == before  # exactly one set, not two
    assert await peer_of(topo, dst) == net.gw_server  # splitting again


async def test_direct_connection_to_listener_is_refused(
    topo: Topology, pep: PepProcess, net: Addrs
) -> None:
    with trio.fail_after(10):
        async with serving(topo, (net.server, PORT)) as accepted:
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
    assert accepted == []  # no upstream connection was made
    assert not pep.closed_lines()
