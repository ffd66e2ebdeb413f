"""Faults, against the real daemon: it dies, it runs out of descriptors, the server or the
client misbehaves. Each test says what must be true afterwards and measures it."""

from __future__ import annotations

import contextlib
import errno
import os
import signal
import socket
import struct

import pytest
import trio

from bench.paths import cpu_seconds, fd_count, rss_kib
from pep.topology import Topology
from tests.daemon import StartPep, settle, status_json
from tests.netenv import (
    CLIENT_IP,
    GW_SERVER_IP,
    SERVER_IP,
    connect,
    echo_upper,
    hash_to_eof,
    peer_seen,
    rules_in,
    send_all,
    serving,
    sha,
)

pytestmark = pytest.mark.netns

PORT, ECHO_PORT = 8080, 8081
ECHO = (SERVER_IP, ECHO_PORT)
_LINGER_RESET = struct.pack("ii", 1, 0)


def reset(sock: trio.socket.SocketType) -> None:
    """Close with an RST, as a crashing or aborting peer does."""
    with contextlib.suppress(OSError):
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, _LINGER_RESET)
    sock.close()


async def read_until_end(sock: trio.socket.SocketType) -> tuple[str, int]:
    """("eof" | "reset", bytes read) for a socket read to its end."""
    total = 0
    while True:
        try:
            b = await sock.recv(1 << 20)
        except OSError as e:
            assert e.errno in (errno.ECONNRESET, errno.EPIPE), e
            return "reset", total
        if not b:
            return "eof", total
        total += len(b)


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


# --- the server misbehaves ------------------------------------------------------------------


async def test_refused_upstream_resets_the_client_within_half_a_second(
    topo: Topology, start_pep: StartPep
) -> None:
    pep = start_pep()
    times = []
    with trio.fail_after(20):
        for _ in range(20):
            t0 = trio.current_time()
            try:
                sock = await connect(topo.ns("client"), (SERVER_IP, PORT))  # nothing listens
                with sock:
                    outcome, _ = await read_until_end(sock)
            except (ConnectionRefusedError, ConnectionResetError):
                outcome = "reset"  # the reset came while connect() was returning
            times.append(trio.current_time() - t0)
            assert outcome == "reset"  # never a clean EOF: the client must not think it was heard
    print(f"refused upstream: 20 clients reset in max {max(times) * 1000:.1f} ms")
    assert max(times) < 0.5, times
    assert pep.log().count("connect failed: ECONNREFUSED; resetting client") == 20


async def test_blackholed_upstream_times_out_resets_client_and_leaks_no_fd(
    topo: Topology, start_pep: StartPep
) -> None:
    drop = ["INPUT", "-p", "tcp", "--dport", str(PORT), "-j", "DROP"]
    assert topo.run("server", ["iptables-legacy", "-A", *drop]).returncode == 0
    pep = start_pep(config="connect_timeout = 1.0\n")
    pid = pep.pid
    fds_before = fd_count(pid)
    results: list[tuple[str, float]] = []

    async def one() -> None:
        t0 = trio.current_time()
        try:
            sock = await connect(topo.ns("client"), (SERVER_IP, PORT))
            with sock:
                await send_all(sock, b"anyone there?")
                outcome, _ = await read_until_end(sock)
        except (ConnectionRefusedError, ConnectionResetError):
            outcome = "reset"
        results.append((outcome, trio.current_time() - t0))

    with trio.fail_after(15):
        async with trio.open_nursery() as n:
            for _ in range(30):
                n.start_soon(one)
            await trio.sleep(0.5)
            during = fd_count(pid)  # 30 client sockets + 30 connecting upstream sockets
    ts = sorted(t for _, t in results)
    print(f"blackholed: 30 clients reset after {ts[0]:.2f}-{ts[-1]:.2f}s; fds {fds_before} -> "
          f"{during} during -> {fd_count(pid)} after")  # fmt: skip
    assert [r[0] for r in results] == ["reset"] * 30
    assert all(0.9 <= t < 3.0 for _, t in results), results
    assert during >= fds_before + 40  # most of the 30 + 30 sockets are open at once
    after = await settle(lambda: fd_count(pid), lambda v: v <= fds_before)
    assert after <= fds_before, (fds_before, during, after)
    assert pep.log().count("connect timeout; resetting client") == 30


async def test_server_reset_mid_transfer_reaches_the_client_as_a_reset(
    topo: Topology, start_pep: StartPep
) -> None:
    start_pep()
    size = 64 << 20

    async def send_part_then_reset(conn: trio.socket.SocketType) -> None:
        data = os.urandom(4 << 20)
        for _ in range(3):  # 12 MiB of the 64 announced, then the server crashes
            await send_all(conn, data)
        reset(conn)

    async def read_part_then_reset(conn: trio.socket.SocketType) -> None:
        got = 0
        while got < 3 << 20:
            got += len(await conn.recv(1 << 20))
        reset(conn)

    for direction in ("down", "up"):
        handler = send_part_then_reset if direction == "down" else read_part_then_reset
        with trio.fail_after(20):
            async with serving(topo, (SERVER_IP, PORT), handler):
                sock = await connect(topo.ns("client"), (SERVER_IP, PORT))
                with sock:
                    if direction == "down":
                        await send_all(sock, b"GET 64 MiB")
                        outcome, got = await read_until_end(sock)
                        assert got < size
                    else:
                        try:
                            await send_all(sock, b"\0" * size)
                            outcome, _ = await read_until_end(sock)
                        except OSError as e:
                            assert e.errno in (errno.ECONNRESET, errno.EPIPE), e
                            outcome = "reset"
        assert outcome == "reset", f"{direction}: a cut transfer looked complete"


