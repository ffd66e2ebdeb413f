"""TCP Fast Open on the upstream leg: the client's first bytes ride in pep's SYN."""

from __future__ import annotations

import re

import pytest
import trio

from pep.testing.daemon import PepProcess, StartPep
from pep.testing.netenv import PORT, SERVER_IP, Sysctls
from pep.testing.topology import Topology
from pep.testing.traffic import (
    connect,
    echo_upper,
    exchange,
    listen,
    recv_to_eof,
    request,
    send_all,
    serve,
)

pytestmark = pytest.mark.netns

# net.ipv4.tcp_fastopen bits (Documentation/networking/ip-sysctl.rst): 0x1 client, 0x2 server,
# 0x4 client without cookie, 0x200 server without cookie.
TFO_ALL_NO_COOKIE = 0x207


@pytest.fixture
def topo_sysctls() -> Sysctls:
    return {node: {"net.ipv4.tcp_fastopen": TFO_ALL_NO_COOKIE} for node in ("gw", "server")}


@pytest.fixture
def pep(start_pep: StartPep) -> PepProcess:
    return start_pep(config="tcp_fastopen = true\nfastopen_wait = 0.2\n")


def passive_fastopens(topo: Topology) -> int:
    """TcpExtTCPFastOpenPassive in the server's namespace: SYNs whose data was accepted."""
    text = topo.run("server", ["cat", "/proc/net/netstat"]).stdout
    names, values = [ln.split() for ln in text.splitlines() if ln.startswith("TcpExt:")][:2]
    return int(dict(zip(names, values, strict=True))["TCPFastOpenPassive"])


async def fastopen_listen(topo: Topology) -> trio.socket.SocketType:
    sock = await listen(topo.ns("server"), SERVER_IP, PORT)
    sock.setsockopt(trio.socket.IPPROTO_TCP, trio.socket.TCP_FASTOPEN, 16)
    return sock


async def test_first_bytes_travel_in_the_syn(topo: Topology, pep: PepProcess) -> None:
    before = passive_fastopens(topo)
    payload = b"GET /object HTTP/1.0\r\n\r\n" + bytes(range(256)) * 4
    with trio.fail_after(10):
        async with trio.open_nursery() as n:
            n.start_soon(serve, await fastopen_listen(topo), echo_upper, [])
            reply = await request(topo, (SERVER_IP, PORT), payload)
            n.cancel_scope.cancel()
    assert reply == payload.upper()
    assert passive_fastopens(topo) == before + 1
    [rec] = pep.closed_lines(expect=1)
    assert rec["up"] == str(len(payload))  # the bytes carried in the SYN are counted


async def test_server_speaks_first_still_works(topo: Topology, pep: PepProcess) -> None:
    async def banner_then_echo(conn: trio.socket.SocketType) -> None:
        await send_all(conn, b"220 hello\r\n")
        await send_all(conn, (await recv_to_eof(conn)).upper())

    before = passive_fastopens(topo)
    with trio.fail_after(10):
        async with trio.open_nursery() as n:
            n.start_soon(serve, await fastopen_listen(topo), banner_then_echo, [])
            sock = await connect(topo.ns("client"), (SERVER_IP, PORT))
            with sock:
                banner = await sock.recv(100)  # sent nothing: pep connects without data
                rest = await exchange(sock, b"quit")
            n.cancel_scope.cancel()
    assert banner == b"220 hello\r\n" and rest == b"QUIT"
    assert passive_fastopens(topo) == before  # an ordinary handshake
    assert re.search(r"closed .* up=4 down=15 ", pep.log())
