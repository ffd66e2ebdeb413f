"""Two PEP gateways behind routing machinery: VRRP failover (keepalived) and ECMP spreading.

Each test gets a lab of its own from pep's pytest plugin (the ``satlab`` fixture: a unique
prefix, removed however the test ends). No timing assertions beyond generous bounds: the
failover time is the benchmark's (``pep lab bench --topology ha``); here what survives a
failover is checked, byte for byte.
"""

from __future__ import annotations

import contextlib
import os
import socket
import subprocess
import sys
from collections.abc import Callable

import pytest
import trio

from pep.lab import cluster, objects
from pep.lab.cluster import master, wait_master
from pep.lab.cluster_bench import splits
from pep.lab.state import Lab
from pep.testing.satlab import SatLab
from pep.testing.traffic import connect, listen, send_all

pytestmark = pytest.mark.netns

SLOW_PORT = 9000
TCP_CLOSE_WAIT = 8  # include/net/tcp_states.h


# The two-gateway labs have no emulated link (LAN) and no pre-connected legs; their peps stay up.
HA = pytest.mark.satlab("lan", topology="ha", pep="direct")
ECMP = pytest.mark.satlab("lan", topology="ecmp", pep="direct")


@pytest.fixture
def keepalived() -> None:
    if subprocess.run(["which", "keepalived"], capture_output=True).returncode:
        pytest.fail("keepalived is not installed (deploy/setup.sh installs it)")


@pytest.fixture
def ha(keepalived: None, satlab: SatLab) -> Lab:
    return satlab.lab


@pytest.fixture
def ecmp(satlab: SatLab) -> Lab:
    return satlab.lab


async def fetch(lab: Lab, size: int = 100_000) -> objects.Transfer:
    with trio.fail_after(10):  # sha256 checked inside
        return await objects.fetch(lab.ns("client"), (cluster.server_ip(lab.topology), 80), size)


async def a_long_transfer_cut_by(lab: Lab, cut: Callable[[], None]) -> tuple[int, str]:
    """The server sends slowly (10 KB every 10 ms, up to 20 s) while the client sends a byte
    every 100 ms, as an interactive client does; ``cut()`` after 1 s. How many bytes the
    client got and how its read ended: "eof" would be a silently short transfer. The bytes
    the client sends after the cut are what reaches the new master, which forwards them to a
    server that has no such connection: its RST ends the client's connection."""
    server = cluster.server_ip(lab.topology)
    ended = ""
    got = 0
    sink = await listen(lab.ns("server"), server, SLOW_PORT)

    async def slow() -> None:
        conn, _ = await sink.accept()
        with conn:
            try:
                for _ in range(2000):
                    await send_all(conn, os.urandom(10_000))
                    await trio.sleep(0.01)
            except OSError:
                pass  # the reset reached the server too

    async def ticks(sock: trio.socket.SocketType) -> None:
        with contextlib.suppress(OSError):  # the reset: the reader reports it
            while True:
                await sock.send(b".")
                await trio.sleep(0.1)

    async with trio.open_nursery() as n:
        n.start_soon(slow)
        sock = await connect(lab.ns("client"), (server, SLOW_PORT))
        with sock:
            n.start_soon(ticks, sock)
            t0 = trio.current_time()
            with trio.move_on_after(30):
                while True:
                    if trio.current_time() - t0 > 1.0 and not ended:
                        cut()
                        ended = "cut"
                    try:
                        chunk = await sock.recv(1 << 16)
                    except OSError as e:
                        ended = type(e).__name__
                        break
                    if not chunk:
                        ended = "eof" if closed_by_fin(sock) else "ConnectionResetError"
                        break
                    got += len(chunk)
            if ended == "cut":
                ended = "stalled"  # neither an error nor an end within 30 s
        n.cancel_scope.cancel()
    sink.close()
    return got, ended


def closed_by_fin(sock: trio.socket.SocketType) -> bool:
    """recv() returned b"": a FIN (an orderly end: state CLOSE_WAIT), or an RST whose error
    the ticks' send() took first (the kernel hands sk_err to one caller; the reader then sees
    only the shutdown): state CLOSE."""
    state = sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, 1)[0]
    return state == TCP_CLOSE_WAIT


@HA
async def test_ha_a_dead_pep_moves_the_address_and_the_backup_splits(ha: Lab) -> None:
    first = wait_master(ha)
    other = next(gw for gw in cluster.GATEWAYS if gw != first)
    await fetch(ha)  # through the master: split there
    assert splits(ha, first) == 1
    got, ended = await a_long_transfer_cut_by(ha, lambda: cluster.sigkill(ha, first))
    assert ended == "ConnectionResetError", (got, ended)  # an error, never a short "eof"
    assert 0 < got < 20_000_000
    wait_master(ha, other)
    before = splits(ha, other)
    for _ in range(5):
        assert (await fetch(ha)).size == 100_000
    assert splits(ha, other) == before + 5  # the backup split them
    # The killed pep back: its gateway stays backup (nopreempt), traffic still flows.
    ha.stop(first)
    ha.launch(first, first, ha.pep_argv(first))
    ha.wait_ready(first, "ready:")
    await trio.sleep(1.5)  # several VRRP adverts
    assert master(ha) == other
    await fetch(ha)
    assert splits(ha, other) == before + 6


@HA
async def test_ha_the_masters_client_link_down_moves_the_address(ha: Lab) -> None:
    first = wait_master(ha)
    other = next(gw for gw in cluster.GATEWAYS if gw != first)

    def link(state: str) -> None:
        subprocess.run(["ip", "-n", ha.ns(first), "link", "set", "lan0", state], check=True)

    got, ended = await a_long_transfer_cut_by(ha, lambda: link("down"))
    assert ended == "ConnectionResetError", (got, ended)
    wait_master(ha, other)
    before = splits(ha, other)
    await fetch(ha, 1_000_000)
    assert splits(ha, other) == before + 1
    link("up")
    await trio.sleep(1.5)
    assert master(ha) == other  # nopreempt: the repaired gateway waits as backup
    await fetch(ha)
    assert splits(ha, other) == before + 2


@ECMP
async def test_ecmp_spreads_flows_and_a_dead_pep_fails_open(ecmp: Lab) -> None:
    sizes = [10_000 + i for i in range(400)]  # each body different: sha256 checked per fetch

    async def many(todo: list[int]) -> None:
        it = iter(todo)

        async def worker() -> None:
            for size in it:
                assert (await fetch(ecmp, size)).size == size

        async with trio.open_nursery() as n:
            for _ in range(20):
                n.start_soon(worker)

    await many(sizes)
    counts = {gw: splits(ecmp, gw) for gw in cluster.GATEWAYS}
    # `pep lab split off` would leave no gateway splitting (ha: none holding the address).
    r = subprocess.run(
        [sys.executable, "-m", "pep.ops.cli", "lab", "split", "off", "--prefix", ecmp.prefix],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert r.returncode == 1 and "two-gateway lab" in r.stderr, (r.returncode, r.stderr)
    assert all(ecmp.running(gw) for gw in cluster.GATEWAYS)
    assert sum(counts.values()) == 400, counts
    assert min(counts.values()) >= 100, counts  # the hash spreads them (odds otherwise: nil)
    cluster.sigkill(ecmp, "gwa")
    ecmp.stop("gwa")
    await many([20_000 + i for i in range(100)])  # all succeed: gwa's share goes unsplit
    assert 0 < splits(ecmp, "gwb") - counts["gwb"] < 100
