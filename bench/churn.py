"""Connection churn: open / transfer / close cycles for minutes; pep must not grow.

    sudo .venv/bin/python -m bench.churn [--seconds 300] [--parallel 20]

Keeps ``parallel`` clients busy opening a connection through pep, sending 16 KiB, reading
the echo (sha256-checked) and closing, for ``seconds``. Samples pep's RSS and descriptor
count after a warm-up (pools and caches filled) and at the end, after the last connection
closed: a leak shows as growth between the two.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import sys
import time
from pathlib import Path

import trio

from bench.bulk import machine
from bench.concurrency import PORT, SERVER
from bench.paths import bench_topology, fd_count, path, rss_kib
from pep.testing.netenv import SERVER_IP
from pep.testing.topology import Topology, ns_socket

WARMUP = 10.0


async def churn(
    topo: Topology, seconds: float, parallel: int, pid: int, warmup: float
) -> dict[str, object]:
    done = failed = 0
    samples: dict[str, tuple[int, int]] = {}
    deadline = trio.current_time() + seconds

    async def client() -> None:
        nonlocal done, failed
        payload = os.urandom(16384)
        want = hashlib.sha256(payload).digest()
        while trio.current_time() < deadline:
            s = trio.socket.from_stdlib_socket(ns_socket(topo.ns("client")))
            try:
                with s:
                    await s.connect((SERVER_IP, PORT))
                    await s.send(payload)
                    got = b""
                    while len(got) < len(payload):
                        chunk = await s.recv(65536)
                        if not chunk:
                            break
                        got += chunk
                ok = hashlib.sha256(got).digest() == want
            except OSError:
                ok = False
            done += ok
            failed += not ok

    async def sampler() -> None:
        await trio.sleep(warmup)
        samples["warm"] = (rss_kib(pid), fd_count(pid))

    async with trio.open_nursery() as nursery:
        nursery.start_soon(sampler)
        for _ in range(parallel):
            nursery.start_soon(client)
    await trio.sleep(2)  # the last connections' close records
    samples["end"] = (rss_kib(pid), fd_count(pid))
    return {"completed": done, "failed": failed, "samples": samples}


def measure(seconds: float, parallel: int, warmup: float = WARMUP) -> dict[str, object]:
    with bench_topology("h") as topo:
        server = topo.popen(
            "server", [sys.executable, "-c", SERVER.format(ip=SERVER_IP, port=PORT)]
        )
        try:
            time.sleep(0.5)
            with path(topo, "pep", ["--log-level", "warning"]) as pid:
                assert pid is not None
                res = trio.run(churn, topo, seconds, parallel, pid, warmup)
        finally:
            server.kill()
            server.wait()
    warm, end = res["samples"]["warm"], res["samples"]["end"]  # type: ignore[index]
    return {
        "seconds": seconds,
        "parallel": parallel,
        "completed": res["completed"],
        "failed": res["failed"],
        "connections_per_second": round(res["completed"] / seconds),
        "rss_kib_warm": warm[0],
        "rss_kib_end": end[0],
        "fds_warm": warm[1],
        "fds_end": end[1],
        "machine": machine(),
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--seconds", type=float, default=300)
    ap.add_argument("--parallel", type=int, default=20)
    ap.add_argument("--warmup", type=float, default=WARMUP, help="seconds before the 1st sample")
    ap.add_argument("--json", metavar="FILE")
    args = ap.parse_args(argv)
    if args.seconds <= args.warmup:
        ap.error("--seconds must exceed --warmup")
    res = measure(args.seconds, args.parallel, args.warmup)
    print(
        f"churn {res['seconds']}s x{res['parallel']}: {res['completed']} connections "
        f"({res['failed']} failed); pep RSS {res['rss_kib_warm']} -> {res['rss_kib_end']} KiB, "
        f"fds {res['fds_warm']} -> {res['fds_end']}"
    )
    if args.json:
        Path(args.json).write_text(json.dumps(res, indent=2))
    return 0 if res["failed"] == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
