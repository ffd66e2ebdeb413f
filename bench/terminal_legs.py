"""The sharer with real link legs: a hub's pep with 1,000 terminal plans and as many sending
legs as its descriptors allow, and what its ticks cost.

    sudo .venv/bin/python -m bench.terminal_legs [--legs 100,1000,3000,4500] [--seconds 10]

The gateway topology (pep/testing/netenv.py) as a hub: the client namespace holds 1,000
terminal addresses (10.100.0.1 ...), the gateway's client side (cli0) is the link (connections
arrive on it, as at a hub), and its plans file gives each address its own terminal, 1 Mbit/s
each: 1,000 terminals, oversubscribing a 200 Mbit/s carrier five times. Each leg is a
connection from one terminal address (leg i: terminal i mod 1,000) to a server that sends
without end; the client reads everything. So every leg stays active (its socket always holds
unsent data) and the sharer samples all of them every tick (GEO's 600 ms: 50 ms).

The figures come from pep status: ``tick_cpu_s`` and ``ticks`` (the CPU the sharer's ticks
took, sampling, resharing and setting caps: pep.link.pacer) over ``--seconds``, once the legs
are open and sending; and the process's own CPU (relaying included), RSS and descriptors. The
legs are opened in steps (each level adds to the last); a level pep cannot reach is reported
with how far it got. Buffers: ``[client] sndbuf = 131072`` and ``pipe_size = 65536`` keep the
kernel memory of thousands of stalled legs bounded (a plan's BDP would give 256 KiB each).
"""

from __future__ import annotations

import argparse
import json
import resource
import sys
import time
from pathlib import Path
from typing import Any

import trio
from pyroute2 import NetNS

from bench.bulk import machine
from bench.paths import SELECT_SERVER, bench_topology, cpu_seconds, fd_count, rss_kib
from pep.ops.status.socket import fetch as fetch_status
from pep.testing.daemon import PepProcess
from pep.testing.netenv import ADDRS, INGRESS, SERVER_IP
from pep.testing.topology import Topology, ns_socket

PORT = 7100
TERMINALS = 1000
# Sends zeros to every connection as fast as it takes them, until the peer closes.
SERVER = SELECT_SERVER.replace("{event}", "EVENT_WRITE").replace(
    "{action}",
    """            try:
                conn.send(chunk)
            except BlockingIOError:
                pass
            except OSError:
                close(conn)""",
)


def terminal_address(k: int) -> str:
    return f"10.100.{k // 250}.{k % 250 + 1}"


def plans_file(path: Path) -> None:
    lines = [f"t{k} 1mbit 1mbit {terminal_address(k)}/32" for k in range(TERMINALS)]
    path.write_text("\n".join(lines) + "\n")


def add_addresses(topo: Topology) -> None:
    """The terminals' addresses on the client, and the hub's route to them."""
    with NetNS(topo.ns("client")) as ipr:
        index = ipr.link_lookup(ifname="eth0")[0]
        for k in range(TERMINALS):
            ipr.addr("add", index=index, address=terminal_address(k), prefixlen=32)
    topo.route("gw", "10.100.0.0/16", ADDRS[4].client)


async def open_legs(
    topo: Topology, first: int, n: int, nursery: trio.Nursery, got: list[int]
) -> int:
    """Open legs ``first`` .. ``first + n - 1``, each read to its end in ``nursery``; returns how
    many opened."""
    opened = 0
    limiter = trio.CapacityLimiter(100)

    async def one(i: int) -> None:
        nonlocal opened
        async with limiter:
            s = trio.socket.from_stdlib_socket(ns_socket(topo.ns("client")))
            try:
                await s.bind((terminal_address(i % TERMINALS), 0))
                with trio.fail_after(10):
                    await s.connect((SERVER_IP, PORT))
                    got[0] += len(await s.recv(65536))
            except (OSError, trio.TooSlowError):
                s.close()
                return
            opened += 1
        nursery.start_soon(drain, s, got)

    async with trio.open_nursery() as n_open:
        for i in range(first, first + n):
            n_open.start_soon(one, i)
    return opened


async def drain(s: trio.socket.SocketType, got: list[int]) -> None:
    with s:
        while True:
            try:
                data = await s.recv(1 << 16)
            except OSError:
                return
            if not data:
                return
            got[0] += len(data)


