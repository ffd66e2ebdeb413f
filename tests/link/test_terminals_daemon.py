"""A hub with terminal plans, with the real daemon: a star of three terminals behind the hub's
link interface, each leg's share and buffers from its terminal's plan (pep status --json, ss),
the terminals' routes, plans reloaded on SIGHUP (and a bad file keeping them), a bad plans file
refused with nothing installed.

Star (IPv4): the server behind the hub; the terminals t1, t2, t3 on one switch behind the
hub's link interface (cli0, where their connections arrive, as at a hub). The plans name t1
and t2; t3 is in no terminal. No delay line: the rates are pep's pacing, the timing the
benchmarks' business (pep lab bench --topology star); here shares, buffers, routes and bytes.
"""

from __future__ import annotations

import re
import shutil
import signal
import struct
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import trio

from pep.config import paths
from pep.config.link import Link
from pep.config.terminals import Terminal
from pep.testing.daemon import PepProcess, StartPep, pep_status, status_json
from pep.testing.netenv import GW_SERVER_IP, INGRESS, SERVER_IP, Layout
from pep.testing.topology import Topology
from pep.testing.traffic import (
    Pattern,
    connect,
    hash_to_eof,
    recv_to_eof,
    send_all,
    send_pattern,
    serving,
)
from tests.link.test_link_daemon import refused_with_nothing_installed

pytestmark = pytest.mark.netns

HUB_LINK = "10.77.1.1"
TERMINALS = {"t1": "10.77.1.11", "t2": "10.77.1.12", "t3": "10.77.1.13"}
PORT = 8091
RTT = 0.1  # short: the legs' BDP-sized buffers fill in moments, so the relays still run
MTU = 1500


def star(topo: Topology) -> None:
    """server — hub (gw) — switch — t1, t2, t3."""
    for node in ("server", "gw", "sw", *TERMINALS):
        topo.add_node(node, forwarding=node == "gw")
    topo.link("gw", "srv0", f"{GW_SERVER_IP}/24", "server", "eth0", f"{SERVER_IP}/24")
    topo.link("gw", INGRESS, f"{HUB_LINK}/24", "sw", "hub", [])
    for name, addr in TERMINALS.items():
        topo.link(name, "eth0", f"{addr}/24", "sw", name, [])
        topo.route(name, "default", HUB_LINK)
    topo.bridge("sw", ["hub", *TERMINALS])
    topo.route("server", "default", GW_SERVER_IP)


@pytest.fixture
def topo_layout() -> Layout:
    return star


@pytest.fixture(autouse=True)
def runtime_dir(topo: Topology) -> Iterator[None]:
    yield
    shutil.rmtree(paths.runtime_dir_for(topo.ns("gw")), ignore_errors=True)


def plans_text(t1: str = "8mbit", t2: str = "4mbit") -> str:
    return (
        "# the hub's terminals: NAME EGRESS INGRESS NETWORKS\n"
        f"t1 {t1} 2mbit {TERMINALS['t1']}/32\n"
        f"t2 {t2} 1mbit {TERMINALS['t2']}/32\n"
    )


def config(plans: Path) -> str:
    return (
        "pipe_size = 65536\n"  # with small buffers (RTT), the relays outlast the status checks
        "[link]\n"
        f'interface = "{INGRESS}"\n'
        'rtt = "100ms"\n'
        'egress_rate = "20mbit"\n'
        'ingress_rate = "5mbit"\n'
        f'terminals_file = "{plans}"\n'
    )


def routes(topo: Topology) -> str:
    r = topo.run("gw", ["ip", "-4", "route", "show", "table", "all"])
    assert r.returncode == 0, r.stderr
    return r.stdout


def start(start_pep: StartPep, tmp_path: Path, **plans: str) -> PepProcess:
    f = tmp_path / "terminals.txt"
    f.write_text(plans_text(**plans))
    return start_pep(config=config(f))


