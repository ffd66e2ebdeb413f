"""``[link]`` with the real daemon: route metrics set and restored, link legs paced, bad values.

The gateway topology's server side (srv0) plays the link: the upstream leg faces it. Routes
through it with a gateway (the ones pep changes; the connected subnet is the kernel's own and
stays as it is) are added by each test. No timing assertions: the rates are the benchmarks'
business (pep lab bench); here the kernel state and the bytes are checked.
"""

from __future__ import annotations

import hashlib
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import trio

from pep.config import paths
from pep.config.link import Link
from pep.testing.daemon import PepProcess, StartPep, status_json
from pep.testing.netenv import INGRESS, SERVER_IP, rules_in
from pep.testing.satlab import SatLab
from pep.testing.topology import Topology, sysctl
from pep.testing.traffic import connect, listen, recv_to_eof, send_all, sha

pytestmark = pytest.mark.netns

LINK_IF = "srv0"
LINK = """
[link]
interface = "srv0"
rtt = "{rtt}"
egress_rate = "{egress}"
ingress_rate = "20mbit"
"""
SINK_PORT = 8090


@pytest.fixture(autouse=True)
def link_routes(topo: Topology) -> Iterator[None]:
    """Routes through the "link" with a gateway: what pep puts its initial windows on; and
    the gateway's runtime directory (the route state file) removed afterwards."""
    # Not bbr by default here, so a link leg's bbr says [link] chose it (reno: a namespace may
    # default only to one in tcp_allowed_congestion_control, and cubic often is not).
    sysctl(topo.ns("gw"), "net.ipv4.tcp_congestion_control", "reno")
    topo.run("gw", ["ip", "route", "add", "10.99.0.0/16", "via", SERVER_IP, "metric", "50"])
    topo.run("gw", ["ip", "-6", "route", "add", "fd99::/32", "via", "fd77:2::2"])
    try:
        yield
    finally:
        shutil.rmtree(paths.runtime_dir_for(topo.ns("gw")), ignore_errors=True)


def routes(topo: Topology) -> str:
    """Every route of both families, as `ip route` prints them."""
    out = []
    for family in ("-4", "-6"):
        r = topo.run("gw", ["ip", family, "route", "show", "table", "all"])
        assert r.returncode == 0, r.stderr
        out.append(r.stdout)
    return "\n".join(out)


def start(
    start_pep: StartPep, tmp_path: Path, rtt: str = "600ms", egress: str = "8mbit", extra: str = ""
) -> PepProcess:
    conf = tmp_path / "pep.toml"  # the same file each time: the SIGHUP test rewrites it
    conf.write_text(extra + LINK.format(rtt=rtt, egress=egress))
    return start_pep(config=conf)


def expected_metrics(topo: Topology, rtt: float, egress: int) -> dict[int, dict[str, int]]:
    mtu = int(topo.run("gw", ["cat", f"/sys/class/net/{LINK_IF}/mtu"]).stdout)
    link = Link(LINK_IF, rtt, egress, 20_000_000, None)
    return {family: link.route_metrics(mtu, family) for family in (4, 6)}


def tagged(text: str) -> list[str]:
    return [line for line in text.splitlines() if "proto 94" in line]


def assert_tagged_with(text: str, metrics: dict[int, dict[str, int]]) -> None:
    lines = tagged(text)
    v4 = [line for line in lines if line.startswith("10.99.0.0/16")]
    v6 = [line for line in lines if line.startswith("fd99::/32")]
    assert len(v4) == 1 and len(v6) == 1, text
    for line, family in ((v4[0], 4), (v6[0], 6)):
        want = metrics[family]
        assert f"initcwnd {want['initcwnd']}" in line, line
        assert f"initrwnd {want['initrwnd']}" in line, line
    assert len(lines) == 2, text  # connected routes and the other interface: untouched


def stopped_and_restored(pep: PepProcess, topo: Topology, before: str) -> None:
    """SIGTERM: pep exits 0 and every route is exactly as it was before pep started."""
    pep.signal(signal.SIGTERM)
    assert pep.wait(15) == 0, pep.log()
    assert routes(topo) == before


