"""Bulk throughput through the gateway: pep versus plain kernel forwarding, in one run.

    sudo .venv/bin/python -m bench.bulk [--seconds 10] [--reverse] [--json out.json]

Builds client -- gateway -- server namespaces (the test topology), runs iperf3 client -> server
once with the gateway only forwarding, then with `pep run` splitting the connection, and prints
both rates and their ratio. A ratio, not an absolute number, is the result: both paths share the
same veths, CPU and kernel, so the ratio says what pep costs on this machine.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import time

from pep.topology import Topology
from tests.netenv import INGRESS, SERVER_IP, PepProcess, gateway_topology


def iperf(topo: Topology, seconds: float, reverse: bool, streams: int) -> float:
    """Receiver-side goodput in bit/s of one iperf3 run client -> server (or -R)."""
    server = topo.popen(
        "server",
        ["iperf3", "-s", "-1", "-B", SERVER_IP],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        time.sleep(0.3)
        args = ["iperf3", "-c", SERVER_IP, "-t", str(seconds), "-J", "-P", str(streams)]
        if reverse:
            args.append("-R")
        r = topo.run("client", args, timeout=seconds + 30)
        if r.returncode != 0:
            raise RuntimeError(f"iperf3 failed: {r.stdout[-500:]} {r.stderr[-500:]}")
        return float(json.loads(r.stdout)["end"]["sum_received"]["bits_per_second"])
    finally:
        server.kill()
        server.wait()


def measure(
    seconds: float, reverse: bool, streams: int, rounds: int, pep_args: list[str] | None = None
) -> dict[str, object]:
    """Alternate kernel-forwarding and pep runs, ``rounds`` of each, in one topology.

    Alternating (rather than all of one, then all of the other) spreads slow drifts of a
    shared machine over both paths; the median ratio is the result.
    """
    kernel: list[float] = []
    split: list[float] = []
    with gateway_topology("b") as topo:
        for _ in range(rounds):
            kernel.append(iperf(topo, seconds, reverse, streams))
            pep = PepProcess(topo, "gw", ["--interface", INGRESS, *(pep_args or [])])
            try:
                pep.start()
                split.append(iperf(topo, seconds, reverse, streams))
            finally:
                pep.stop()
    ratios = [p / k for p, k in zip(split, kernel, strict=True)]
    return {
        "direction": "server->client" if reverse else "client->server",
        "streams": streams,
        "seconds": seconds,
        "rounds": rounds,
        "kernel_gbit": [round(k / 1e9, 2) for k in kernel],
        "pep_gbit": [round(p / 1e9, 2) for p in split],
        "ratio_median": round(statistics.median(ratios), 3),
        "machine": f"{platform.node()} {os.cpu_count()} cpus {platform.machine()} "
        f"{platform.release()}",
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--seconds", type=float, default=10)
    ap.add_argument("--streams", type=int, default=1)
    ap.add_argument("--rounds", type=int, default=3, help="alternating runs of each path")
    ap.add_argument("--reverse", action="store_true", help="server -> client")
    ap.add_argument("--json", metavar="FILE", help="also write the result as JSON")
    ap.add_argument("--pep-config", metavar="TOML", help="config file for the pep under test")
    args = ap.parse_args(argv)
    if shutil.which("iperf3") is None:
        print("bench: iperf3 is not installed (apt-get install iperf3)", file=sys.stderr)
        return 2
    pep_args = ["--config", args.pep_config] if args.pep_config else []
    res = measure(args.seconds, args.reverse, args.streams, args.rounds, pep_args)
    print(
        f"bulk {res['direction']} x{res['streams']} {res['seconds']}s, {res['rounds']} rounds: "
        f"kernel forwarding {res['kernel_gbit']} Gbit/s, pep {res['pep_gbit']} Gbit/s, "
        f"median ratio {res['ratio_median']}"
    )
    if args.json:
        with open(args.json, "w") as f:
            json.dump(res, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
