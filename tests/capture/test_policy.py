"""Decisions at SYN time, against the real daemon: policy, admission, strict mode, per-leg
tuning, SYN mirroring and multi-queue."""

from __future__ import annotations

import errno
import os
import re
import socket
from collections.abc import Callable

import pytest
import trio

from pep.testing.daemon import PepProcess, StartPep
from pep.testing.netenv import ADDRS, PORT, ipt
from pep.testing.topology import Topology, ns_socket
from pep.testing.traffic import (
    connect,
    echo_upper,
    exchange,
    peer_of,
    recv_to_eof,
    send_all,
    serving,
)

pytestmark = pytest.mark.netns

NET = ADDRS[4]


Start = Callable[[str], PepProcess]


@pytest.fixture
def start(start_pep: StartPep) -> Start:
    """start(config text): a daemon with that config, logging at debug level."""

    def run(config: str) -> PepProcess:
        return start_pep("--log-level", "debug", config=config)

    return run


async def test_bypass_rule_for_one_port(topo: Topology, start: Start) -> None:
    pep = start('[[policy]]\nname = "direct"\naction = "bypass"\ndport = [8081]\n')
    assert await peer_of(topo, (NET.server, 8081)) == NET.client  # bypassed: end to end, untouched
    assert await peer_of(topo, (NET.server, 8080)) == NET.gw_server  # split
    log = pep.stop_log()
    assert "syn queued=2 split=1 bypassed=1" in log
    assert "policy decisions: direct=1 default=1" in log  # counted per rule


async def test_max_connections_bypasses_the_excess(topo: Topology, start: Start) -> None:
    start("max_connections = 5\n")
    release = trio.Event()

    async def hold_then_echo(conn: trio.socket.SocketType) -> None:
        first = await conn.recv(100)
        await send_all(conn, first.upper())  # "I am connected"
        await release.wait()
        rest = await recv_to_eof(conn)
        await send_all(conn, rest.upper())

    with trio.fail_after(30):
        async with serving(topo, (NET.server, PORT), hold_then_echo) as accepted:
            socks = []
            for i in range(10):  # ten long connections, opened one after another
                s = await connect(topo.ns("client"), (NET.server, PORT))
                await send_all(s, f"hello{i}".encode())
                assert await s.recv(100) == f"HELLO{i}".encode()
                socks.append(s)
            release.set()
            for i, s in enumerate(socks):
                with s:
                    payload = f"data-{i}-".encode() + os.urandom(100_000)
                    assert await exchange(s, payload) == payload.upper()
    peers = [a[0] for a in accepted]
    assert peers[:5] == [NET.gw_server] * 5  # split while there was room
    assert peers[5:] == [NET.client] * 5  # at capacity: bypassed, yet working


async def test_strict_mode_closed_port_gets_the_servers_reset(topo: Topology, start: Start) -> None:
    pep = start('syn_verdict = "after-upstream"\n')
    with trio.fail_after(5):
        sock = trio.socket.from_stdlib_socket(ns_socket(topo.ns("client")))
        with sock, pytest.raises(OSError) as exc:
            await sock.connect((NET.server, PORT))  # nothing listens there
    # Refused during the handshake: the RST came from the server itself; in immediate mode
    # pep would have completed the handshake and reset afterwards.
    assert exc.value.errno == errno.ECONNREFUSED
    assert "letting the SYN through unsplit" in pep.log()
    # An open port is split as usual.
    assert await peer_of(topo, (NET.server, PORT)) == NET.gw_server


async def test_strict_mode_blackholed_upstream_goes_through_unsplit(
    topo: Topology, start: Start
) -> None:
    # The server drops pep's own SYNs (from the gateway's address) but answers the client:
    # pep's connect times out and the held SYN is released unsplit.
    ipt(topo.ns("server"), *f"-A INPUT -s {NET.gw_server} -p tcp --dport {PORT} -j DROP".split())
    pep = start('syn_verdict = "after-upstream"\nsyn_hold_timeout = 0.5\n')
    t0 = trio.current_time()
    assert await peer_of(topo, (NET.server, PORT)) == NET.client
    assert trio.current_time() - t0 < 3
    assert "no answer in 0.5s" in pep.log()


