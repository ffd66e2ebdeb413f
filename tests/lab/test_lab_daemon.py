"""`pep lab` for real: namespaces, the delay line, tbf, loss rules, pep on the PEP nodes.

The labs come from pep's pytest plugin, as any project's would: ``satlab_prefix`` for the tests
that drive `pep lab` themselves, ``satlab`` for a lab of a test's own, ``satlab_session`` for the
links several tests share (pep switched to what each asks for). Whatever a test builds is
removed however it ends. Timing tests use the short profiles (LEO 40 ms, MEO 150 ms).
"""

from __future__ import annotations

import os
import signal
import socket
import statistics
import struct
import subprocess
import sys
import time
from pathlib import Path

import pytest
import trio
from pyroute2 import netns

from pep.config.link import Link
from pep.lab import build as lab_mod
from pep.lab import objects, report
from pep.lab.plan import SERVER_IP, SERVER_PORT, LabSpec
from pep.lab.profiles import PROFILES
from pep.lab.state import Lab, pid_running, state_root
from pep.lab.status import status_text
from pep.testing.daemon import REPO
from pep.testing.satlab import SatLab
from pep.testing.topology import Topology, ns_socket

pytestmark = pytest.mark.netns

SERVER = (SERVER_IP, SERVER_PORT)


@pytest.fixture
def prefix(satlab_prefix: str) -> str:
    """A lab prefix of the test's own (pep's pytest plugin), removed however the test ends."""
    return satlab_prefix


def _namespaces(prefix: str) -> list[str]:
    return [n for n in netns.listnetns() if n.startswith(prefix + "-")]


def _pep_lab(*args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "pep.ops.cli", "lab", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=REPO,
    )


def _alive(pid: int) -> bool:
    return pid_running(pid)


def _rules(ns: str, table: str) -> str:
    r = subprocess.run(
        ["ip", "netns", "exec", ns, "iptables-legacy", "-t", table, "-S"],
        capture_output=True,
        text=True,
        timeout=10,
    )
    return r.stdout


def test_cli_up_status_exec_split_down_leaves_nothing(prefix: str) -> None:
    r = _pep_lab("up", "--profile", "leo", "--prefix", prefix)
    assert r.returncode == 0, r.stderr
    lab = Lab.load(prefix)
    assert lab is not None
    pids = {name: int(info["pid"]) for name, info in lab.procs.items()}  # type: ignore[call-overload]
    assert set(pids) == {"delayline", "server", "pepa", "pepb"}
    assert all(_alive(pid) for pid in pids.values())  # they outlived `pep lab up`
    assert "-j NFQUEUE --queue-num 2" in _rules(lab.ns("link"), "filter")
    assert "PEP_SYN" in _rules(lab.ns("pepa"), "mangle")

    r = _pep_lab("status", "--prefix", prefix)
    assert r.returncode == 0, r.stderr
    assert "LEO symmetric, PEP" in r.stdout
    assert r.stdout.count("pep: running") == 2
    assert "delay line: running" in r.stdout and "40 ms RTT" in r.stdout
    assert "initcwnd" in r.stdout and "tcp_fastopen 0x207" in r.stdout

    r = _pep_lab("exec", "--prefix", prefix, "server", "--", "ip", "-4", "-o", "addr")
    assert r.returncode == 0 and SERVER_IP in r.stdout
    # D7: the prefix after the node names the lab too (it used to become the command).
    r = _pep_lab("exec", "server", "--prefix", prefix, "--", "ip", "-4", "-o", "addr")
    assert r.returncode == 0 and SERVER_IP in r.stdout, r.stderr
    r = _pep_lab("exec", "nosuch", "--prefix", prefix, "--", "true")
    assert r.returncode == 1, r.stderr
    assert f"no node 'nosuch' in lab {prefix!r} (nodes: client, link, pepa, pepb, server)" in (
        r.stderr
    )

    r = _pep_lab("up", "--profile", "leo", "--prefix", prefix)
    assert r.returncode == 1 and "already exists" in r.stderr and "pep lab down" in r.stderr

    r = _pep_lab("split", "off", "--prefix", prefix)
    assert r.returncode == 0, r.stderr
    assert not _alive(pids["pepa"]) and not _alive(pids["pepb"])
    assert "PEP_SYN" not in _rules(lab.ns("pepa"), "mangle")  # SIGTERM: pep removed its rules
    assert _pep_lab("status", "--prefix", prefix).stdout.count("pep: stopped") == 2
    r = _pep_lab("split", "on", "--prefix", prefix)
    assert r.returncode == 0, r.stderr
    assert _pep_lab("status", "--prefix", prefix).stdout.count("pep: running") == 2
    lab = Lab.load(prefix)
    assert lab is not None
    pids |= {n: int(lab.procs[n]["pid"]) for n in ("pepa", "pepb")}  # type: ignore[call-overload]

    r = _pep_lab("down", "--prefix", prefix)
    assert r.returncode == 0 and "removed lab" in r.stdout
    assert not _namespaces(prefix)
    assert not any(_alive(pid) for pid in pids.values())
    assert not (state_root() / prefix).exists()
    # D8: a lab that is not up says so, whatever is asked of it.
    for args in (["status"], ["exec", "client", "--", "true"], ["split", "on"], ["fade", "1"]):
        r = _pep_lab(args[0], "--prefix", prefix, *args[1:])
        assert r.returncode == 1, r.stderr
        assert f"lab {prefix!r} is not up (start it with `pep lab up --prefix {prefix}`)" in (
            r.stderr
        )