def plan_metrics(egress: int, ingress: int) -> dict[str, int]:
    link = Link(INGRESS, RTT, 20_000_000, 5_000_000, None)
    return link.for_terminal(Terminal("x", (), egress, ingress)).route_metrics(MTU)


def payload_bps(egress: int) -> float:
    """A plan's pacing capacity, payload bit/s (what pep status reports as share_bps)."""
    return Link(INGRESS, RTT, egress, 5_000_000, None).pacing_capacity(MTU) * 8


async def download(topo: Topology, node: str, seed: int, size: int) -> None:
    """Ask the server for ``size`` bytes of Pattern(seed): the request's bytes go up (the
    server checks them), the pattern comes down (checked here): byte-exact both ways."""
    sock = await connect(topo.ns(node), (SERVER_IP, PORT))
    with sock:
        await send_all(sock, struct.pack("!QQ", seed, size))
        sock.shutdown(trio.socket.SHUT_WR)
        assert await hash_to_eof(sock) == (Pattern(seed, size).sha256(), size)


async def serve_pattern(conn: trio.socket.SocketType) -> None:
    head = await recv_to_eof(conn)
    assert len(head) == 16, head  # what the client sent, exactly
    await send_pattern(conn, Pattern(*struct.unpack("!QQ", head)))


def by_client(doc: dict[str, Any]) -> dict[str, list[dict[str, Any]]]:
    out: dict[str, list[dict[str, Any]]] = {}
    for c in doc["connections"]:
        out.setdefault(c["client"].rsplit(":", 1)[0], []).append(c)
    return out


def sndbufs(topo: Topology, client: str) -> list[int]:
    """SO_SNDBUF (ss's "tb", the kernel's doubled value) of the hub's sockets to ``client``."""
    r = topo.run("gw", ["ss", "-tmn", "dst", client])
    return [int(n) for n in re.findall(r"\btb(\d+)", r.stdout)]