def pep_cli(topo: Topology, *args: str) -> subprocess.CompletedProcess[str]:
    return topo.run("gw", [sys.executable, "-m", "pep.ops.cli", *args], timeout=60)


def test_routes_carry_the_link_metrics_and_are_restored_exactly_on_sigterm(
    topo: Topology, start_pep: StartPep, tmp_path: Path
) -> None:
    before = routes(topo)
    pep = start(start_pep, tmp_path)
    try:
        assert_tagged_with(routes(topo), expected_metrics(topo, 0.6, 8_000_000))
        shown = pep_cli(topo, "rules", "show")
        assert "10.99.0.0/16" in shown.stdout and "initcwnd" in shown.stdout, shown.stdout
        stopped_and_restored(pep, topo, before)
    finally:
        pep.stop()


def test_kill_9_leaves_the_metrics_for_the_next_start_or_rules_remove(
    topo: Topology, start_pep: StartPep, tmp_path: Path
) -> None:
    before = routes(topo)
    metrics = expected_metrics(topo, 0.6, 8_000_000)
    pep = start(start_pep, tmp_path)
    pep.signal(signal.SIGKILL)
    pep.wait(10)
    assert_tagged_with(routes(topo), metrics)  # still there: nobody put them back yet
    r = pep_cli(topo, "rules", "remove")
    assert r.returncode == 0, r.stderr
    assert routes(topo) == before

    pep = start(start_pep, tmp_path)  # crash again, then a new start replaces what it finds
    pep.signal(signal.SIGKILL)
    pep.wait(10)
    pep.stop()
    pep = start(start_pep, tmp_path, egress="16mbit")
    try:
        assert_tagged_with(routes(topo), expected_metrics(topo, 0.6, 16_000_000))
        stopped_and_restored(pep, topo, before)
    finally:
        pep.stop()


def test_sighup_follows_a_changed_link_and_its_removal(
    topo: Topology, start_pep: StartPep, tmp_path: Path
) -> None:
    before = routes(topo)
    pep = start(start_pep, tmp_path)
    try:
        conf = tmp_path / "pep.toml"
        conf.write_text(LINK.format(rtt="300ms", egress="16mbit"))
        pep.signal(signal.SIGHUP)
        want = expected_metrics(topo, 0.3, 16_000_000)
        deadline = time.monotonic() + 10
        while True:  # the reload puts the old routes back, then sets the new metrics
            try:
                assert_tagged_with(routes(topo), want)
                break
            except AssertionError:
                assert time.monotonic() < deadline, pep.log()
                time.sleep(0.05)
        conf.write_text("")  # [link] gone: the routes as they were
        pep.signal(signal.SIGHUP)
        deadline = time.monotonic() + 10
        while routes(topo) != before:
            assert time.monotonic() < deadline, pep.log()
            time.sleep(0.05)
        stopped_and_restored(pep, topo, before)
    finally:
        pep.stop()


