"""The three paths through the gateway that every benchmark compares, in one topology.

- ``kernel``: the gateway only forwards (the limit: no proxy can beat it);
- ``haproxy``: Debian's HAProxy as a transparent split proxy (nat REDIRECT to it,
  ``server 0.0.0.0:0`` so it connects to each connection's original destination, splice on) —
  the "hand-rolled HAProxy setup" pep is measured against;
- ``pep``: ``pep run`` on the ingress interface.

Each is a context manager, so a benchmark enters one path, measures, and leaves the gateway
as it found it before the next.
"""

from __future__ import annotations

import contextlib
import os
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

from pep.testing.daemon import PepProcess
from pep.testing.netenv import INGRESS, gateway_topology
from pep.testing.topology import Topology, sysctl

PATHS = ("kernel", "haproxy", "pep")
HAPROXY_PORT = 9000

# maxconn: HAProxy wants 2 fds per connection plus slack within the 20,000-fd hard limit.
HAPROXY_CFG = """\
global
    maxconn 7000
defaults
    mode tcp
    timeout connect 5s
    timeout client 120s
    timeout server 120s
    option splice-auto
listen split
    bind 0.0.0.0:{port}
    server original 0.0.0.0:0
"""


# Every benchmark opens tens of thousands of connections from one client to one server
# address; the nodes that open them (the client, and the proxies in the gateway) would run out
# of ephemeral ports to TIME_WAIT within a run (28,232 by default, each held 60 s), and
# connect() then scans ever longer for a free one: measured, a kernel-forwarding run fell from
# 11,800 to 550 connections/s after three earlier runs. Load generators and proxies are set
# up this way in practice (deploy/pep-sysctl.conf recommends the same for a gateway).
CONNECTING_NODES = ("client", "gw")
BENCH_SYSCTLS = {"net.ipv4.tcp_tw_reuse": 1, "net.ipv4.ip_local_port_range": "1024 65535"}


# A server for thousands of connections in the server namespace (a script for `python -c`):
# accepts every connection, registers it for ``event`` (EVENT_READ or EVENT_WRITE) and runs
# ``action`` (statements on ``conn``, indented 12 spaces) when it is ready; an empty read or an
# error closes it (``close(conn)``).
SELECT_SERVER = """
import socket, selectors, resource
resource.setrlimit(resource.RLIMIT_NOFILE, (20000, 20000))
ls = socket.socket(); ls.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
ls.bind(("{ip}", {port})); ls.listen(4096); ls.setblocking(False)
sel = selectors.DefaultSelector(); sel.register(ls, selectors.EVENT_READ)
chunk = bytes(65536)
def close(conn):
    sel.unregister(conn); conn.close()
while True:
    for key, _ in sel.select():
        if key.fileobj is ls:
            try:
                c, _ = ls.accept()
            except OSError:
                continue
            c.setblocking(False); sel.register(c, selectors.{event})
        else:
            conn = key.fileobj
{action}
"""


@contextlib.contextmanager
def bench_topology(tag: str) -> Iterator[Topology]:
    """The test topology (pep/testing/netenv.py) with the connecting nodes set up for load."""
    with gateway_topology(tag) as topo:
        for node in CONNECTING_NODES:
            for key, value in BENCH_SYSCTLS.items():
                sysctl(topo.ns(node), key, value)
        yield topo


@contextlib.contextmanager
def path(topo: Topology, name: str, pep_args: list[str] | None = None) -> Iterator[int | None]:
    """Set up one path in the gateway node; yields the pid of the proxy (None for kernel)."""
    if name == "kernel":
        yield None
    elif name == "haproxy":
        with _haproxy(topo) as pid:
            yield pid
    elif name == "pep":
        pep = PepProcess(topo, "gw", ["--interface", INGRESS, *(pep_args or [])])
        try:
            pep.start()
            assert pep.proc is not None
            yield pep.proc.pid
        finally:
            pep.stop()
    else:
        raise ValueError(f"unknown path {name!r} (one of {', '.join(PATHS)})")


@contextlib.contextmanager
def _haproxy(topo: Topology) -> Iterator[int]:
    rule = [
        "PREROUTING",
        "-i",
        INGRESS,
        "-p",
        "tcp",
        "-j",
        "REDIRECT",
        "--to-ports",
        str(HAPROXY_PORT),
    ]
    with tempfile.TemporaryDirectory(prefix="pep-bench-haproxy-") as tmp:
        cfg = Path(tmp) / "haproxy.cfg"
        cfg.write_text(HAPROXY_CFG.format(port=HAPROXY_PORT))
        proc = topo.popen(
            "gw",
            ["haproxy", "-db", "-f", str(cfg)],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
        )
        try:
            _wait_listening(topo, HAPROXY_PORT, proc)
            r = topo.run("gw", ["iptables-legacy", "-t", "nat", "-A", *rule])
            if r.returncode != 0:
                raise RuntimeError(f"REDIRECT to haproxy: {r.stderr}")
            yield proc.pid
        finally:
            topo.run("gw", ["iptables-legacy", "-t", "nat", "-D", *rule])
            proc.terminate()
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


def _wait_listening(topo: Topology, port: int, proc: subprocess.Popen[bytes]) -> None:
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            err = proc.stderr.read().decode(errors="replace") if proc.stderr else ""
            raise RuntimeError(f"haproxy exited with {proc.returncode}: {err}")
        if f":{port} " in topo.run("gw", ["ss", "-Htln"]).stdout:
            return
        time.sleep(0.05)
    raise RuntimeError(f"haproxy not listening on {port} after 10 s")


def rss_kib(pid: int) -> int:
    """Resident memory of a process and its children (HAProxy/pep workers), KiB."""
    total = 0
    for p in [pid, *_children(pid)]:
        with contextlib.suppress(OSError), open(f"/proc/{p}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    total += int(line.split()[1])
    return total


def cpu_seconds(pid: int) -> float:
    """User + system CPU of a process and its children (HAProxy threads, pep workers), s.

    Softirq work done in the process's syscalls (veth delivers inline) is not charged to it:
    the kernel counts that as softirq time, which ``machine_busy`` includes."""
    ticks = 0
    for p in [pid, *_children(pid)]:
        with contextlib.suppress(OSError):
            fields = Path(f"/proc/{p}/stat").read_text().rsplit(")", 1)[1].split()
            ticks += int(fields[11]) + int(fields[12])  # utime, stime (proc(5))
    return ticks / os.sysconf("SC_CLK_TCK")


def machine_ticks() -> tuple[int, int]:
    """(busy, total) jiffies of all CPUs so far, from /proc/stat (iowait counts as idle)."""
    v = [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:9]]
    return sum(v) - v[3] - v[4], sum(v)


def fd_count(pid: int) -> int:
    total = 0
    for p in [pid, *_children(pid)]:
        with contextlib.suppress(OSError):
            total += len(list(Path(f"/proc/{p}/fd").iterdir()))
    return total


def _children(pid: int) -> list[int]:
    try:
        kids = Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
    except OSError:
        return []
    out = [int(k) for k in kids]
    for k in list(out):
        out += _children(k)
    return out
