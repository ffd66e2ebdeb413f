"""Faults of the daemon's peers, against the real daemon: the server refuses, never answers
or resets, the client resets, idles or reads too slowly. Each test says what must be true
afterwards and measures it. The daemon's own faults: tests/reliability/test_faults.py."""

from __future__ import annotations

import contextlib
import errno
import os
import socket
import struct

import pytest
import trio

from bench.paths import fd_count, rss_kib
from pep.testing.daemon import StartPep, settle
from pep.testing.netenv import PORT, SERVER_IP
from pep.testing.topology import Topology
from pep.testing.traffic import connect, hash_to_eof, read_until_end, send_all, serving, sha

pytestmark = pytest.mark.netns

_LINGER_RESET = struct.pack("ii", 1, 0)


def reset(sock: trio.socket.SocketType) -> None:
    """Close with an RST, as a crashing or aborting peer does."""
    with contextlib.suppress(OSError):
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, _LINGER_RESET)
    sock.close()


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
