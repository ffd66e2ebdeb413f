"""Build the star lab (pep.lab.star's plan), run its modem, change a plan while it runs.

Called by pep.lab.build.up for ``--topology star``; the namespaces are ``{prefix}-{node}`` as
in every lab, so ``pep lab down`` finds them from the prefix alone. The modem is htb (built
into this kernel; tbf alone cannot share one carrier between terminals): per direction, on
the link node's egress, a root class at the carrier's rate, a class per terminal at its plan
with a FIFO one BDP deep, u32 filters on the terminal's addresses (pyroute2).
"""

from __future__ import annotations

import ipaddress
import os
import signal
import sys
from collections.abc import Callable
from typing import Any

from pep.config.link import default_congestion
from pep.config.peer import keygen
from pep.lab.plan import (
    SERVER_PORT,
    LabSpec,
    pep_config_text,
)
from pep.lab.star import LINK, HtbClass, Plan, Star, default_plans
from pep.lab.state import Lab

__all__ = ["build", "change_plan", "plans_of", "queue_drops", "settings", "star_of"]

ETH_P_IP = 0x0800
ROOT, CARRIER = 0x10000, 0x10001  # htb handle 1:, its root class 1:1
# Which side of the link node each direction leaves by, and which address field (its byte
# offset in the IPv4 header) names the terminal: down to the terminals by destination, up to
# the hub by source.
MODEM = {"down": ("br0", 16), "up": ("hub0", 12)}


def settings(spec: LabSpec) -> dict[str, Any]:
    """What a star lab records of its spec (Lab.star): the plans (the profile's unless given)
    and whether the terminals run pep."""
    plans = spec.plans or default_plans(spec.profile, spec.terminals)
    Star(spec.profile, tuple(plans), spec.terminal_pep)  # checks the number of terminals
    return {"plans": [[p.down, p.up] for p in plans], "terminal_pep": spec.terminal_pep}


def star_of(lab: Lab) -> Star:
    """The star a lab was built as (from its state file)."""
    return Star(lab.profile, plans_of(lab), bool(lab.star.get("terminal_pep", True)))


def plans_of(lab: Lab) -> tuple[Plan, ...]:
    return tuple(Plan(int(d), int(u)) for d, u in lab.star["plans"])  # type: ignore[union-attr]


