"""The tests' namespaces: the gateway topology and its addresses, the other layouts, and
commands run inside a namespace (python-iptables snippets, iptables-legacy, the rules a node holds).

The gateway topology (addresses are private to namespaces the test creates; every link is
dual-stack):

    client ns            gateway ns (runs `pep run`)            server ns
    eth0 10.77.1.2 --- cli0 10.77.1.1 | srv0 10.77.2.1 --- eth0 10.77.2.2
         fd77:1::2          fd77:1::1 |      fd77:2::1          fd77:2::2

Tests get it as the ``topo`` fixture (tests/conftest.py), built by ``topology`` below; the
trio peers that talk through it are pep/testing/traffic.py, the daemon pep/testing/daemon.py,
crafted packets tests/helpers/packets.py.
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import socket
import subprocess
import sys
import textwrap
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass

from pep.testing.daemon import REPO
from pep.testing.topology import Topology, sysctl

CLIENT_IP, GW_CLIENT_IP = "10.77.1.2", "10.77.1.1"
SERVER_IP, GW_SERVER_IP = "10.77.2.2", "10.77.2.1"
INGRESS = "cli0"
PORT = 8080  # where the tests' servers listen, unless a test needs more than one


@dataclass(frozen=True)
class Addrs:
    """One family's addresses in the gateway topology."""

    family: int
    client: str
    gw_client: str
    gw_server: str
    server: str


ADDRS = {
    4: Addrs(4, CLIENT_IP, GW_CLIENT_IP, GW_SERVER_IP, SERVER_IP),
    6: Addrs(6, "fd77:1::2", "fd77:1::1", "fd77:2::1", "fd77:2::2"),
}


# --- topologies -------------------------------------------------------------------------------


def unique_prefix(tag: str) -> str:
    """Namespace prefix unique to this process and call, so parallel runs never collide."""
    return f"pep{tag}{os.getpid() % 100000}{secrets.token_hex(2)}"


Layout = Callable[[Topology], None]
Sysctls = Mapping[str, Mapping[str, int | str]]  # node -> {key: value}


@contextlib.contextmanager
def topology(tag: str, layout: Layout, sysctls: Sysctls | None = None) -> Iterator[Topology]:
    """Namespaces under a fresh ``unique_prefix(tag)``, built by ``layout`` and then given
    ``sysctls``; every one removed afterwards (processes in them killed), however it ends."""
    topo = Topology(unique_prefix(tag))
    try:
        layout(topo)
        for node, values in (sysctls or {}).items():
            for key, value in values.items():
                sysctl(topo.ns(node), key, value)
        yield topo
    finally:
        topo.destroy()


def gateway(topo: Topology) -> None:
    """client — gw — server, both families (the module docstring)."""
    topo.add_node("client")
    topo.add_node("gw", forwarding=True)
    topo.add_node("server")
    v4, v6 = ADDRS[4], ADDRS[6]
    topo.link(
        "client",
        "eth0",
        [f"{v4.client}/24", f"{v6.client}/64"],
        "gw",
        INGRESS,
        [f"{v4.gw_client}/24", f"{v6.gw_client}/64"],
    )
    topo.link(
        "gw",
        "srv0",
        [f"{v4.gw_server}/24", f"{v6.gw_server}/64"],
        "server",
        "eth0",
        [f"{v4.server}/24", f"{v6.server}/64"],
    )
    for node, via in (("client", "gw_client"), ("server", "gw_server")):
        topo.route(node, "default", getattr(v4, via))
        topo.route(node, "::/0", getattr(v6, via), family=socket.AF_INET6)


def series(topo: Topology) -> None:
    """client — gw1 — gw2 — server, IPv4: two gateways one after the other."""
    for node in ("client", "gw1", "gw2", "server"):
        topo.add_node(node, forwarding=node.startswith("gw"))
    topo.link("client", "eth0", "10.78.1.2/24", "gw1", "in0", "10.78.1.1/24")
    topo.link("gw1", "out0", "10.78.2.1/24", "gw2", "in0", "10.78.2.2/24")
    topo.link("gw2", "out0", "10.78.3.1/24", "server", "eth0", "10.78.3.2/24")
    topo.route("client", "default", "10.78.1.1")
    topo.route("gw1", "default", "10.78.2.2")
    topo.route("gw2", "10.78.1.0/24", "10.78.2.1")
    topo.route("server", "default", "10.78.3.1")


def single(topo: Topology) -> None:
    """One empty namespace, node ``ns`` (the netfilter tests' bare namespace)."""
    topo.add_node("ns")


def gateway_topology(tag: str = "t") -> contextlib.AbstractContextManager[Topology]:
    """The gateway topology outside pytest (bench/)."""
    return topology(tag, gateway)


# --- commands inside a namespace ------------------------------------------------------------


def run_in(ns: str, cmd: list[str], timeout: float = 60) -> subprocess.CompletedProcess[str]:
    """``cmd`` inside ``ns`` (``ip netns exec``), with this checkout's pep importable."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))
    return subprocess.run(
        ["ip", "netns", "exec", ns, *cmd],
        capture_output=True, text=True, timeout=timeout, check=False, env=env,
    )  # fmt: skip


def in_ns(ns: str, snippet: str, *, wrapper: list[str] | None = None) -> object:
    """Run a Python snippet inside namespace ``ns``; return the JSON of its ``result`` variable.

    python-iptables acts on the network namespace of the calling process, hence a subprocess. The
    snippet sees ``s`` (pep.kernel.iptables_setup), ``RuleSpec`` and ``RulesError``. The result is
    printed as the last line of stdout (python-iptables briefly borrows fd 1 to read extension
    output, so nothing else is parsed). Raises AssertionError with stderr when the snippet fails.
    """
    prelude = (
        "import json, sys\n"
        "from pep.kernel import iptables_setup as s\n"
        "from pep.kernel.iptables_setup import RuleSpec, RulesError\n"
        "result = None\n"
    )
    epilogue = "\nsys.stdout.flush()\nprint()\nprint(json.dumps(result))\n"
    code = prelude + textwrap.dedent(snippet) + epilogue
    proc = run_in(ns, [*(wrapper or []), sys.executable, "-c", code])
    if proc.returncode != 0:
        raise AssertionError(
            f"snippet failed ({proc.returncode}) in {ns}:\n{code}\n--- stderr:\n{proc.stderr}"
        )
    return json.loads(proc.stdout.strip().splitlines()[-1])


def ipt(ns: str, *args: str) -> list[str]:
    """``iptables-legacy ARGS`` inside ``ns``; output lines."""
    proc = run_in(ns, ["iptables-legacy", *args])
    if proc.returncode != 0:
        raise AssertionError(f"iptables-legacy {' '.join(args)} failed: {proc.stderr}")
    return proc.stdout.splitlines()


def rules_in(topo: Topology, node: str) -> str:
    """Every legacy-backend rule of both families (python-iptables writes the legacy backend)
    and every policy rule and route in a node: what pep may install."""
    cmds = [
        [tool, "-t", t, "-S"]
        for tool in ("iptables-legacy", "ip6tables-legacy")
        for t in ("mangle", "nat")
    ]
    cmds += [["ip", f"-{f}", "rule"] for f in (4, 6)]
    cmds += [["ip", f"-{f}", "route", "show", "table", "all"] for f in (4, 6)]
    return "".join(topo.run(node, cmd).stdout for cmd in cmds)