# --- the client misbehaves ------------------------------------------------------------------


async def test_client_reset_mid_transfer_closes_the_upstream_promptly(
    topo: Topology, start_pep: StartPep
) -> None:
    pep = start_pep()
    ended: list[tuple[str, float]] = []

    async def stream_until_gone(conn: trio.socket.SocketType) -> None:
        chunk = os.urandom(1 << 16)
        try:
            while True:
                await send_all(conn, chunk)
        except OSError as e:
            ended.append((errno.errorcode.get(e.errno or 0, "?"), trio.current_time()))

    with trio.fail_after(20):
        async with serving(topo, (SERVER_IP, PORT), stream_until_gone):
            sock = await connect(topo.ns("client"), (SERVER_IP, PORT))
            got = 0
            while got < 8 << 20:
                got += len(await sock.recv(1 << 20))
            t0 = trio.current_time()
            reset(sock)
            while not ended:
                await trio.sleep(0.01)
    [(err, t)] = ended
    print(f"client reset: the server saw {err} {(t - t0) * 1000:.1f} ms later")
    assert err in ("ECONNRESET", "EPIPE")  # the server sees the abort, not a clean close
    assert t - t0 < 0.5, f"upstream closed {t - t0:.3f}s after the client's reset"
    [rec] = pep.closed_lines(expect=1)
    assert rec["reason"] == "client"


async def test_idle_connection_is_closed_after_idle_timeout_and_a_busy_one_is_not(
    topo: Topology, start_pep: StartPep
) -> None:
    pep = start_pep(config="idle_timeout = 1.0\n")
    server_saw: list[float] = []

    async def echo_until_eof(conn: trio.socket.SocketType) -> None:
        while data := await conn.recv(100):
            await send_all(conn, data.upper())
        server_saw.append(trio.current_time())

    with trio.fail_after(20):
        async with serving(topo, (SERVER_IP, PORT), echo_until_eof):
            idle = await connect(topo.ns("client"), (SERVER_IP, PORT))
            busy = await connect(topo.ns("client"), (SERVER_IP, PORT))
            t0 = trio.current_time()
            for s in (idle, busy):
                await send_all(s, b"hi")
                assert await s.recv(10) == b"HI"

            async def keep_busy() -> None:
                for _ in range(10):  # one byte every 0.3 s for 3 s: never idle for 1 s
                    await send_all(busy, b"x")
                    assert await busy.recv(10) == b"X"
                    await trio.sleep(0.3)

            async with trio.open_nursery() as c:
                c.start_soon(keep_busy)
                assert await idle.recv(10) == b""  # closed by pep, with a FIN
                idle_closed = trio.current_time() - t0
            idle.close()
            busy.close()
            while len(server_saw) < 2:
                await trio.sleep(0.01)
    print(f"idle_timeout 1.0: idle connection closed after {idle_closed:.2f}s; busy one kept")
    assert 0.9 <= idle_closed < 2.0, idle_closed
    assert server_saw[0] - t0 < 2.0  # the upstream leg was closed too
    reasons = sorted(r["reason"] for r in pep.closed_lines(expect=2))
    assert reasons == ["eof", "idle"]  # "idle timeout" for the idle one


async def test_slow_reader_pauses_a_fast_writer_with_bounded_buffering(
    topo: Topology, start_pep: StartPep
) -> None:
    pep = start_pep()
    pid = pep.pid
    rss_before = rss_kib(pid)
    size = 256 << 20
    data = os.urandom(8 << 20)
    sent = [0]
    got: dict[str, tuple[str, int]] = {}

    async def fast_writer(conn: trio.socket.SocketType) -> None:
        view = memoryview(data)
        while sent[0] < size:
            n = await conn.send(view[sent[0] % len(data) :][: 1 << 20])
            sent[0] += n
        conn.shutdown(socket.SHUT_WR)

    with trio.fail_after(120):
        async with serving(topo, (SERVER_IP, PORT), fast_writer):
            sock = await connect(topo.ns("client"), (SERVER_IP, PORT))
            with sock:
                await trio.sleep(2)  # the client reads nothing for 2 s
                stalled_at = sent[0]
                await trio.sleep(1)
                assert sent[0] == stalled_at, "the writer was not paused"
                rss_stalled = rss_kib(pid)
                got["client"] = await hash_to_eof(sock)  # now read it all
    expected = sha(data * (size // len(data)))
    print(f"slow reader: writer paused after {stalled_at / 2**20:.1f} MiB; pep RSS "
          f"{rss_before} -> {rss_stalled} KiB")  # fmt: skip
    assert got["client"] == (expected, size)
    # In flight while paused: socket buffers and one splice pipe, nothing in pep's memory.
    assert stalled_at < 48 << 20, f"{stalled_at / 2**20:.1f} MiB accepted from the writer"
    assert rss_stalled - rss_before < 16 << 10, (rss_before, rss_stalled)