def build(lab: Lab, say: Callable[[str], None]) -> None:
    """Namespaces, links, the bridge, routes, sysctls, the modem, then the processes (delay
    line, object server, the peps) until each is ready."""
    from pyroute2 import NetNS

    from pep.lab.build import delayline_argv, node_sysctls
    from pep.testing.topology import Topology

    star = star_of(lab)
    topo = Topology(lab.prefix)
    say(
        f"building star lab {lab.prefix!r}: {len(star.plans)} terminals, "
        f"{lab.profile.describe()} carrier"
    )
    nodes = star.nodes()
    for node in nodes:
        lab.nodes[node] = {}
        topo.add_node(node, forwarding=node in ("hub", "link") or node.startswith("t"))
        lab.save()
    for a, b in star.links():
        topo.link(
            a.node, a.name, [a.addr] if a.addr else [], b.node, b.name, [b.addr] if b.addr else []
        )
        for end in (a, b):
            if end.addr:
                lab.nodes[end.node][end.name] = end.addr
    topo.bridge("link", star.names)
    with NetNS(lab.ns("link")) as ipr:
        ipr.addr("add", index=ipr.link_lookup(ifname="br0")[0], address=LINK["br0"], prefixlen=24)
    lab.nodes["link"]["br0"] = LINK["br0"]
    for node, texts in star.routes().items():
        for text in texts:
            dst, _, gw = text.partition(" via ")
            topo.route(node, dst, gw)
    peps = star.pep_nodes() if lab.pep else []
    for node in nodes:
        node_sysctls(lab, node, host=node == "server" or node[0] == "c", pep=node in peps)
    with NetNS(lab.ns("link")) as ipr:
        for direction in MODEM:
            modem(ipr, star, direction)
            lab.settings["link"] += modem_notes(star, direction)
    lab.save()
    waits = []
    if lab.profile.rtt_ms > 0:
        say(f"starting the delay line ({lab.profile.rtt_ms / 2:g} ms each way)")
        lab.launch("delayline", "link", delayline_argv(lab, up_if="br0", down_if="hub0"))
        waits.append(("delayline", "ready:"))
    say("starting the object server")
    argv = [sys.executable, "-m", "pep.lab.objects", "serve", "--port", str(SERVER_PORT)]
    lab.launch("server", "server", argv)
    waits.append(("server", "listening on"))
    key_file = lab.dir / "peer.key"
    if peps:
        fd = os.open(key_file, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(keygen() + "\n")
        terminals = lab.dir / "terminals.txt"
        terminals.write_text(star.terminals_file())
        lab.congestion = default_congestion()
    for node in peps:
        write_configs(lab, star, node, str(key_file))
        say(f"starting pep on {node}")
        lab.launch(node, node, lab.pep_argv(node))
        waits.append((node, "ready:"))
    for name, marker in waits:
        lab.wait_ready(name, marker)
    for node in peps:
        lab.wait_pool(node)
    lab.save()


def write_configs(lab: Lab, star: Star, node: str, key_file: str) -> None:
    """A pep node's two configs: with [peer] (the lab's default) and without (``direct``)."""
    from pep.lab.build import _validate_config

    interface = "sat0" if node == "hub" else "lan0"  # where its connections arrive
    link = star.link_table(node, str(lab.dir / "terminals.txt"))
    sock = str(lab.dir / f"{node}.sock")
    peer = star.peer_table(node, key_file) if lab.peer else None
    for path, table in ((lab.config(node), peer), (lab.config(node, direct=True), None)):
        path.write_text(pep_config_text(interface, link, sock, peer=table))
        _validate_config(path)
    notes = lab.settings[node]
    if link is not None:
        notes.append("[link] " + " ".join(f"{k} {v}" for k, v in link.items()))
    if peer is not None:
        notes.append("[peer] " + " ".join(f"{k} {v}" for k, v in peer.items() if k != "key_file"))


# --- the modem -------------------------------------------------------------------------------


def _u32_key(network: str, offset: int) -> str:
    net = ipaddress.ip_network(network)
    return f"0x{int(net.network_address):08x}/0x{int(net.netmask):08x}+{offset}"


def _bfifo() -> None:
    """pyroute2 0.9.7 knows pfifo but not bfifo, whose options are the same struct
    (tc_fifo_qopt: one u32 limit, include/uapi/linux/pkt_sched.h): register it as pfifo's.
    A FIFO limited in packets would not do: forwarded traffic reaches the qdisc as GSO packets
    of up to 64 KB, so 496 "packets" (one BDP of full-sized frames) held 40 times that."""
    from pyroute2.netlink.rtnl import tcmsg
    from pyroute2.netlink.rtnl.tcmsg import sched_pfifo

    tcmsg.plugins.setdefault("bfifo", sched_pfifo)


def modem(ipr: Any, star: Star, direction: str) -> None:
    """htb on the link node's egress for ``direction``: the carrier, a class per terminal."""
    _bfifo()
    ifname, offset = MODEM[direction]
    index = ipr.link_lookup(ifname=ifname)[0]
    carrier = star.carrier(direction)
    burst = max(4000, carrier * 2 // 1000)
    ipr.tc("add", "htb", index, ROOT, default=0)
    ipr.tc("add-class", "htb", index, CARRIER, parent=ROOT, rate=carrier, ceil=carrier,
           burst=burst, cburst=burst, quantum=1514)  # fmt: skip
    for c in star.classes(direction):
        _class(ipr, index, c, "add-class")
        ipr.tc("add", "bfifo", index, c.minor << 16, parent=0x10000 | c.minor, limit=c.limit)
        for network in c.networks:
            key = _u32_key(network, offset)
            ipr.tc("add-filter", "u32", index, parent=ROOT, prio=1, protocol=ETH_P_IP,
                   target=0x10000 | c.minor, keys=[key])  # fmt: skip


def _class(ipr: Any, index: int, c: HtbClass, action: str) -> None:
    ipr.tc(action, "htb", index, 0x10000 | c.minor, parent=CARRIER, rate=c.rate, ceil=c.ceil,
           burst=c.burst, cburst=c.burst, quantum=1514)  # fmt: skip


def modem_notes(star: Star, direction: str) -> list[str]:
    ifname, _ = MODEM[direction]
    out = [f"{ifname}: htb {direction}link carrier {star.carrier(direction) * 8} bit/s"]
    for name, c in zip(star.names, star.classes(direction), strict=True):
        out.append(
            f"  {name}: class 1:{c.minor:x} ceil {c.ceil * 8} bit/s (plan), rate {c.rate * 8} "
            f"bit/s (its part of the carrier), fifo {c.limit} bytes (one BDP), "
            f"{' '.join(c.networks)}"
        )
    return out


def queue_drops(lab: Lab, direction: str = "down") -> dict[str, int]:
    """Packets each terminal's queue at the modem has dropped so far (its FIFO overflowing)."""
    from pyroute2 import NetNS

    star = star_of(lab)
    by_minor = {c.minor: name for name, c in zip(star.names, star.classes(direction), strict=True)}
    ifname, _ = MODEM[direction]
    out = dict.fromkeys(star.names, 0)
    with NetNS(lab.ns("link")) as ipr:
        index = ipr.link_lookup(ifname=ifname)[0]
        for q in ipr.get_qdiscs(index=index):
            if q.get_attr("TCA_KIND") == "bfifo" and (name := by_minor.get(q["handle"] >> 16)):
                out[name] = (q.get_attr("TCA_STATS") or {}).get("drop", 0)
    return out


def change_plan(lab: Lab, terminal: int, plan: Plan) -> None:
    """Terminal ``terminal`` (1-based) gets ``plan``, as an operator changes a customer's plan:
    its classes at the modem now, then the hub's plans file and a SIGHUP to the hub's pep
    (when it runs)."""
    from pyroute2 import NetNS

    plans = list(plans_of(lab))
    plans[terminal - 1] = plan
    lab.star["plans"] = [[p.down, p.up] for p in plans]
    star = star_of(lab)
    with NetNS(lab.ns("link")) as ipr:
        for direction, (ifname, _) in MODEM.items():
            index = ipr.link_lookup(ifname=ifname)[0]
            for c in star.classes(direction):
                _class(ipr, index, c, "change-class")
    if lab.pep:
        (lab.dir / "terminals.txt").write_text(star.terminals_file())
        if lab.running("hub"):
            os.kill(int(lab.procs["hub"]["pid"]), signal.SIGHUP)  # type: ignore[call-overload]
    lab.save()
