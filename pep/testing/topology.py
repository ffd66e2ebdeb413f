"""Network-namespace topologies for the tests and the lab, built with pyroute2.

Every namespace name starts with the topology's prefix, so a run can find and remove exactly
what it (or a crashed earlier run with the same prefix) made, and parallel runs with different
prefixes never collide. Removing a namespace does not stop the processes inside it, so
``destroy`` kills them first: a leftover ``pep run`` would keep its rules and queue alive.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field

from pyroute2 import NetNS, netns

__all__ = ["Topology", "in_netns", "ns_socket", "sysctl"]


@contextlib.contextmanager
def in_netns(ns: str) -> Iterator[None]:
    """Run the body with this thread in namespace ``ns``.

    Sockets keep the namespace they were created in, so a test can open client and server
    sockets in different namespaces from one trio loop. Never ``await`` inside the body.
    """
    netns.pushns(ns)
    try:
        yield
    finally:
        netns.popns()


def ns_socket(
    ns: str, family: int = socket.AF_INET, kind: int = socket.SOCK_STREAM
) -> socket.socket:
    with in_netns(ns):
        return socket.socket(family, kind)


def sysctl(ns: str, key: str, value: str | int) -> None:
    """Set a per-namespace sysctl (``net.*`` under /proc/sys follows the caller's netns)."""
    path = "/proc/sys/" + key.replace(".", "/")
    with in_netns(ns), open(path, "w") as f:
        f.write(f"{value}\n")


@dataclass
class Topology:
    """A set of namespaces named ``{prefix}-{node}`` and veth links between them."""

    prefix: str
    nodes: list[str] = field(default_factory=list)

    def ns(self, node: str) -> str:
        return f"{self.prefix}-{node}"

    def add_node(self, node: str, *, forwarding: bool = False) -> str:
        name = self.ns(node)
        netns.create(name)
        self.nodes.append(node)
        with NetNS(name) as ipr:
            ipr.link("set", index=ipr.link_lookup(ifname="lo")[0], state="up")
        # No duplicate address detection: test links are point to point, and DAD would leave
        # a new IPv6 address "tentative" (unusable) for a second or more.
        for conf in ("all", "default"):
            sysctl(name, f"net.ipv6.conf.{conf}.accept_dad", 0)
        if forwarding:
            sysctl(name, "net.ipv4.ip_forward", 1)
            sysctl(name, "net.ipv6.conf.all.forwarding", 1)
        return name

    def link(
        self,
        a: str,
        a_if: str,
        a_addr: str | Sequence[str],
        b: str,
        b_if: str,
        b_addr: str | Sequence[str],
        prefixlen: int = 24,
    ) -> None:
        """A veth pair ``a_if`` (in node a) <-> ``b_if`` (in node b), addressed and up.

        Addresses are one string or several, each ``addr`` (with ``prefixlen``) or ``addr/len``.
        """
        with NetNS(self.ns(a)) as ipr:
            ipr.link(
                "add", ifname=a_if, kind="veth", peer={"ifname": b_if, "net_ns_fd": self.ns(b)}
            )
        for node, ifname, addrs in ((a, a_if, a_addr), (b, b_if, b_addr)):
            with NetNS(self.ns(node)) as ipr:
                idx = ipr.link_lookup(ifname=ifname)[0]
                for addr in [addrs] if isinstance(addrs, str) else addrs:
                    host, _, plen = addr.partition("/")
                    ipr.addr("add", index=idx, address=host, prefixlen=int(plen or prefixlen))
                ipr.link("set", index=idx, state="up")

    def route(self, node: str, dst: str, gateway: str, **attrs: object) -> None:
        with NetNS(self.ns(node)) as ipr:
            ipr.route("add", dst=dst, gateway=gateway, **attrs)

    def bridge(self, node: str, ports: Sequence[str]) -> None:
        """A switch: bridge ``br0`` in ``node`` with ``ports`` (veths already linked) in it."""
        with NetNS(self.ns(node)) as ipr:
            ipr.link("add", ifname="br0", kind="bridge")
            br = ipr.link_lookup(ifname="br0")[0]
            for port in ports:
                ipr.link("set", index=ipr.link_lookup(ifname=port)[0], master=br, state="up")
            ipr.link("set", index=br, state="up")

    def multipath_route(self, node: str, dst: str, hops: Sequence[tuple[str, str]]) -> None:
        """One route over several next hops, ``(interface, gateway)`` each, equal weights."""
        with NetNS(self.ns(node)) as ipr:
            nexthops = [
                {"gateway": gw, "oif": ipr.link_lookup(ifname=dev)[0], "hops": 0}
                for dev, gw in hops
            ]
            ipr.route("add", dst=dst, multipath=nexthops)

    def popen(self, node: str, argv: Sequence[str], **kwargs: object) -> subprocess.Popen[bytes]:
        """Start a process inside a node (``ip netns exec`` also gives it the node's /sys)."""
        return subprocess.Popen(["ip", "netns", "exec", self.ns(node), *argv], **kwargs)  # type: ignore[call-overload]

    def run(
        self, node: str, argv: Sequence[str], **kwargs: object
    ) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            ["ip", "netns", "exec", self.ns(node), *argv],
            capture_output=True,
            text=True,
            check=False,
            **kwargs,  # type: ignore[call-overload]
        )

    def destroy(self) -> list[str]:
        """Kill every process in our namespaces, then remove them; returns the names removed."""
        return destroy_prefix(self.prefix)


def destroy_prefix(prefix: str) -> list[str]:
    """Remove every namespace named ``{prefix}-*``, killing its processes first.

    Works from the names alone, so it also cleans up after a crashed run.
    """
    mine = [n for n in netns.listnetns() if n.startswith(prefix + "-")]
    if not mine:
        return []
    me = os.getpid()
    pids = {n: [p for p in plist if p != me] for n, plist in netns.ns_pids().items() if n in mine}
    for plist in pids.values():
        for pid in plist:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
    deadline = time.monotonic() + 5
    for plist in pids.values():
        for pid in plist:
            while _alive(pid) and time.monotonic() < deadline:
                time.sleep(0.01)
    for n in mine:
        with contextlib.suppress(OSError):
            netns.remove(n)
    return mine


def _alive(pid: int) -> bool:
    """True until the process is gone or a zombie (a zombie holds no sockets or namespace)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return False
