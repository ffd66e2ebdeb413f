"""Short connections: requests per second with a new TCP connection per request, and latency.

    sudo .venv/bin/python -m bench.short [--seconds 10] [--connections 50] [--rounds 3]

wrk in the client namespace (``Connection: close``: every request opens and closes a
connection, so each one crosses pep's SYN queue, accept, upstream connect and relay) against
nginx in the server namespace, through each path of bench.paths, alternating rounds. Reports
requests/s and p50/p99 latency per path, and pep's ratios to HAProxy.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from bench.bulk import machine
from bench.paths import PATHS, bench_topology, cpu_seconds, machine_ticks, path
from pep.testing.netenv import SERVER_IP
from pep.testing.topology import Topology

NGINX_CONF = """\
daemon off;
worker_processes 1;
pid {tmp}/nginx.pid;
error_log stderr warn;
events {{ worker_connections 8192; }}
http {{
    access_log off;
    client_body_temp_path {tmp};
    proxy_temp_path {tmp};
    fastcgi_temp_path {tmp};
    uwsgi_temp_path {tmp};
    scgi_temp_path {tmp};
    server {{
        listen {ip}:80 backlog=4096;
        location / {{ return 200 "ok\\n"; }}
    }}
}}
"""
_UNITS = {"us": 1e-3, "ms": 1.0, "s": 1e3}


def parse_wrk(out: str) -> dict[str, float]:
    """Requests/s and latency percentiles (ms) from ``wrk --latency`` output."""
    rps = re.search(r"Requests/sec:\s+([\d.]+)", out)
    if rps is None:
        raise ValueError(f"no Requests/sec in wrk output:\n{out}")
    res = {"rps": float(rps.group(1))}
    for pct in ("50", "99"):
        m = re.search(rf"^\s+{pct}(?:\.0+)?%\s+([\d.]+)(us|ms|s)\s*$", out, re.M)
        if m:
            res[f"p{pct}_ms"] = float(m.group(1)) * _UNITS[m.group(2)]
    errors = re.search(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", out)
    res["socket_errors"] = sum(int(x) for x in errors.groups()) if errors else 0
    non2xx = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    res["non_2xx"] = int(non2xx.group(1)) if non2xx else 0
    return res


def wrk(topo: Topology, seconds: float, connections: int) -> dict[str, float]:
    r = topo.run(
        "client",
        [
            "wrk",
            "-t",
            "2",
            "-c",
            str(connections),
            "-d",
            f"{round(seconds)}s",
            "--latency",
            "-H",
            "Connection: close",
            f"http://{SERVER_IP}/",
        ],
        timeout=seconds + 60,
    )
    if r.returncode != 0:
        raise RuntimeError(f"wrk failed ({r.returncode}): {r.stdout[-500:]} {r.stderr[-500:]}")
    return parse_wrk(r.stdout)


def _costed(topo: Topology, seconds: float, connections: int, pid: int | None) -> dict[str, float]:
    """One wrk run, plus what each connection cost: the proxy's own CPU (user + system) and
    the whole machine's (wrk, nginx and softirq included), in microseconds."""
    cpu0, (busy0, total0) = cpu_seconds(pid) if pid else 0.0, machine_ticks()
    res = wrk(topo, seconds, connections)
    cpu1, (busy1, total1) = cpu_seconds(pid) if pid else 0.0, machine_ticks()
    conns = res["rps"] * seconds
    ncpu = os.cpu_count() or 1
    res["machine_busy_pct"] = round((busy1 - busy0) / (total1 - total0) * 100 * ncpu, 1)
    if conns:
        tick = os.sysconf("SC_CLK_TCK")
        res["machine_us_per_conn"] = round((busy1 - busy0) / tick / conns * 1e6, 1)
        res["proxy_us_per_conn"] = round((cpu1 - cpu0) / conns * 1e6, 1)
    return res


def measure(
    seconds: float,
    connections: int,
    rounds: int,
    paths: tuple[str, ...] = PATHS,
    pep_args: list[str] | None = None,
) -> dict[str, object]:
    runs: dict[str, list[dict[str, float]]] = {p: [] for p in paths}
    with bench_topology("s") as topo, tempfile.TemporaryDirectory(prefix="pep-nginx-") as tmp:
        conf = Path(tmp) / "nginx.conf"
        conf.write_text(NGINX_CONF.format(tmp=tmp, ip=SERVER_IP))
        nginx = topo.popen(
            "server",
            ["nginx", "-c", str(conf), "-p", tmp],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        try:
            time.sleep(0.5)
            for _ in range(rounds):
                for name in paths:
                    with path(topo, name, ["--log-level", "warning", *(pep_args or [])]) as pid:
                        runs[name].append(_costed(topo, seconds, connections, pid))
        finally:
            nginx.terminate()
            nginx.wait(10)
    med = {
        p: {k: round(statistics.median(r[k] for r in rs), 3) for k in rs[0]}
        for p, rs in runs.items()
    }
    result: dict[str, object] = {
        "seconds": seconds,
        "connections": connections,
        "rounds": rounds,
        "runs": runs,
        "median": med,
        "machine": machine(),
    }
    if "pep" in med and "haproxy" in med:
        result["pep_vs_haproxy_rps"] = round(med["pep"]["rps"] / med["haproxy"]["rps"], 3)
        if "p99_ms" in med["pep"] and "p99_ms" in med["haproxy"]:
            result["pep_vs_haproxy_p99"] = round(med["pep"]["p99_ms"] / med["haproxy"]["p99_ms"], 3)
    if "pep" in med and "kernel" in med:
        result["pep_vs_kernel_rps"] = round(med["pep"]["rps"] / med["kernel"]["rps"], 3)
    return result


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--seconds", type=float, default=10)
    ap.add_argument("--connections", type=int, default=50)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--paths", default=",".join(PATHS))
    ap.add_argument("--json", metavar="FILE")
    ap.add_argument("--pep-config", metavar="TOML", help="config file for the pep under test")
    args = ap.parse_args(argv)
    for tool in ("wrk", "nginx", "haproxy"):
        if shutil.which(tool) is None:
            print(f"bench: {tool} is not installed (deploy/setup.sh installs it)", file=sys.stderr)
            return 2
    pep_args = ["--config", args.pep_config] if args.pep_config else []
    res = measure(
        args.seconds, args.connections, args.rounds, tuple(args.paths.split(",")), pep_args
    )
    med = res["median"]
    assert isinstance(med, dict)
    for name, m in med.items():
        print(
            f"short {name}: {m['rps']:.0f} req/s, p50 {m.get('p50_ms', float('nan')):.2f} ms, "
            f"p99 {m.get('p99_ms', float('nan')):.2f} ms, errors {m['socket_errors']:.0f}; "
            f"CPU per connection: proxy {m.get('proxy_us_per_conn', 0):.0f} us, machine "
            f"{m.get('machine_us_per_conn', 0):.0f} us (machine {m['machine_busy_pct']:.0f}% busy)"
        )
    for key in ("pep_vs_haproxy_rps", "pep_vs_haproxy_p99", "pep_vs_kernel_rps"):
        if key in res:
            print(f"{key} {res[key]}")
    if args.json:
        Path(args.json).write_text(json.dumps(res, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