async def test_tos_and_mss_of_the_client_syn_are_mirrored(topo: Topology, start: Start) -> None:
    start("mirror_tos = true\nmirror_mss = true\n")
    # Count packets from the gateway (the upstream leg) carrying DSCP 10 (TOS 0x28).
    dscp = f"-A INPUT -s {NET.gw_server} -p tcp --dport {PORT} -m dscp --dscp 0x0a -j ACCEPT"
    ipt(topo.ns("server"), *dscp.split())
    mss_seen: list[int] = []

    async def record_mss(conn: trio.socket.SocketType) -> None:
        mss_seen.append(conn.getsockopt(socket.IPPROTO_TCP, socket.TCP_MAXSEG))
        await echo_upper(conn)

    with trio.fail_after(10):
        async with serving(topo, (NET.server, PORT), record_mss):
            raw = ns_socket(topo.ns("client"))
            raw.setsockopt(socket.IPPROTO_IP, socket.IP_TOS, 0x28)
            raw.setsockopt(socket.IPPROTO_TCP, socket.TCP_MAXSEG, 1200)
            sock = trio.socket.from_stdlib_socket(raw)
            with sock:
                await sock.connect((NET.server, PORT))
                assert await exchange(sock, b"tos") == b"TOS"
    counters = topo.run("server", ["iptables-legacy", "-L", "INPUT", "-v", "-x", "-n"]).stdout
    dscp_line = next(ln for ln in counters.splitlines() if "DSCP match 0x0a" in ln)
    assert int(dscp_line.split()[0]) > 0  # packets of the upstream leg carried TOS 0x28
    assert mss_seen and mss_seen[0] <= 1200  # without mirroring it would be 1448 on this veth


async def test_upstream_leg_uses_the_configured_congestion_control(
    topo: Topology, start: Start
) -> None:
    start('[upstream]\ncongestion = "reno"\n[client]\ncongestion = "cubic"\n')
    release = trio.Event()

    async def wait_then_echo(conn: trio.socket.SocketType) -> None:
        await release.wait()
        await echo_upper(conn)

    with trio.fail_after(10):
        async with serving(topo, (NET.server, PORT), wait_then_echo):
            sock = await connect(topo.ns("client"), (NET.server, PORT))
            await trio.sleep(0.3)
            ss = topo.run("gw", ["ss", "-tin"]).stdout
            release.set()
            with sock:
                sock.shutdown(socket.SHUT_WR)
                await recv_to_eof(sock)
    # ss prints each socket's line, then its TCP_INFO line with the congestion control name.
    lines = ss.splitlines()
    upstream = next(i for i, ln in enumerate(lines) if re.search(rf"{NET.server}:{PORT}\s*$", ln))
    client = next(i for i, ln in enumerate(lines) if re.search(rf"{NET.client}:\d+\s*$", ln))
    assert " reno " in lines[upstream + 1] + " ", lines[upstream + 1]
    assert " cubic " in lines[client + 1] + " ", lines[client + 1]


async def test_two_queues_split_whichever_queue_the_syn_lands_in(
    topo: Topology, start: Start
) -> None:
    pep = start('queues = "0-1"\n')
    rules = topo.run("gw", ["iptables-legacy", "-t", "mangle", "-S", "PEP_SYN"]).stdout
    assert "--queue-balance 0:1" in rules
    # --queue-balance hashes the address pair (net/netfilter/xt_NFQUEUE.c), so the client
    # speaks from a dozen source addresses to land in both queues.
    sources = [f"10.77.1.{i}" for i in range(10, 22)]
    for src in sources:
        assert topo.run("client", ["ip", "addr", "add", f"{src}/24", "dev", "eth0"]).returncode == 0
    with trio.fail_after(20):
        async with serving(topo, (NET.server, PORT)) as accepted:
            for src in sources:
                sock = trio.socket.from_stdlib_socket(ns_socket(topo.ns("client")))
                with sock:
                    await sock.bind((src, 0))
                    await sock.connect((NET.server, PORT))
                    assert await exchange(sock, src.encode()) == src.encode()
    assert [a[0] for a in accepted] == [NET.gw_server] * len(sources)  # all split
    table = topo.run("gw", ["cat", "/proc/net/netfilter/nfnetlink_queue"]).stdout.splitlines()
    # columns: queue, portid, queued now, copy mode, copy range, dropped, user dropped, last id
    last_ids = {int(ln.split()[0]): int(ln.split()[7]) for ln in table if ln.strip()}
    assert set(last_ids) == {0, 1}
    assert all(n > 0 for n in last_ids.values()), last_ids  # both queues carried SYNs
    assert f"syn queued={len(sources)} split={len(sources)}" in pep.stop_log()
