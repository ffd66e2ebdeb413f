"""Deployment modes beyond the core scenarios: full transparency, mixed families, IPv6 oddities."""

from __future__ import annotations

import functools
import os
import signal
import socket
import sys

import pytest
import trio

from pep.testing.daemon import StartPep
from pep.testing.netenv import ADDRS, INGRESS, PORT, Addrs, rules_in
from pep.testing.topology import Topology, ns_socket
from pep.testing.traffic import duplex, exchange, request, sending, serving, sha

pytestmark = pytest.mark.netns


@pytest.fixture
def start(start_pep: StartPep) -> StartPep:
    return functools.partial(start_pep, "--log-level", "debug")


@pytest.mark.parametrize("family", [4, 6], ids=["ipv4", "ipv6"])
async def test_transparent_source_server_sees_client_and_data_is_exact(
    topo: Topology, start: StartPep, family: int
) -> None:
    net = ADDRS[family]
    pep = start(config='mode = "tproxy"\ntransparent_source = true\n')
    up, down = os.urandom(8 << 20), os.urandom(8 << 20)
    d = await duplex(topo, net.server, PORT, sending(up), sending(down), timeout=30)
    accepted, client_port = d.accepted, d.client_port
    # The server saw the client's own address and port: full transparency...
    assert [a[:2] for a in accepted] == [(net.client, client_port)]
    # ...and the connection was still split by pep (not routed past it).
    [rec] = pep.closed_lines(expect=1)
    assert rec["client"] == f"{net.client}:{client_port}"
    assert (rec["up"], rec["down"]) == (str(len(up)), str(len(down)))
    assert d.server_got == (sha(up), len(up))
    assert d.client_got == (sha(down), len(down))


async def test_ipv4_and_ipv6_clients_at_once_through_one_pep(
    topo: Topology, start: StartPep
) -> None:
    pep = start()  # --family both is the default
    accepted: list[tuple[str, int]] = []
    replies: dict[tuple[int, int], bytes] = {}

    async def one(family: int, i: int) -> None:
        payload = f"v{family}-{i}:".encode() + os.urandom(5000)
        reply = await request(topo, (ADDRS[family].server, PORT), payload)
        assert reply == payload.upper()
        replies[(family, i)] = reply

    with trio.fail_after(30):
        async with (
            serving(topo, (ADDRS[4].server, PORT), accepted=accepted),
            serving(topo, (ADDRS[6].server, PORT), accepted=accepted),
            trio.open_nursery() as clients,
        ):
            for i in range(25):
                for family in (4, 6):
                    clients.start_soon(one, family, i)
    assert len(replies) == 50
    assert sorted({a[0] for a in accepted}) == sorted([ADDRS[4].gw_server, ADDRS[6].gw_server])
    assert len(pep.closed_lines(expect=50)) == 50


@pytest.mark.parametrize("mode", ["redirect", "tproxy"])
async def test_ipv6_syn_with_extension_header_is_handled(
    topo: Topology, start: StartPep, mode: str
) -> None:
    """A destination-options header between IPv6 and TCP: the SYN parser walks it."""
    net: Addrs = ADDRS[6]
    pep = start("--mode", mode)
    with trio.fail_after(10):
        async with serving(topo, (net.server, PORT)) as accepted:
            sock = await connect_with_dstopts(topo, (net.server, PORT))
            with sock:
                data = await exchange(sock, b"ext")
    assert data == b"EXT"
    # Either split (server sees the gateway) or, if the parser gave up, counted and unsplit.
    assert accepted[0][0] in (net.gw_server, net.client)
    if accepted[0][0] == net.client:
        assert "accepted unsplit" in pep.log()
    pep.signal(signal.SIGTERM)
    assert pep.wait(10) == 0  # alive until told to stop
    assert "split=1" in pep.log()  # this kernel's parser does split it
    assert "PEP" not in rules_in(topo, "gw")


async def connect_with_dstopts(topo: Topology, dst: tuple[str, int]) -> trio.socket.SocketType:
    raw = ns_socket(topo.ns("client"), socket.AF_INET6)
    # RFC 8200 section 4.6: next header and length are filled in by the kernel; one PadN
    # option pads the header to 8 bytes. Sticky: every packet, the SYN included, carries it.
    raw.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_DSTOPTS, bytes([0, 0, 1, 4, 0, 0, 0, 0]))
    sock = trio.socket.from_stdlib_socket(raw)
    await sock.connect(dst)
    return sock


def test_rules_cli_install_show_remove_per_family(topo: Topology) -> None:
    def pep_cli(*args: str) -> str:
        r = topo.run("gw", [sys.executable, "-m", "pep.ops.cli", "rules", *args], timeout=60)
        assert r.returncode == 0, r.stderr
        return r.stdout

    pep_cli("install", "--interface", INGRESS, "--mode", "tproxy")
    shown = pep_cli("show")
    ipv4, rest = shown.split("# IPv6")
    ipv6, routes = rest.split("# policy routing")
    for section in (ipv4, ipv6):
        assert "-t mangle -A PEP_SYN -p tcp -m mark --mark 0x5e9/0xffff -j TPROXY" in section
        assert "-j NFQUEUE --queue-num 0 --queue-bypass" in section
        assert "-m socket --transparent -j MARK --set-xmark 0x10000/0x10000" in section
    assert "--on-ip ::" in ipv6 and "--on-ip 0.0.0.0" in ipv4
    assert routes.count("fwmark 0x10000/0x10000 lookup 1513 proto 94") == 2
    assert routes.count("local default dev lo table 1513") == 2
    # Switching mode replaces the TPROXY set with the REDIRECT set (no stale chain or route).
    pep_cli("install", "--interface", INGRESS, "--mode", "redirect", "--family", "ipv4")
    state = rules_in(topo, "gw")
    assert "PEP_REDIRECT" in state and "PEP_DIVERT" not in state and "proto 94" not in state
    assert "TPROXY" not in state
    assert "removed 4 rule(s) and route(s)" in pep_cli("remove")
    assert "PEP" not in rules_in(topo, "gw")
    assert "removed 0" in pep_cli("remove")
