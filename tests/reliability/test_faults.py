"""Faults of the daemon itself, against the real daemon: it dies, it runs out of descriptors.
Each test says what must be true afterwards and measures it. Its peers misbehaving:
tests/reliability/test_peers.py."""

from __future__ import annotations

import contextlib
import errno
import os
import signal

import pytest
import trio

from bench.paths import cpu_seconds, fd_count
from pep.testing.daemon import StartPep, settle, status_json
from pep.testing.netenv import CLIENT_IP, GW_SERVER_IP, PORT, SERVER_IP, rules_in
from pep.testing.topology import Topology
from pep.testing.traffic import connect, echo_upper, peer_seen, read_until_end, send_all, serving

pytestmark = pytest.mark.netns

ECHO_PORT = PORT + 1  # beside the bulk server on PORT
ECHO = (SERVER_IP, ECHO_PORT)


async def stream_forever(conn: trio.socket.SocketType) -> None:
    chunk = os.urandom(1 << 16)
    with contextlib.suppress(OSError):
        while True:
            await send_all(conn, chunk)


# --- the daemon dies ------------------------------------------------------------------------


async def test_kill9_mid_transfer_fails_open_within_1s_and_restart_splits_again(
    topo: Topology, start_pep: StartPep
) -> None:
    pep = start_pep()
    rules = rules_in(topo, "gw")
    echo_peers: list[tuple[str, int]] = []
    bulk_peers: list[tuple[str, int]] = []
    with trio.fail_after(30):
        async with (
            serving(topo, (SERVER_IP, PORT), stream_forever, bulk_peers),
            serving(topo, (SERVER_IP, ECHO_PORT), echo_upper, echo_peers),
        ):
            bulk = await connect(topo.ns("client"), (SERVER_IP, PORT))
            got = 0
            while got < 8 << 20:  # the split transfer is well under way
                got += len(await bulk.recv(1 << 20))
            assert bulk_peers[0][0] == GW_SERVER_IP

            # New connections, one every 20 ms from just before the kill until 1.5 s after.
            attempts: list[tuple[float, float, str]] = []

            async def attempt(i: int) -> None:
                t = trio.current_time()
                peer = await peer_seen(topo, ECHO, echo_peers, b"attempt %d" % i)
                attempts.append((t, trio.current_time() - t, peer))

            async with trio.open_nursery() as a:
                a.start_soon(attempt, -1)  # still split: the daemon is alive
                await trio.sleep(0.05)
                pep.signal(signal.SIGKILL)
                t_kill = trio.current_time()
                for i in range(75):
                    a.start_soon(attempt, i)
                    await trio.sleep(0.02)
            # The split connection dies with its proxy; it must end, and as a reset: a
            # truncated download must not look like a complete one.
            with trio.fail_after(5):
                outcome, _ = await read_until_end(bulk)
            bulk.close()
            assert pep.wait(5) == -signal.SIGKILL
            assert rules_in(topo, "gw") == rules  # stale rules stay behind
            for i in range(20):  # and every new connection keeps working
                assert await peer_seen(topo, ECHO, echo_peers, b"unsplit %d" % i) == CLIENT_IP

            again = start_pep()
            assert rules_in(topo, "gw") == rules  # exactly one set of rules, not two
            assert await peer_seen(topo, ECHO, echo_peers, b"split again") == GW_SERVER_IP
            assert again.running
    attempts.sort()
    after = [(t - t_kill, took, peer) for t, took, peer in attempts if t > t_kill]
    print(
        "attempts after kill -9 (start, duration, peer):",
        [(round(s, 3), round(d, 3), p) for s, d, p in after if d > 0.1 or s < 0.1],
    )
    assert len(after) == 75  # every one of them succeeded...
    assert all(peer == CLIENT_IP for _, _, peer in after)  # ...end to end
    # A SYN queued in the few ms between SIGKILL and the kernel releasing the dead reader's
    # queue is dropped by the kernel (nfqnl_flush, NF_DROP): its client retransmits after the
    # initial RTO of 1 s. Every connection started later completes at once.
    assert all(took < 1.2 for _, took, _ in after), after
    assert all(took < 0.5 for start, took, _ in after if start > 0.1), after
    assert outcome == "reset", "the killed proxy's client saw a clean EOF of a cut transfer"


# --- descriptors run out --------------------------------------------------------------------