def sample(pep: PepProcess, pid: int) -> dict[str, Any]:
    assert pep.status_socket is not None
    link = fetch_status(pep.status_socket)["link"]
    assert isinstance(link, dict)
    return {
        "t": time.monotonic(),
        "ticks": link["ticks"],
        "tick_cpu_s": link["tick_cpu_s"],
        "active": link["flows_active"],
        "legs": link["flows"],
        "cpu_s": cpu_seconds(pid),
        "rss_kib": rss_kib(pid),
        "fds": fd_count(pid),
    }


async def run_levels(
    topo: Topology, pep: PepProcess, pid: int, levels: list[int], seconds: float
) -> list[dict[str, Any]]:
    rows = []
    got = [0]
    async with trio.open_nursery() as nursery:
        total = 0
        for level in levels:
            total += await open_legs(topo, total, level - total, nursery, got)
            await trio.sleep(3)  # every leg sending, its share settled
            a = await trio.to_thread.run_sync(sample, pep, pid)
            got0 = got[0]
            await trio.sleep(seconds)
            b = await trio.to_thread.run_sync(sample, pep, pid)
            dt, ticks = b["t"] - a["t"], b["ticks"] - a["ticks"]
            cpu = b["tick_cpu_s"] - a["tick_cpu_s"]
            row = {
                "level": level,
                "legs_open": total,
                "active_legs": round((a["active"] + b["active"]) / 2),
                "ticks_per_s": round(ticks / dt, 1),
                "tick_ms": round(cpu / ticks * 1000, 3) if ticks else None,
                "sharer_core_share": round(cpu / dt, 4),
                "process_core_share": round((b["cpu_s"] - a["cpu_s"]) / dt, 4),
                "relayed_mbit_s": round((got[0] - got0) * 8 / dt / 1e6, 2),
                "rss_kib": b["rss_kib"],
                "fds": b["fds"],
            }
            rows.append(row)
            print(
                f"{row['legs_open']:>5} legs open ({row['active_legs']} active): sharer "
                f"{row['tick_ms']} ms per tick x {row['ticks_per_s']}/s = "
                f"{row['sharer_core_share']:.1%} of a core; pep process "
                f"{row['process_core_share']:.1%} (relaying {row['relayed_mbit_s']} Mbit/s); "
                f"RSS {row['rss_kib'] // 1024} MiB, {row['fds']} fds",
                flush=True,
            )
            if total < level:
                print(f"  stopped: {total} of {level} legs opened (descriptors)", flush=True)
                break
        nursery.cancel_scope.cancel()
    return rows


def measure(levels: list[int], seconds: float) -> dict[str, Any]:
    resource.setrlimit(resource.RLIMIT_NOFILE, (20000, 20000))
    with bench_topology("tl") as topo:
        add_addresses(topo)
        server = topo.popen(
            "server", [sys.executable, "-c", SERVER.format(ip=SERVER_IP, port=PORT)]
        )
        tmp = Path(f"/tmp/pep-bench-tl-{topo.prefix}")
        tmp.mkdir()
        try:
            plans = tmp / "terminals.txt"
            plans_file(plans)
            conf = tmp / "pep.toml"
            conf.write_text(
                'log_level = "warning"\npipe_size = 65536\n[client]\nsndbuf = 131072\n'
                f'[link]\ninterface = "{INGRESS}"\nrtt = "600ms"\negress_rate = "200mbit"\n'
                f'ingress_rate = "200mbit"\nterminals_file = "{plans}"\n'
            )
            pep = PepProcess(topo, "gw", ["--interface", INGRESS], config=conf)
            t0 = time.monotonic()
            pep.start(timeout=60)
            started = time.monotonic() - t0
            assert pep.proc is not None
            routes = topo.run("gw", ["ip", "route", "show", "proto", "94"]).stdout.count("\n")
            print(
                f"pep ready in {started:.2f} s with {TERMINALS} plans ({routes} routes of its own)"
            )
            try:
                rows = trio.run(run_levels, topo, pep, pep.proc.pid, levels, seconds)
            finally:
                pep.stop()
        finally:
            server.kill()
            server.wait()
            for f in tmp.iterdir():
                f.unlink()
            tmp.rmdir()
    return {"terminals": TERMINALS, "start_s": round(started, 2), "routes": routes,
            "seconds": seconds, "rows": rows, "machine": machine()}  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--legs", default="100,1000,3000,4500", help="levels, each adding legs")
    ap.add_argument("--seconds", type=float, default=10.0, help="measured per level")
    ap.add_argument("--json", metavar="FILE")
    args = ap.parse_args(argv)
    res = measure([int(n) for n in args.legs.split(",")], args.seconds)
    if args.json:
        Path(args.json).write_text(json.dumps(res, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