def test_down_cleans_up_after_crashes_and_half_built_labs(prefix: str) -> None:
    lab = lab_mod.up(LabSpec(PROFILES["leo"].with_overrides(loss=0.01), "one-ended", True, prefix))
    assert set(lab.nodes) == {"client", "pepa", "link", "server"}
    pids = [int(info["pid"]) for info in lab.procs.values()]  # type: ignore[call-overload]
    # A crash: the delay line and pep die without cleaning up, the state file is lost.
    for name in ("delayline", "pepa"):
        os.kill(int(lab.procs[name]["pid"]), signal.SIGKILL)  # type: ignore[call-overload]
    (lab.dir / "lab.json").unlink()
    assert "no state file" in status_text(prefix)
    r = _pep_lab("down", "--prefix", prefix)
    assert r.returncode == 0, r.stderr
    assert not _namespaces(prefix)
    lab.reap_all()
    assert not any(_alive(pid) for pid in pids)

    # Half-built: namespaces only, one with a process in it, as a `pep lab up` killed midway.
    topo = Topology(prefix)
    topo.add_node("client")
    topo.add_node("link", forwarding=True)
    sleeper = topo.popen("link", ["sleep", "300"], start_new_session=True)
    try:
        r = _pep_lab("down", "--prefix", prefix)
        assert r.returncode == 0, r.stderr
        assert not _namespaces(prefix)
        assert sleeper.wait(5) == -signal.SIGKILL
    finally:
        if sleeper.poll() is None:
            sleeper.kill()
            sleeper.wait()


async def _connect_rtt(ns: str) -> float:
    """The RTT of one TCP handshake client -> server, as the client's kernel measured it
    (SYN to SYN-ACK, tcp_info.tcpi_rtt in microseconds): unlike a clock read in this process
    after connect() returns, it does not include the wait for a CPU on a loaded machine."""
    sock = trio.socket.from_stdlib_socket(ns_socket(ns))
    with sock:
        await sock.connect(SERVER)
        info = sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, 104)
        # struct tcp_info: 8 bytes of u8 fields, then u32s; tcpi_rtt is the 16th u32.
        (rtt_us,) = struct.unpack_from("=I", info, 8 + 15 * 4)
        return rtt_us / 1e6


@pytest.mark.satlab(profile=["leo", "meo"], pep="none")
def test_rtt_within_5_percent_of_the_profile(satlab_session: SatLab) -> None:
    profile, lab = satlab_session.profile, satlab_session.lab
    name = profile.name

    async def measure() -> list[float]:
        with trio.fail_after(30):
            await _connect_rtt(lab.ns("client"))  # ARP and route caches warm
            out = []
            for _ in range(15):
                out.append(await _connect_rtt(lab.ns("client")))
                await trio.sleep(0.02)
            return out

    rtts = trio.run(measure)
    median_ms = statistics.median(rtts) * 1000
    print(f"{name}: median RTT {median_ms:.2f} ms over {len(rtts)} handshakes")
    assert abs(median_ms - profile.rtt_ms) <= 0.05 * profile.rtt_ms, rtts