def max_pacing_rates(topo: Topology, port: int, ccs: list[str]) -> list[int]:
    """SO_MAX_PACING_RATE of the gateway's sockets to ``port`` (ss prints rate/max in bps);
    their congestion control names go into ``ccs``."""
    r = topo.run("gw", ["ss", "-tin", f"( dport = :{port} )"])
    ccs += re.findall(r"\b(bbr|cubic|reno)\b", r.stdout)
    return [int(bps) // 8 for _, bps in re.findall(r"pacing_rate (\d+)bps/(\d+)bps", r.stdout)]


async def test_the_upstream_link_leg_is_paced_and_reported(
    topo: Topology, start_pep: StartPep, tmp_path: Path
) -> None:
    pep = start(start_pep, tmp_path, egress="8mbit")
    try:
        # About 11 s at 8 Mbit/s: ss sees it on the way, and it sends for longer than BBR's
        # 10-s min-RTT window, so pep restarts its BBR once (pep.link.pacer.BBR_REFRESH).
        data = os.urandom(10 * 1024 * 1024)
        got: dict[str, tuple[str, int]] = {}
        seen: list[int] = []
        ccs: list[str] = []
        doc: dict[str, object] = {}
        sink = await listen(topo.ns("server"), SERVER_IP, SINK_PORT)

        async def serve_one() -> None:
            conn, _ = await sink.accept()
            with conn:
                h = hashlib.sha256()
                n = 0
                while chunk := await conn.recv(1 << 16):
                    h.update(chunk)
                    n += len(chunk)
                got["up"] = (h.hexdigest(), n)
                await send_all(conn, h.hexdigest().encode())

        async def upload() -> bytes:
            sock = await connect(topo.ns("client"), (SERVER_IP, SINK_PORT))
            with sock:
                await send_all(sock, data)
                sock.shutdown(trio.socket.SHUT_WR)
                return await recv_to_eof(sock)

        async def watch() -> None:
            while not seen:
                await trio.sleep(0.1)
                seen.extend(max_pacing_rates(topo, SINK_PORT, ccs))
            doc.update(await status_json(pep))

        with trio.fail_after(60), sink:
            async with trio.open_nursery() as n:
                n.start_soon(serve_one)
                n.start_soon(watch)
                answer = await upload()
            after = await status_json(pep)
        assert got["up"] == (sha(data), len(data))
        assert answer == sha(data).encode()
        # The only link leg has the whole link: 8 Mbit/s of frames, in payload bytes/s.
        capacity = Link(LINK_IF, 0.6, 8_000_000, 20_000_000, None).pacing_capacity(1500)
        assert seen and all(abs(rate - capacity) < 0.05 * capacity for rate in seen), seen
        assert set(ccs) == {"bbr"}, ccs  # [link]'s congestion control on the link leg
        link = doc["link"]
        assert isinstance(link, dict)
        assert link["interface"] == LINK_IF and link["egress_bps"] == 8_000_000
        assert link["flows"] == 1 and link["congestion_restarts"] == 0  # 0.1 s in
        done = after["link"]
        assert isinstance(done, dict) and done["flows_total"] == 1
        assert done["congestion_restarts"] >= 1, done  # one leg, sending ~11 s
        [conn] = doc["connections"]  # type: ignore[misc]
        assert set(conn["link"]) == {"upstream"}  # the client leg (cli0) is not on the link
    finally:
        pep.stop()


def test_link_share_units() -> None:
    """WorkerSlots: each worker sees the others' counts, not its own (no daemon needed)."""
    from pep.link.slots import WorkerSlots

    master = WorkerSlots.create(3)
    try:
        workers = [WorkerSlots.inherit(str(master.fd), 3, i) for i in range(3)]
        workers[0].publish(2)
        workers[2].publish(5)
        assert [w.others() for w in workers] == [5, 7, 2]
        master.reset(2)
        assert workers[0].others() == 0
    finally:
        os.close(master.fd)


async def test_workers_share_one_link_between_them(
    topo: Topology, start_pep: StartPep, tmp_path: Path
) -> None:
    """workers = 2: twelve uploads spread over both workers (all on one: odds 1 in 2048); the
    caps of all active link legs together stay within the link (each worker takes its
    active legs' part of it)."""
    pep = start(start_pep, tmp_path, egress="40mbit", extra="workers = 2\n")
    try:
        data = os.urandom(2 * 1024 * 1024)  # 24 MB in all: about 5 s at 40 Mbit/s
        uploads_n = 12
        sink = await listen(topo.ns("server"), SERVER_IP, SINK_PORT)
        digests: list[str] = []
        docs: list[dict[str, object]] = []

        async def serve_one(conn: trio.socket.SocketType) -> None:
            with conn:
                h = hashlib.sha256()
                while chunk := await conn.recv(1 << 16):
                    h.update(chunk)
                await send_all(conn, h.hexdigest().encode())

        async def accept_all(n: trio.Nursery) -> None:
            for _ in range(uploads_n):
                conn, _ = await sink.accept()
                n.start_soon(serve_one, conn)

        async def upload() -> None:
            sock = await connect(topo.ns("client"), (SERVER_IP, SINK_PORT))
            with sock:
                await send_all(sock, data)
                sock.shutdown(trio.socket.SHUT_WR)
                digests.append((await recv_to_eof(sock)).decode())

        async def watch() -> None:
            await trio.sleep(1.0)  # all sending, shares settled (a tick is 50 ms)
            docs.append(await status_json(pep))

        with trio.fail_after(90), sink:
            async with trio.open_nursery() as n:
                n.start_soon(accept_all, n)
                n.start_soon(watch)
                async with trio.open_nursery() as uploads:
                    for _ in range(uploads_n):
                        uploads.start_soon(upload)
        assert digests == [sha(data)] * uploads_n
        [doc] = docs
        conns = doc["connections"]
        assert isinstance(conns, list)
        assert {c["worker"] for c in conns} == {0, 1}, conns  # the test needs both workers
        active = [
            c["link"]["upstream"]["share_bps"] for c in conns if c["link"]["upstream"]["active"]
        ]
        capacity = Link(LINK_IF, 0.6, 40_000_000, 20_000_000, None).pacing_capacity(1500) * 8
        assert active and sum(active) <= 1.05 * capacity, (active, capacity)
    finally:
        pep.stop()


@pytest.mark.parametrize(
    ("table", "key"),
    [
        ('interface = "nolink0"\nrtt = "600ms"\negress_rate = "8mbit"\ningress_rate = "20mbit"',
         "link.interface"),
        ('interface = "srv0"\nrtt = "600"\negress_rate = "8mbit"\ningress_rate = "20mbit"',
         "link.rtt"),
        ('interface = "srv0"\nrtt = "9s"\negress_rate = "8mbit"\ningress_rate = "20mbit"',
         "link.rtt"),
        ('interface = "srv0"\nrtt = "600ms"\negress_rate = "0mbit"\ningress_rate = "20mbit"',
         "link.egress_rate"),
        ('interface = "srv0"\nrtt = "600ms"\negress_rate = "8 furlongs"\ningress_rate = "20mbit"',
         "link.egress_rate"),
    ],
)  # fmt: skip
def test_bad_link_values_exit_2_with_nothing_installed(
    topo: Topology, tmp_path: Path, table: str, key: str
) -> None:
    conf = tmp_path / "pep.toml"
    conf.write_text("[link]\n" + table + "\n")
    assert f"config: {key} = " in refused_with_nothing_installed(topo, conf)


def refused_with_nothing_installed(topo: Topology, conf: Path) -> str:
    """`pep run --config conf` in the gateway exits 2 and leaves its rules and routes as they
    were: what it said (stderr)."""
    before_rules, before_routes = rules_in(topo, "gw"), routes(topo)
    r = topo.run(
        "gw",
        [sys.executable, "-m", "pep.ops.cli", "run", "--config", str(conf), "-i", INGRESS],
        timeout=30,
    )
    assert r.returncode == 2, r.stderr
    assert rules_in(topo, "gw") == before_rules
    assert routes(topo) == before_routes
    return r.stderr


@pytest.mark.satlab("leo")
def test_a_lab_run_of_6_parallel_fetches_is_byte_exact(satlab_session: SatLab) -> None:
    """The lab's PEP nodes with [link] from the profile: 6 parallel 200 KB fetches over LEO,
    every byte checked (pep.lab.objects raises on a wrong body), nothing dropped unchecked."""
    from pep.lab import workloads

    lab = satlab_session.lab
    for node in ("pepa", "pepb"):
        text = (lab.dir / f"{node}.toml").read_text()
        assert "[link]" in text and 'interface = "sat0"' in text, text
    times = trio.run(
        workloads._together,
        6,
        lambda: workloads.objects.fetch(lab.ns("client"), workloads.SERVER, 200_000),
    )
    assert len(times) == 6 and all(t > 0 for t in times)
    r = satlab_session.run("pepb", ["ip", "route"])
    assert "proto 94" in r.stdout and "initcwnd" in r.stdout, r.stdout
