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
import platform
import shutil
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


def measure(seconds: float, reverse: bool, streams: int) -> dict[str, object]:
    with gateway_topology("b") as topo:
        kernel = iperf(topo, seconds, reverse, streams)
        pep = PepProcess(topo, "gw", ["--interface", INGRESS, "--log-level", "info"])
        try:
            pep.start()
            split = iperf(topo, seconds, reverse, streams)
        finally:
            pep.stop()
    return {
        "direction": "server->client" if reverse else "client->server",
        "streams": streams,
        "seconds": seconds,
        "kernel_gbit": round(kernel / 1e9, 2),
        "pep_gbit": round(split / 1e9, 2),
        "ratio": round(split / kernel, 3),
        "machine": f"{platform.node()} {platform.machine()} {platform.release()}",
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--seconds", type=float, default=10)
    ap.add_argument("--streams", type=int, default=1)
    ap.add_argument("--reverse", action="store_true", help="server -> client")
    ap.add_argument("--json", metavar="FILE", help="also write the result as JSON")
    args = ap.parse_args(argv)
    if shutil.which("iperf3") is None:
        print("bench: iperf3 is not installed (apt-get install iperf3)", file=sys.stderr)
        return 2
    res = measure(args.seconds, args.reverse, args.streams)
    print(
        f"bulk {res['direction']} x{res['streams']} {res['seconds']}s: kernel forwarding "
        f"{res['kernel_gbit']} Gbit/s, pep {res['pep_gbit']} Gbit/s, ratio {res['ratio']}"
    )
    if args.json:
        with open(args.json, "w") as f:
            json.dump(res, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