@pytest.mark.satlab("leo")
def test_rate_within_10_percent_of_the_profile(satlab_session: SatLab) -> None:
    """Bulk rate through the PEPs, whose BBR link leg keeps the link busy: an end-to-end cubic
    flow loses a third of its segments in slow start on a drop-tail tbf queue (measured), which
    says more about cubic than about the emulated rate.

    The profile's rates are tc's (Ethernet frames); what a transfer sees is the TCP payload they
    carry, so the reference is that payload rate (the one formula pep's pacing uses). The emulated
    link can only lose rate to a busy machine, never gain it, so the best of up to three
    measurements is what the link delivers; every one of them must stay under the ceiling."""
    profile = PROFILES["leo"]  # 100 Mbit/s down, 20 up, 40 ms
    down_ref, up_ref = (
        Link("lab", profile.rtt_ms / 1000, rate, 1, None).pacing_capacity(1500) * 8
        for rate in (profile.down_bps, profile.up_bps)
    )
    lab = satlab_session.lab

    async def downlink() -> float:
        down = await objects.fetch(lab.ns("client"), SERVER, 25_000_000)
        # The steady part of one bulk fetch (from 30 % of the bytes to the end).
        t30, b30 = next((t, b) for t, b in down.samples if b >= 0.3 * down.size)
        return (down.size - b30) * 8 / (down.seconds - t30)

    async def uplink() -> float:
        # The client only sees whole uploads; their difference cancels the handshake and slow
        # start, which both uploads share.
        small = await objects.upload(lab.ns("client"), SERVER, 2_000_000)
        big = await objects.upload(lab.ns("client"), SERVER, 8_000_000)
        return (big.size - small.size) * 8 / (big.seconds - small.seconds)

    async def measure() -> tuple[list[float], list[float]]:
        downs: list[float] = []
        ups: list[float] = []
        with trio.fail_after(90):
            for runs, one, ref in ((downs, downlink, down_ref), (ups, uplink, up_ref)):
                while len(runs) < 3 and (not runs or max(runs) < 0.9 * ref):
                    runs.append(await one())
        return downs, ups

    downs, ups = trio.run(measure)
    print(
        f"downlink {[round(b / 1e6, 1) for b in downs]} of {down_ref / 1e6:.1f} Mbit/s payload, "
        f"uplink {[round(b / 1e6, 1) for b in ups]} of {up_ref / 1e6:.1f}"
    )
    for runs, ref in ((downs, down_ref), (ups, up_ref)):
        assert max(runs) <= 1.05 * ref, runs  # tbf lets through no more than the profile
        assert max(runs) >= 0.9 * ref, runs


@pytest.mark.satlab("leo", loss=1)
def test_data_is_byte_exact_through_both_peps_with_loss(satlab: SatLab) -> None:
    lab = satlab.lab  # a lab of its own: the peps' logs count this test's connections only

    async def transfers() -> None:
        with trio.fail_after(50):
            for size in (1, 100_000, 4_000_000):
                t = await objects.fetch(lab.ns("client"), SERVER, size)  # sha256 checked inside
                assert t.size == size
            await objects.upload(lab.ns("client"), SERVER, 2_000_000)  # server's sha256 checked

    trio.run(transfers)
    for node in ("pepa", "pepb"):  # both PEPs split every connection: 3 fetches + 1 upload
        deadline = time.monotonic() + 15  # pep logs a connection once both legs are closed
        while (log := (lab.dir / f"{node}.log").read_text()).count(" closed ") < 4:
            assert time.monotonic() < deadline, log
            time.sleep(0.05)
    drops = [line for line in _rules(lab.ns("link"), "filter").splitlines() if "statistic" in line]
    assert len(drops) == 2
    r = subprocess.run(
        ["ip", "netns", "exec", lab.ns("link"), "iptables-legacy", "-L", "LAB_LINK", "-v", "-x"],
        capture_output=True,
        text=True,
        timeout=10,
    )
    dropped = sum(int(line.split()[0]) for line in r.stdout.splitlines() if "DROP" in line)
    assert dropped > 0, r.stdout  # the loss really happened, and TCP repaired it on every leg


def test_demo_small_run_prints_a_table_and_a_chart(prefix: str, tmp_path: Path) -> None:
    png = tmp_path / "demo.png"
    r = _pep_lab(
        "demo", "--profile", "leo", "--sizes", "100k,1M", "--out", str(png), "--prefix", prefix,
        timeout=120,
    )  # fmt: skip
    assert r.returncode == 0, r.stderr
    rows = report.parse_table(r.stdout)
    assert [row["size"] for row in rows] == ["100 KB", "1 MB"], r.stdout
    for row in rows:
        assert 0 < row["with_s"] < row["without_s"]  # type: ignore[operator]
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "sha256 ok" in r.stderr and "tearing down" in r.stderr
    assert not _namespaces(prefix)
