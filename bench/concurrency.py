"""Many idle connections held open through pep: memory and descriptors per connection.

    sudo .venv/bin/python -m bench.concurrency [--connections 10000] [--workers 2]

Opens N connections client -> server through pep (each exchanges a few bytes, so it is
really split and relayed), holds them idle, and reads pep's resident memory and open
descriptors (all its processes) before and during: the difference divided by N is the cost
of one idle split connection. Then closes them all and checks every one still works.

With 2 fds per idle connection (two sockets; splice pipes are borrowed only while data moves)
10,000 connections need 20,000 descriptors: more than one process may hold under this
machine's 20,000 hard limit, so the default runs 2 workers (pep's SO_REUSEPORT processes).
"""

from __future__ import annotations

import argparse
import json
import resource
import socket
import sys
import time
from pathlib import Path

import trio

from bench.bulk import machine
from bench.paths import SELECT_SERVER, bench_topology, fd_count, path, rss_kib
from pep.testing.netenv import SERVER_IP
from pep.testing.topology import Topology, ns_socket

PORT = 7000
# A tiny echo server for the server namespace: holds every connection until the peer closes.
SERVER = SELECT_SERVER.replace("{event}", "EVENT_READ").replace(
    "{action}",
    """            try:
                data = conn.recv(65536)
            except OSError:
                data = b""
            if data:
                conn.send(data)
            else:
                close(conn)""",
)


async def open_all(topo: Topology, n: int, parallel: int) -> list[trio.socket.SocketType]:
    socks: list[trio.socket.SocketType] = []
    limiter = trio.CapacityLimiter(parallel)

    async def one(i: int) -> None:
        async with limiter:
            s = trio.socket.from_stdlib_socket(ns_socket(topo.ns("client")))
            await s.connect((SERVER_IP, PORT))
            msg = f"{i}\n".encode()
            await s.send(msg)
            got = b""
            while len(got) < len(msg):
                got += await s.recv(100)
            assert got == msg
            socks.append(s)

    async with trio.open_nursery() as nursery:
        for i in range(n):
            nursery.start_soon(one, i)
    return socks


async def close_all(socks: list[trio.socket.SocketType]) -> int:
    ok = 0
    for s in socks:
        with s:
            await s.send(b"bye")
            if await s.recv(10) == b"bye":
                ok += 1
            s.shutdown(socket.SHUT_WR)
    return ok


def measure(n: int, workers: int, parallel: int, hold: float = 1.0) -> dict[str, object]:
    resource.setrlimit(resource.RLIMIT_NOFILE, (20000, 20000))
    with bench_topology("c") as topo:
        server = topo.popen(
            "server", [sys.executable, "-c", SERVER.format(ip=SERVER_IP, port=PORT)]
        )
        try:
            time.sleep(0.5)
            conf = Path(f"/tmp/pep-bench-conc-{topo.prefix}.toml")
            conf.write_text(f'workers = {workers}\nlog_level = "warning"\nbacklog = 4096\n')
            with path(topo, "pep", ["--config", str(conf)]) as pid:
                assert pid is not None
                time.sleep(1)
                rss0, fd0 = rss_kib(pid), fd_count(pid)
                t0 = time.monotonic()
                socks = trio.run(open_all, topo, n, parallel)
                opened = time.monotonic() - t0
                time.sleep(hold)
                rss1, fd1 = rss_kib(pid), fd_count(pid)
                ok = trio.run(close_all, socks)
            conf.unlink()
        finally:
            server.kill()
            server.wait()
    return {
        "connections": n,
        "workers": workers,
        "hold_seconds": hold,
        "open_seconds": round(opened, 2),
        "open_per_second": round(n / opened),
        "rss_kib_before": rss0,
        "rss_kib_held": rss1,
        "rss_kib_per_connection": round((rss1 - rss0) / n, 2),
        "fds_before": fd0,
        "fds_held": fd1,
        "fds_per_connection": round((fd1 - fd0) / n, 3),
        "still_working_at_close": ok,
        "machine": machine(),
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--connections", type=int, default=10000)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--parallel", type=int, default=200, help="connects in flight at once")
    ap.add_argument(
        "--hold", type=float, default=1.0, help="seconds to hold them idle before closing"
    )
    ap.add_argument("--json", metavar="FILE")
    args = ap.parse_args(argv)
    res = measure(args.connections, args.workers, args.parallel, args.hold)
    print(
        f"concurrency: {res['connections']} idle connections through pep "
        f"({res['workers']} workers) opened in {res['open_seconds']} s; "
        f"{res['rss_kib_per_connection']} KiB RSS and {res['fds_per_connection']} fds per "
        f"connection; {res['still_working_at_close']} still working at close"
    )
    if args.json:
        Path(args.json).write_text(json.dumps(res, indent=2))
    return 0 if res["still_working_at_close"] == res["connections"] else 1


if __name__ == "__main__":
    sys.exit(main())