async def test_each_leg_gets_its_terminals_share_and_buffers(
    topo: Topology, start_pep: StartPep, tmp_path: Path
) -> None:
    before = routes(topo)
    pep = start(start_pep, tmp_path)
    try:
        # The terminals' /32s ride on the connected subnet: each gets a route of its own with
        # its plan's initial windows (t3 has no plan: nothing of its own).
        now = routes(topo)
        for name, (egress, ingress) in {"t1": (8e6, 2e6), "t2": (4e6, 1e6)}.items():
            want = plan_metrics(int(egress), int(ingress))
            line = next(x for x in now.splitlines() if x.startswith(TERMINALS[name] + " "))
            assert "proto 94" in line, now
            assert f"initcwnd {want['initcwnd']}" in line and f"initrwnd {want['initrwnd']}" in line
        assert not any(x.startswith(TERMINALS["t3"] + " ") for x in now.splitlines())
        docs: list[dict[str, Any]] = []
        text: list[str] = []
        bufs: dict[str, list[int]] = {}

        async def watch() -> None:
            await trio.sleep(0.8)  # every download is sending, the shares settled (tick 10 ms)
            docs.append(await status_json(pep))
            text.append((await pep_status(pep)).stdout.decode())
            bufs.update({n: sndbufs(topo, TERMINALS[n]) for n in ("t1", "t3")})

        size = 3_000_000  # t1's two legs at 4 Mbit/s each: about 6 s
        with trio.fail_after(60):
            async with serving(topo, (SERVER_IP, PORT), serve_pattern), trio.open_nursery() as n:
                n.start_soon(watch)
                n.start_soon(download, topo, "t1", 1, size)
                n.start_soon(download, topo, "t1", 2, size)
                n.start_soon(download, topo, "t2", 3, size // 2)
                n.start_soon(download, topo, "t3", 4, size)
        [doc] = docs
        assert "terminals with link legs: 3 (of 3 seen)" in text[0], text[0]
        rows = {r["name"]: r for r in doc["link"]["terminals"]}
        assert set(rows) == {"t1", "t2", "(other)"}
        assert rows["t1"]["legs"] == 2 and rows["t2"]["legs"] == 1 and rows["(other)"]["legs"] == 1
        assert rows["t1"]["egress_bps"] == 8_000_000 and rows["(other)"]["egress_bps"] is None
        conns = by_client(doc)
        shares = {
            n: [c["link"]["client"]["share_bps"] for c in conns[a]] for n, a in TERMINALS.items()
        }
        # t1 and t2 below the carrier: each at its plan, t1's split between its two legs;
        # the address in no terminal shares what they leave (20 - 8 - 4 Mbit/s of frames)
        assert shares["t1"] == pytest.approx([payload_bps(8_000_000) / 2] * 2, rel=0.02)
        assert shares["t2"] == pytest.approx([payload_bps(4_000_000)], rel=0.02)
        assert shares["t3"] == pytest.approx([payload_bps(8_000_000)], rel=0.02)
        assert rows["t1"]["share_bps"] == pytest.approx(payload_bps(8_000_000), rel=0.02)
        # buffers from the plan's BDP (2 x 8 Mbit/s x 100 ms, at least 256 KiB, doubled by the
        # kernel), the carrier's for t3 (2 x 20 Mbit/s x 100 ms): the listener's, not shrunk
        assert bufs["t1"] and set(bufs["t1"]) == {2 * 262_144}, bufs
        assert bufs["t3"] and set(bufs["t3"]) == {2 * 500_000}, bufs
        pep.signal(signal.SIGTERM)
        assert pep.wait(15) == 0, pep.log()
        assert routes(topo) == before  # the added routes are gone, the rest as it was
    finally:
        pep.stop()


async def test_sighup_applies_new_plans_to_live_legs_and_a_bad_file_keeps_them(
    topo: Topology, start_pep: StartPep, tmp_path: Path
) -> None:
    pep = start(start_pep, tmp_path)
    plans = tmp_path / "terminals.txt"
    try:
        seen: dict[str, Any] = {}

        async def reload_midway() -> None:
            await trio.sleep(0.5)
            seen["before"] = await status_json(pep)
            plans.write_text(plans_text(t1="2mbit"))
            pep.signal(signal.SIGHUP)
            deadline = trio.current_time() + 10
            while True:  # the reload is logged; the next reshare follows within a tick
                doc = await status_json(pep)
                rows = {r["name"]: r for r in doc["link"]["terminals"]}
                if rows["t1"]["egress_bps"] == 2_000_000 and rows["t1"]["legs_active"]:
                    seen["after"] = doc
                    break
                assert trio.current_time() < deadline, pep.log()
                await trio.sleep(0.05)
            await trio.sleep(0.2)  # a few ticks on
            seen["settled"] = await status_json(pep)
            plans.write_text(plans_text(t1="2mbit") + "t9 1mbit\n")  # a bad line 4
            pep.signal(signal.SIGHUP)
            deadline = trio.current_time() + 10
            while (await status_json(pep))["reloads"]["failed"] < 1:
                assert trio.current_time() < deadline, pep.log()
                await trio.sleep(0.05)
            seen["bad"] = await status_json(pep)

        with trio.fail_after(90):
            async with serving(topo, (SERVER_IP, PORT), serve_pattern), trio.open_nursery() as n:
                n.start_soon(reload_midway)
                n.start_soon(download, topo, "t1", 5, 3_000_000)
        share = by_client(seen["before"])[TERMINALS["t1"]][0]["link"]["client"]["share_bps"]
        assert share == pytest.approx(payload_bps(8_000_000), rel=0.02)
        share = by_client(seen["settled"])[TERMINALS["t1"]][0]["link"]["client"]["share_bps"]
        assert share == pytest.approx(payload_bps(2_000_000), rel=0.02)  # the live leg too
        bad = seen["bad"]
        assert "line 4: expected NAME EGRESS INGRESS NETWORK" in bad["reloads"]["last_error"]
        rows = {r["name"]: r for r in bad["link"]["terminals"]}
        assert rows["t1"]["egress_bps"] == 2_000_000  # the running plans stay
        want = plan_metrics(2_000_000, 2_000_000)
        line = next(x for x in routes(topo).splitlines() if x.startswith(TERMINALS["t1"] + " "))
        assert f"initcwnd {want['initcwnd']}" in line, line  # the routes followed the reload
    finally:
        pep.stop()


async def test_a_workers_master_applies_new_plans_to_the_routes_on_sighup(
    topo: Topology, start_pep: StartPep, tmp_path: Path
) -> None:
    """With workers the routes are the master's, as the rules are: a SIGHUP's plans reach
    them (a terminal's initial windows); a SIGHUP that changes nothing leaves them so."""
    plans = tmp_path / "terminals.txt"
    plans.write_text(plans_text())
    pep = start_pep(config="workers = 2\n" + config(plans), timeout=30)

    def t1_route() -> str:
        """t1's route ("" for the moment a reload puts the routes back and sets them anew)."""
        lines = [x for x in routes(topo).splitlines() if x.startswith(TERMINALS["t1"] + " ")]
        return lines[0] if lines else ""

    async def until_window(want: int) -> None:
        with trio.fail_after(10):
            while f"initcwnd {want} " not in t1_route() + " ":
                await trio.sleep(0.05)

    try:
        old = plan_metrics(8_000_000, 2_000_000)["initcwnd"]
        new = plan_metrics(2_000_000, 2_000_000)["initcwnd"]
        assert old != new
        await until_window(old)
        plans.write_text(plans_text(t1="2mbit"))
        pep.signal(signal.SIGHUP)
        await until_window(new)
        pep.signal(signal.SIGHUP)  # nothing changed: the routes stay as the plans say
        await trio.sleep(0.5)
        await until_window(new)
        assert pep.running, pep.log()
    finally:
        pep.stop()


@pytest.mark.parametrize(
    ("plans", "fragment"),
    [
        ("t1 8mbit 2mbit 10.77.1.11/32\nt2 8mbit\n", "line 2: expected NAME EGRESS INGRESS"),
        ("t1 8mbit 2mbit 10.77.1.0/24\nt2 4mbit 1mbit 10.77.1.12/32\n",
         "line 2: terminal t2: network 10.77.1.12/32 overlaps terminal t1's 10.77.1.0/24"),
        ("t1 30mbit 2mbit 10.77.1.11/32\n", "line 1: terminal t1: its egress_rate 30 Mbit/s"),
        ("t1 0mbit 2mbit 10.77.1.11/32\n", "line 1: egress '0mbit' is 0"),
        ("t1 8mbit 2mbit 10.77.1.11/32\nt1 4mbit 1mbit 10.77.1.12/32\n",
         "line 2: terminal t1 again (line 1)"),
    ],
)  # fmt: skip
def test_a_bad_plans_file_exits_2_with_nothing_installed(
    topo: Topology, tmp_path: Path, plans: str, fragment: str
) -> None:
    f = tmp_path / "terminals.txt"
    f.write_text(plans)
    conf = tmp_path / "pep.toml"
    conf.write_text(config(f))
    said = refused_with_nothing_installed(topo, conf)
    assert f"config: link.terminals_file = '{f}': {fragment}" in said, said


def test_a_terminal_network_not_routed_through_the_link_is_a_warning(
    topo: Topology, start_pep: StartPep, tmp_path: Path
) -> None:
    f = tmp_path / "terminals.txt"
    f.write_text(plans_text() + "t4 1mbit 1mbit 10.66.0.0/16\n")  # no route: not via cli0
    pep = start_pep(config=config(f))
    try:
        deadline = time.monotonic() + 5
        while "not routed through it" not in pep.log():
            assert time.monotonic() < deadline, pep.log()
            time.sleep(0.05)
        assert "t4 10.66.0.0/16" in pep.log()
    finally:
        pep.stop()
