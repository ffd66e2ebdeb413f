"""Soak: the real daemon under mixed traffic for 10 minutes, in namespaces it creates.

    sudo .venv/bin/python -m bench.soak [--duration 600] [--json soak.json]

Traffic, at a bounded rate (about 20-40 MB/s in all, well under what pep moves): short
request/response connections (20/s), medium transfers (2/s, 1 MiB one way), a 64 MiB bulk
download every 20 s, and 20 long-lived connections that echo a message every 5 s. Every
transfer is checked with sha256 both ways (the server returns the digest of what it
received; the client recomputes the download's). Every 10 s the daemon's RSS, descriptor
count, CPU time and status counters are sampled.

Passes (exit 0) when no transfer failed, RSS after the first minute grew by less than
16 MiB, and once the traffic stops the descriptor count is back to its starting value, give
or take a few idle splice pipes the relay keeps for reuse (16 descriptors).
Not part of the test suite (tests/ must stay well under CI's budget); the figures of a real
run are in docs/RELIABILITY.md.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import random
import socket
import struct
import sys
import time
from pathlib import Path

import trio

from bench.paths import bench_topology, cpu_seconds, fd_count, rss_kib
from pep.testing.daemon import PepProcess
from pep.testing.netenv import INGRESS, SERVER_IP
from pep.testing.traffic import Pattern, connect, listen

PORT = 8080
_HEAD = struct.Struct("!IQQ")  # seed, upload size, download size


class Stats:
    def __init__(self) -> None:
        self.ok: dict[str, int] = {}
        self.failed: dict[str, int] = {}
        self.errors: list[str] = []
        self.bytes = 0

    def done(self, kind: str, ok: bool, why: str = "") -> None:
        d = self.ok if ok else self.failed
        d[kind] = d.get(kind, 0) + 1
        if not ok and len(self.errors) < 50:
            self.errors.append(f"{kind}: {why}")


async def _send(sock: trio.socket.SocketType, data: bytes | memoryview) -> None:
    view = memoryview(data)
    while view:
        view = view[await sock.send(view[: 1 << 20]) :]


async def _recv_exact(sock: trio.socket.SocketType, n: int) -> bytes:
    out = b""
    while len(out) < n:
        more = await sock.recv(n - len(out))
        if not more:
            raise EOFError(f"EOF after {len(out)} of {n} bytes")
        out += more
    return out


async def server_conn(conn: trio.socket.SocketType) -> None:
    """Header, then the upload until FIN (hashed); reply: digest, then the download."""
    with conn:
        try:
            seed, _up, down = _HEAD.unpack(await _recv_exact(conn, _HEAD.size))
            if down == 0 and seed == 0:  # a long-lived echo connection
                while msg := await conn.recv(4096):
                    await _send(conn, msg)
                return
            h = hashlib.sha256()
            while chunk := await conn.recv(1 << 20):
                h.update(chunk)
            await _send(conn, h.digest())
            for chunk in Pattern(seed, down).chunks():
                await _send(conn, chunk)
        except OSError:
            pass


async def serve(listener: trio.socket.SocketType) -> None:
    async with trio.open_nursery() as n:
        while True:
            conn, _ = await listener.accept()
            n.start_soon(server_conn, conn)


async def transfer(ns: str, stats: Stats, kind: str, seed: int, up: int, down: int) -> None:
    try:
        with trio.fail_after(120):
            sock = await connect(ns, (SERVER_IP, PORT))
            with sock:
                await _send(sock, _HEAD.pack(seed, up, down))
                h = hashlib.sha256()
                for chunk in Pattern(seed ^ 0x5A5A, up).chunks():
                    h.update(chunk)
                    await _send(sock, chunk)
                sock.shutdown(socket.SHUT_WR)
                digest = await _recv_exact(sock, 32)
                got, n = hashlib.sha256(), 0
                while chunk := await sock.recv(1 << 20):
                    got.update(chunk)
                    n += len(chunk)
        if digest != h.digest():
            stats.done(kind, False, "upload digest differs")
        elif n != down or got.hexdigest() != Pattern(seed, down).sha256():
            stats.done(kind, False, f"download differs ({n} of {down} bytes)")
        else:
            stats.done(kind, True)
            stats.bytes += up + down
    except (OSError, EOFError, trio.TooSlowError) as e:
        stats.done(kind, False, repr(e))


async def long_lived(ns: str, stats: Stats, until: float, index: int) -> None:
    try:
        sock = await connect(ns, (SERVER_IP, PORT))
        with sock:
            await _send(sock, _HEAD.pack(0, 0, 0))
            i = 0
            while trio.current_time() < until:
                msg = b"long-lived %d message %d" % (index, i)
                await _send(sock, msg)
                with trio.fail_after(10):
                    if await _recv_exact(sock, len(msg)) != msg:
                        stats.done("long_lived_msg", False, "echo differs")
                        return
                stats.done("long_lived_msg", True)
                i += 1
                await trio.sleep(5)
    except (OSError, EOFError, trio.TooSlowError) as e:
        stats.done("long_lived_msg", False, repr(e))


async def every(period: float, until: float, fn, *args) -> None:
    async with trio.open_nursery() as n:
        t = trio.current_time()
        while t < until:
            n.start_soon(fn, *args)
            t += period
            await trio.sleep_until(t)


async def soak(duration: float, out: Path | None) -> int:
    stats = Stats()
    rng = random.Random(7)
    samples: list[dict[str, object]] = []
    with bench_topology("rk") as topo:
        pep = PepProcess(topo, "gw", ["--interface", INGRESS])
        try:
            pep.start()
            assert pep.proc is not None
            pid = pep.proc.pid
            ns = topo.ns("client")
            fds0 = fd_count(pid)
            t0 = trio.current_time()
            until = t0 + duration
            seeds = iter(range(1, 1 << 31))

            async def short() -> None:
                await transfer(ns, stats, "short", next(seeds), 1000, 10_000)

            async def medium() -> None:
                up = rng.random() < 0.5
                mib = 1 << 20
                await transfer(
                    ns, stats, "medium", next(seeds), mib if up else 10, 0 if up else mib
                )

            async def bulk() -> None:
                await transfer(ns, stats, "bulk", next(seeds), 100, 64 << 20)

            async def sample() -> None:
                while True:
                    from pep.testing.daemon import status_json

                    doc = await status_json(pep)
                    samples.append(
                        {
                            "t": round(trio.current_time() - t0, 1),
                            "rss_kib": rss_kib(pid),
                            "fds": fd_count(pid),
                            "cpu_s": cpu_seconds(pid),
                            "active": doc["totals"]["active"],
                            "closed": doc["totals"]["closed"],
                            "syn_split": doc["syn"]["split"],
                        }
                    )
                    print(json.dumps(samples[-1]), flush=True)
                    await trio.sleep(10)

            async with trio.open_nursery() as n:
                n.start_soon(serve, await listen(topo.ns("server"), SERVER_IP, PORT))
                n.start_soon(sample)
                async with trio.open_nursery() as load:
                    for i in range(20):
                        load.start_soon(long_lived, ns, stats, until, i)
                    load.start_soon(every, 0.05, until, short)
                    load.start_soon(every, 0.5, until, medium)
                    load.start_soon(every, 20, until, bulk)
                await trio.sleep(2)  # the last connections close
                fds_end = fd_count(pid)
                rss_end = rss_kib(pid)
                n.cancel_scope.cancel()
        finally:
            pep.stop()
    warm = [s for s in samples if float(s["t"]) >= 60] or samples  # type: ignore[arg-type]
    rss_growth = rss_end - int(warm[0]["rss_kib"])  # type: ignore[call-overload]
    result = {
        "duration_s": duration,
        "ok": stats.ok,
        "failed": stats.failed,
        "errors": stats.errors,
        "bytes_verified": stats.bytes,
        "connections": sum(stats.ok.values()) - stats.ok.get("long_lived_msg", 0) + 20,
        "rss_kib_first_minute_end": warm[0]["rss_kib"],
        "rss_kib_end": rss_end,
        "rss_growth_kib_after_warmup": rss_growth,
        "rss_kib_max": max(int(s["rss_kib"]) for s in samples),  # type: ignore[call-overload]
        "fds_start": fds0,
        "fds_max": max(int(s["fds"]) for s in samples),  # type: ignore[call-overload]
        "fds_end": fds_end,
        "cpu_s": samples[-1]["cpu_s"] if samples else None,
        "samples": samples,
    }
    text = json.dumps(result, indent=1)
    if out is not None:
        out.write_text(text)
    summary = {k: v for k, v in result.items() if k != "samples"}
    print(json.dumps(summary, indent=1))
    # The relay keeps returned splice pipes for reuse (pep.split.pipes.PipePool): a few idle pipes,
    # two descriptors each, may stay open after the traffic stops.
    passed = not stats.failed and rss_growth < 16 << 10 and fds_end <= fds0 + 16
    print("PASS" if passed else "FAIL")
    return 0 if passed else 1


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--duration", type=float, default=600, help="seconds (default 600)")
    p.add_argument("--json", type=Path, help="write every figure and sample here")
    args = p.parse_args()
    start = time.monotonic()
    code = trio.run(soak, args.duration, args.json)
    print(f"wall time {time.monotonic() - start:.0f}s")
    return code


if __name__ == "__main__":
    sys.exit(main())
