"""A hub's peer listener serving a fleet of terminal PEPs: 500 terminals x 8 pooled connections,
what they cost it in descriptors, memory and CPU while idle.

    sudo .venv/bin/python -m bench.peer_fleet [--terminals 500] [--pool 8] [--idle 60]

The gateway topology as a hub: its pep listens for near ends on its client side (cli0,
10.77.1.1:5001) with [link] and 1,000 terminal plans there, as a hub runs. The client namespace
plays 500 terminal PEPs, each from its own address (10.100.x.y), each keeping ``--pool``
authenticated connections as a terminal's pep.peer.pool does: the same handshake
(``PeerPool._handshake``: hello, challenge, proof, ready) and keepalive, then idle. Measured on
the hub's pep: descriptors and RSS before and with the fleet connected, its peer listener's
count of authenticated connections, and its CPU over ``--idle`` seconds of idle pooled
connections (utime + stime from /proc).
"""

from __future__ import annotations

import argparse
import errno
import json
import os
import resource
import sys
import time
from pathlib import Path
from typing import Any

import trio
from pyroute2 import NetNS

from bench.bulk import machine
from bench.paths import bench_topology, cpu_seconds, fd_count, rss_kib
from bench.terminal_legs import TERMINALS, plans_file, terminal_address
from pep.config import Config
from pep.config.peer import Peer, keygen, load_key
from pep.ops.status.socket import fetch as fetch_status
from pep.peer.pool import KEEPALIVE, PeerPool
from pep.split.sockopts import apply_tuning
from pep.testing.daemon import PepProcess
from pep.testing.netenv import ADDRS, INGRESS
from pep.testing.topology import Topology, ns_socket

LISTEN = f"{ADDRS[4].gw_client}:5001"


async def connect_fleet(topo: Topology, terminals: int, pool: int, secret: bytes) -> list[Any]:
    """Each terminal's pooled connections, authenticated as a terminal's pep.peer.pool does."""
    near = PeerPool(Peer("/unused", connect=LISTEN), secret, Config(), lambda host: None)
    host, port = near.address
    socks = []
    limiter = trio.CapacityLimiter(100)

    async def one(k: int) -> None:
        async with limiter:
            sock = ns_socket(topo.ns("client"))
            sock.setblocking(False)
            apply_tuning(sock, KEEPALIVE)
            sock.bind((terminal_address(k), 0))
            err = sock.connect_ex((host, port))
            if err not in (0, errno.EINPROGRESS):
                raise OSError(err, os.strerror(err))
            await trio.lowlevel.wait_writable(sock)
            await near._handshake(sock)  # the pool's own: hello, challenge, proof, ready
            socks.append(sock)

    async with trio.open_nursery() as n:
        for k in range(terminals):
            for _ in range(pool):
                n.start_soon(one, k)
    return socks


def snapshot(pep: PepProcess, pid: int) -> dict[str, Any]:
    assert pep.status_socket is not None
    listener = fetch_status(pep.status_socket)["peer"]["listener"]  # type: ignore[index]
    return {"fds": fd_count(pid), "rss_kib": rss_kib(pid), "cpu_s": cpu_seconds(pid),
            "accepted": listener["accepted"]}  # fmt: skip


def measure(terminals: int, pool: int, idle: float) -> dict[str, Any]:
    resource.setrlimit(resource.RLIMIT_NOFILE, (20000, 20000))
    with bench_topology("pf") as topo:
        with NetNS(topo.ns("client")) as ipr:
            index = ipr.link_lookup(ifname="eth0")[0]
            for k in range(terminals):
                ipr.addr("add", index=index, address=terminal_address(k), prefixlen=32)
        topo.route("gw", "10.100.0.0/16", ADDRS[4].client)
        tmp = Path(f"/tmp/pep-bench-pf-{topo.prefix}")
        tmp.mkdir()
        try:
            key = tmp / "peer.key"
            key.write_text(keygen() + "\n")
            key.chmod(0o600)
            plans = tmp / "terminals.txt"
            plans_file(plans)
            conf = tmp / "pep.toml"
            conf.write_text(
                'log_level = "warning"\n'
                f'[link]\ninterface = "{INGRESS}"\nrtt = "600ms"\negress_rate = "1gbit"\n'
                f'ingress_rate = "1gbit"\nterminals_file = "{plans}"\n'
                f'[peer]\nkey_file = "{key}"\nlisten = "{LISTEN}"\nallow = ["10.100.0.0/16"]\n'
            )
            pep = PepProcess(topo, "gw", ["--interface", INGRESS], config=conf)
            pep.start(timeout=60)
            assert pep.proc is not None
            pid = pep.proc.pid
            try:
                time.sleep(1)
                before = snapshot(pep, pid)
                t0 = time.monotonic()
                socks = trio.run(connect_fleet, topo, terminals, pool, load_key(str(key)))
                opened = time.monotonic() - t0
                time.sleep(2)
                held = snapshot(pep, pid)
                time.sleep(idle)
                after = snapshot(pep, pid)
                for s in socks:
                    s.close()
            finally:
                pep.stop()
        finally:
            for f in tmp.iterdir():
                f.unlink()
            tmp.rmdir()
    n = terminals * pool
    return {
        "terminals": terminals,
        "pool": pool,
        "connections": n,
        "connect_seconds": round(opened, 2),
        "accepted": held["accepted"] - before["accepted"],
        "fds_before": before["fds"],
        "fds_held": held["fds"],
        "fds_per_connection": round((held["fds"] - before["fds"]) / n, 3),
        "rss_kib_before": before["rss_kib"],
        "rss_kib_held": held["rss_kib"],
        "rss_kib_per_connection": round((held["rss_kib"] - before["rss_kib"]) / n, 2),
        "idle_seconds": idle,
        "idle_core_share": round((after["cpu_s"] - held["cpu_s"]) / idle, 5),
        "still_accepted_after_idle": after["accepted"] - before["accepted"],
        "plans": TERMINALS,
        "machine": machine(),
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--terminals", type=int, default=500)
    ap.add_argument("--pool", type=int, default=8, help="pooled connections per terminal")
    ap.add_argument("--idle", type=float, default=60.0, help="seconds of idle CPU measured")
    ap.add_argument("--json", metavar="FILE")
    args = ap.parse_args(argv)
    res = measure(args.terminals, args.pool, args.idle)
    print(
        f"peer fleet: {res['terminals']} terminal PEPs x {res['pool']} = {res['connections']} "
        f"pooled connections, authenticated in {res['connect_seconds']} s "
        f"({res['accepted']} counted by the hub); hub pep: {res['fds_held']} fds "
        f"({res['fds_per_connection']} per connection), RSS {res['rss_kib_held'] // 1024} MiB "
        f"({res['rss_kib_per_connection']} KiB per connection), "
        f"{res['idle_core_share']:.2%} of a core over {res['idle_seconds']:g} s idle"
    )
    if args.json:
        Path(args.json).write_text(json.dumps(res, indent=2))
    return 0 if res["accepted"] == res["connections"] else 1


if __name__ == "__main__":
    sys.exit(main())
