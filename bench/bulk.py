"""Bulk throughput through the gateway: pep against kernel forwarding and HAProxy, in one run.

    sudo .venv/bin/python -m bench.bulk [--seconds 10] [--streams 1] [--reverse] [--rounds 3]

Builds client -- gateway -- server namespaces (the test topology) and runs iperf3 client ->
server (or -R) through each path of bench.paths in turn, alternating for ``rounds`` rounds.
The result is a ratio, not an absolute number: all paths share the same veths, CPU and
kernel in the same run, so the ratio says what pep costs (or saves) on this machine.
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

from bench.paths import PATHS, bench_topology, path
from pep.testing.netenv import SERVER_IP
from pep.testing.topology import Topology


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


def machine() -> str:
    return f"{os.cpu_count()} cpus, {platform.machine()}, Linux {platform.release()}"


def measure(
    seconds: float,
    reverse: bool,
    streams: int,
    rounds: int,
    paths: tuple[str, ...] = PATHS,
    pep_args: list[str] | None = None,
) -> dict[str, object]:
    """Alternate the paths ``rounds`` times in one topology; medians and same-round ratios.

    Alternating (rather than all runs of one path, then the next) spreads slow drifts of a
    shared machine over every path.
    """
    gbit: dict[str, list[float]] = {p: [] for p in paths}
    with bench_topology("b") as topo:
        for _ in range(rounds):
            for name in paths:
                with path(topo, name, pep_args):
                    gbit[name].append(iperf(topo, seconds, reverse, streams) / 1e9)
    result: dict[str, object] = {
        "direction": "server->client" if reverse else "client->server",
        "streams": streams,
        "seconds": seconds,
        "rounds": rounds,
        "gbit": {p: [round(v, 2) for v in vs] for p, vs in gbit.items()},
        "median_gbit": {p: round(statistics.median(vs), 2) for p, vs in gbit.items()},
        "machine": machine(),
    }
    for ref in ("kernel", "haproxy"):
        if "pep" in gbit and ref in gbit:
            ratios = [p / r for p, r in zip(gbit["pep"], gbit[ref], strict=True)]
            result[f"pep_vs_{ref}"] = round(statistics.median(ratios), 3)
    return result


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--seconds", type=float, default=10)
    ap.add_argument("--streams", type=int, default=1)
    ap.add_argument("--rounds", type=int, default=3, help="alternating runs of each path")
    ap.add_argument("--reverse", action="store_true", help="server -> client")
    ap.add_argument("--paths", default=",".join(PATHS), help="comma list of " + ",".join(PATHS))
    ap.add_argument("--json", metavar="FILE", help="also write the result as JSON")
    ap.add_argument("--pep-config", metavar="TOML", help="config file for the pep under test")
    args = ap.parse_args(argv)
    paths = tuple(args.paths.split(","))
    for tool in ["iperf3"] + (["haproxy"] if "haproxy" in paths else []):
        if shutil.which(tool) is None:
            print(f"bench: {tool} is not installed (deploy/setup.sh installs it)", file=sys.stderr)
            return 2
    pep_args = ["--config", args.pep_config] if args.pep_config else []
    res = measure(args.seconds, args.reverse, args.streams, args.rounds, paths, pep_args)
    med = res["median_gbit"]
    assert isinstance(med, dict)
    print(
        f"bulk {res['direction']} x{res['streams']} {res['seconds']}s, {res['rounds']} rounds, "
        "median Gbit/s: "
        + ", ".join(f"{p} {v}" for p, v in med.items())
        + "".join(
            f"; pep/{r} {res[f'pep_vs_{r}']}" for r in ("kernel", "haproxy") if f"pep_vs_{r}" in res
        )
    )
    if args.json:
        with open(args.json, "w") as f:
            json.dump(res, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