async def test_fd_exhaustion_bypasses_the_excess_without_spinning_then_recovers(
    topo: Topology, start_pep: StartPep
) -> None:
    limit = 64
    pep = start_pep(prefix=("prlimit", f"--nofile={limit}:{limit}"))
    pid = pep.pid
    peers: list[tuple[str, int]] = []
    held: list[trio.socket.SocketType] = []
    outcomes: dict[str, int] = {"answered": 0, "refused": 0}

    async def hold(conn: trio.socket.SocketType) -> None:
        with contextlib.suppress(OSError):
            while data := await conn.recv(100):
                await send_all(conn, data.upper())

    async def one(i: int) -> None:
        """Open and keep a connection; every one is answered or cleanly refused, fast."""
        with trio.fail_after(3):  # never left hanging
            try:
                s = await connect(topo.ns("client"), (SERVER_IP, PORT))
            except OSError as e:
                assert e.errno in (errno.ECONNREFUSED, errno.ECONNRESET), e
                outcomes["refused"] += 1
                return
            try:
                await send_all(s, b"hello %d" % i)
                reply = await s.recv(100)
            except OSError as e:
                assert e.errno == errno.ECONNRESET, e
                reply = b""
        if not reply:
            s.close()
            outcomes["refused"] += 1
            return
        assert reply == b"HELLO %d" % i
        held.append(s)
        outcomes["answered"] += 1

    with trio.fail_after(60):
        async with serving(topo, (SERVER_IP, PORT), hold, peers):
            for i in range(40):  # one after another, kept open: 2 fds each when split
                await one(i)
            async with trio.open_nursery() as burst:  # and 40 more at once
                for i in range(40, 80):
                    burst.start_soon(one, i)
            assert fd_count(pid) <= limit
            # At the limit, with 80 connections held: no busy loop.
            cpu0 = cpu_seconds(pid)
            await trio.sleep(3)
            busy = cpu_seconds(pid) - cpu0
            for s in held:
                s.close()
            held.clear()
            # Service resumes once the connections are gone.
            await settle(lambda: fd_count(pid), lambda v: v < limit // 2)
            under_load = [p[0] for p in peers]
            answered_under_load = dict(outcomes)
            await one(1000)
            assert peers[-1][0] == GW_SERVER_IP, "not splitting again after the load"
            for s in held:
                s.close()
    assert pep.running
    split, bypassed = under_load.count(GW_SERVER_IP), under_load.count(CLIENT_IP)
    outcomes = answered_under_load
    print(f"fd limit {limit}: {outcomes}, split {split}, bypassed {bypassed}, cpu {busy:.3f}s/3s")
    assert outcomes["answered"] + outcomes["refused"] == 80
    assert split > 0 and bypassed > 0 and split + bypassed == outcomes["answered"]
    assert busy < 0.3, f"daemon used {busy:.2f}s of CPU in 3s while out of descriptors"
    doc = await status_json(pep)
    assert doc["syn"]["fd_bypassed"] >= bypassed


async def test_fd_limit_lowered_under_the_daemon_refuses_at_once_then_recovers(
    topo: Topology, start_pep: StartPep
) -> None:
    """Descriptors run out after SYNs were already split (here: `prlimit --pid` takes them
    away): the redirected clients are reset at once, not left in the listen backlog."""
    pep = start_pep()
    pid = pep.pid
    peers: list[tuple[str, int]] = []
    outcomes: list[str] = []

    async def hold(conn: trio.socket.SocketType) -> None:
        with contextlib.suppress(OSError):
            while data := await conn.recv(100):
                await send_all(conn, data.upper())

    async def one(i: int) -> trio.socket.SocketType | None:
        with trio.fail_after(3):  # answered or refused, never left hanging
            try:
                s = await connect(topo.ns("client"), (SERVER_IP, PORT))
                await send_all(s, b"hello %d" % i)
                reply = await s.recv(100)
            except OSError as e:
                assert e.errno in (errno.ECONNREFUSED, errno.ECONNRESET), e
                outcomes.append("refused")
                return None
        if not reply:
            outcomes.append("refused")
            s.close()
            return None
        assert reply == b"HELLO %d" % i
        outcomes.append("answered")
        return s

    with trio.fail_after(40):
        async with serving(topo, (SERVER_IP, PORT), hold, peers):
            # The SYN reader reads the limit at the first SYN a second or more after its last
            # reading (the first at start-up): after this sleep the next SYN takes a reading,
            # and the limit lowered just after it goes unnoticed for a second, whenever the
            # daemon's start-up happened to end.
            await trio.sleep(1.1)
            held = [await one(i) for i in range(3)]
            assert outcomes == ["answered"] * 3 and {p[0] for p in peers} == {GW_SERVER_IP}
            used = fd_count(pid)
            soft = nofile_soft(pid)
            await trio.run_process(["prlimit", "--pid", str(pid), f"--nofile={used}:"])
            for i in range(3, 23):
                s = await one(i)
                if s is not None:
                    held.append(s)
            cpu0 = cpu_seconds(pid)
            await trio.sleep(3)
            busy = cpu_seconds(pid) - cpu0
            for s in held:
                if s is not None:
                    s.close()
            await settle(lambda: fd_count(pid), lambda v: v < used - 3)
            # Served again (end to end: too few descriptors are left to split under the
            # lowered limit)...
            answered = await one(100)
            assert answered is not None
            answered.close()
            # ...and split again once the limit is back.
            await trio.run_process(["prlimit", "--pid", str(pid), f"--nofile={soft}:"])
            await trio.sleep(1.1)  # the SYN reader reads the limit once a second
            before = len(peers)
            recovered = await one(101)
            assert recovered is not None and peers[before][0] == GW_SERVER_IP
            recovered.close()
    assert pep.running
    doc = await status_json(pep)
    print(f"lowered limit {used}: {outcomes[3:-2]}, listener {doc['listener']}, cpu {busy:.3f}s")
    print([ln for ln in pep.log().splitlines() if "WARN" in ln][:8])
    assert "refused" in outcomes[3:-2]
    assert doc["listener"]["refused_no_fd"] >= outcomes[3:-2].count("refused")
    assert busy < 0.3, f"daemon used {busy:.2f}s of CPU in 3s while out of descriptors"


def nofile_soft(pid: int) -> int:
    with open(f"/proc/{pid}/limits") as f:
        line = next(ln for ln in f if ln.startswith("Max open files"))
    return int(line.split()[3])
