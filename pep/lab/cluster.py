"""The lab's two-gateway topologies: a VRRP standby pair (``ha``) and ECMP spreading (``ecmp``).

A hub-side PEP outgrows one box, and a terminal operator wants the service to survive a dead
box, not only a dead process. Networks do that with routing machinery; these labs show pep
behind it (docs/SCALING.md)::

    ha:    client ── swl (bridge) ──┬── gwa (pep, keepalived) ──┬── sww (bridge) ── server
                                    └── gwb (pep, keepalived) ──┘
           10.79.1.10      VIP 10.79.1.1 on lan0 | VIP 10.79.2.1 on wan0        10.79.2.10

    ecmp:  client ── rtr ──(multipath, L4 hash)──┬── gwa (pep) ──┬── sww (bridge) ── server
                                                 └── gwb (pep) ──┘
           10.80.1.10                                                              10.80.4.10

``ha``: both gateways run pep all the time (hot standby) and keepalived, which holds the
clients' gateway address and the servers' return address as one VRRP sync group (VRRPv3,
adverts every 100 ms). keepalived tracks pep (``pep status``: exit 3 means no daemon), both
interfaces, and its own peer: a dead pep, a dead box or a down link moves both addresses.
``nopreempt``: a master that comes back stays backup, so the connections the new master
split are not cut a second time.

``ecmp``: a router spreads flows over both gateways by a hash of the 5-tuple
(``fib_multipath_hash_policy = 1``); each pep runs in REDIRECT mode, so its upstream leg
leaves from its own address and the replies come back to the box that holds the flow.
"""

from __future__ import annotations

import os
import shutil
import signal
import sys
import textwrap
import time
from collections.abc import Callable

from pep.lab.plan import LabError, pep_config_text
from pep.lab.state import Lab

__all__ = [
    "CLUSTERS",
    "build",
    "keepalived_conf",
    "master",
    "refuse_split",
    "sigkill",
    "wait_master",
]

CLUSTERS = ("ha", "ecmp")
GATEWAYS = ("gwa", "gwb")
# VRRP (keepalived.conf): virtual router ids, priorities (gwa starts as master), the advert
# interval. VRRPv3 allows centiseconds; 100 ms adverts make a dead master's backup take over
# after 3 missed adverts plus skew, about 0.35 s (RFC 5798 section 6.1: Master_Down_Interval).
VRID = {"lan0": 51, "wan0": 52}
PRIORITY = {"gwa": 150, "gwb": 100}
ADVERT = 0.1
# ha: the client, the server, each side's VRRP address (by the gateways' interface on that
# side) and each gateway's own addresses there.
HA_CLIENT, HA_SERVER = "10.79.1.10", "10.79.2.10"
VIPS = {"lan0": "10.79.1.1", "wan0": "10.79.2.1"}
HA_GW = {
    "gwa": {"lan0": "10.79.1.2", "wan0": "10.79.2.2"},
    "gwb": {"lan0": "10.79.1.3", "wan0": "10.79.2.3"},
}
# ecmp: the router's interfaces (to the client, to gwa, to gwb), each gateway's (to the
# router, to the servers' segment).
ECMP_CLIENT, ECMP_SERVER = "10.80.1.10", "10.80.4.10"
RTR = {"c0": "10.80.1.1", "a0": "10.80.2.1", "b0": "10.80.3.1"}
ECMP_GW = {
    "gwa": {"up0": "10.80.2.2", "s0": "10.80.4.2"},
    "gwb": {"up0": "10.80.3.2", "s0": "10.80.4.3"},
}
RTR_PORT = {"gwa": "a0", "gwb": "b0"}  # the router's interface to each gateway


def server_ip(topology: str) -> str:
    return HA_SERVER if topology == "ha" else ECMP_SERVER


def keepalived_conf(node: str, status_socket: str, python: str = sys.executable) -> str:
    """One gateway's keepalived.conf: two instances (the clients' side, the servers' side) in
    one sync group, both tracking pep and both interfaces.

    pep is tracked by `pep status` (exit 3 when no daemon answers: dead or hung), once a
    second, the shortest interval keepalived allows (whole seconds), one failure enough: a
    dead pep's socket refuses at once, so the address moves within about a second. keepalived's
    ``vrrp_track_process`` would hear a death at once, but it needs the kernel's process
    connector, which answers only in the initial network namespace (checked: "Failed to
    set/clear process event listen - errno 111" inside the lab's namespaces)."""
    track = f"{python} -m pep.ops.cli status --socket {status_socket}"
    instances = []
    for ifname, vip in VIPS.items():
        instances.append(
            textwrap.dedent(
                f"""\
                vrrp_instance {ifname.upper()} {{
                    state BACKUP
                    nopreempt
                    interface {ifname}
                    virtual_router_id {VRID[ifname]}
                    priority {PRIORITY[node]}
                    advert_int {ADVERT}
                    virtual_ipaddress {{
                        {vip}/24 dev {ifname}
                    }}
                    track_interface {{
                        lan0
                        wan0
                    }}
                    track_script {{
                        pep_alive
                    }}
                }}
                """
            )
        )
    head = textwrap.dedent(
        f"""\
        # keepalived.conf of {node}, written by `pep lab up --topology ha`
        global_defs {{
            router_id {node}
            # real-time scheduling: adverts every 100 ms even on a busy box
            max_auto_priority
            script_user root
            enable_script_security
            vrrp_version 3
        }}
        # `pep status` exits 3 when no daemon answers (pep dead or hung): the address moves.
        vrrp_script pep_alive {{
            script "{track}"
            interval 1
            timeout 2
            fall 1
            rise 1
        }}
        vrrp_sync_group GATEWAY {{
            group {{
                LAN0
                WAN0
            }}
        }}
        """
    )
    return head + "".join(instances)


def vips_held(ns: str) -> list[str]:
    """The VRRP addresses this gateway's namespace holds now (keepalived adds them)."""
    from pyroute2 import NetNS

    vips = set(VIPS.values())
    try:
        with NetNS(ns) as ipr:
            return sorted(
                a.get_attr("IFA_ADDRESS")
                for a in ipr.get_addr(family=2)
                if a.get_attr("IFA_ADDRESS") in vips
            )
    except OSError:
        return []


def log_size(lab: Lab, gw: str) -> int:
    """Where gw's keepalived log ends now: ``wait_state`` then looks only at what follows."""
    log = lab.dir / f"keepalived-{gw}.log"
    return log.stat().st_size if log.exists() else 0


def wait_state(lab: Lab, gw: str, since: int, state: str = "BACKUP", timeout: float = 15) -> None:
    """Wait until gw's keepalived logs that its instances entered ``state`` after ``since``."""
    log = lab.dir / f"keepalived-{gw}.log"
    deadline = time.monotonic() + timeout
    while True:
        with open(log, "rb") as f:
            f.seek(since)
            if f"(LAN0) Entering {state} STATE".encode() in f.read():
                return
        if time.monotonic() > deadline:
            tail = log.read_text(errors="replace").splitlines()[-8:]
            raise LabError(
                f"keepalived on {gw}: not in {state} state after {timeout:g} s ({log}):"
                + "".join("\n  " + line for line in tail)
            )
        time.sleep(0.05)


def sigkill(lab: Lab, name: str, group: bool = False) -> None:
    """Kill a lab process outright, as a crash would (``group``: with the children it forked,
    e.g. keepalived's VRRP child; every lab process leads its own session)."""
    pid = int(lab.procs[name]["pid"])  # type: ignore[call-overload]
    (os.killpg if group else os.kill)(pid, signal.SIGKILL)


def master(lab: Lab) -> str | None:
    """The gateway that holds both VRRP addresses, if exactly one does."""
    held = [gw for gw in GATEWAYS if len(vips_held(lab.ns(gw))) == 2]
    return held[0] if len(held) == 1 else None


def wait_master(lab: Lab, want: str | None = None, timeout: float = 15) -> str:
    deadline = time.monotonic() + timeout
    while (now := master(lab)) is None or (want is not None and now != want):
        if time.monotonic() > deadline:
            said = [
                f"keepalived on {gw}: {line}"
                for gw in GATEWAYS
                if (log := lab.dir / f"keepalived-{gw}.log").exists()
                for line in log.read_text(errors="replace").splitlines()[-5:]
            ]
            raise LabError(
                f"no gateway holds both VRRP addresses after {timeout:g} s "
                f"(master now: {now})" + "".join("\n  " + line for line in said)
            )
        time.sleep(0.05)
    return now


def refuse_split(lab: Lab) -> None:
    """A two-gateway lab's peps stay up (``pep lab split``, a test's PEP mode): LabError."""
    if lab.topology in CLUSTERS:
        raise LabError(
            f"lab {lab.prefix!r} is a two-gateway lab ({lab.topology}): its peps stay up "
            f"(with both stopped, keepalived would hold no gateway address). Fail one "
            f"instead: kill -9 its pep, `ip -n {lab.prefix}-gwa link set lan0 down`, or "
            f"`pep lab bench --topology {lab.topology}`"
        )


def build(lab: Lab, say: Callable[[str], None]) -> None:
    """Build an ``ha`` or ``ecmp`` lab (namespaces, bridges, routes), start its processes and
    wait until they are ready (``ha``: until gwa holds the addresses)."""
    from pep.testing.topology import Topology, sysctl

    topo = Topology(lab.prefix)
    say(f"building {lab.topology} lab {lab.prefix!r}: two PEP gateways")
    if lab.topology == "ha" and shutil.which("keepalived") is None:
        raise LabError("`keepalived` is not installed (Debian package keepalived)")
    nodes = ["client", "gwa", "gwb", "sww", "server"]
    nodes += ["swl"] if lab.topology == "ha" else ["rtr"]
    for node in nodes:
        lab.nodes[node] = {}
        topo.add_node(node, forwarding=node in ("gwa", "gwb", "rtr"))
        lab.save()

    def wire(a: str, a_if: str, a_addr: str | None, b: str, b_if: str, b_addr: str | None) -> None:
        topo.link(a, a_if, [a_addr] if a_addr else [], b, b_if, [b_addr] if b_addr else [])
        for node, ifname, addr in ((a, a_if, a_addr), (b, b_if, b_addr)):
            if addr:
                lab.nodes[node][ifname] = addr

    if lab.topology == "ha":
        wire("client", "eth0", f"{HA_CLIENT}/24", "swl", "p-client", None)
        for gw, addrs in HA_GW.items():
            for ifname, sw in (("lan0", "swl"), ("wan0", "sww")):
                wire(gw, ifname, f"{addrs[ifname]}/24", sw, f"p-{gw}", None)
        wire("server", "eth0", f"{HA_SERVER}/24", "sww", "p-server", None)
        topo.bridge("swl", ["p-client", "p-gwa", "p-gwb"])
        topo.bridge("sww", ["p-gwa", "p-gwb", "p-server"])
        topo.route("client", "default", VIPS["lan0"])
        topo.route("server", "10.79.1.0/24", VIPS["wan0"])
        ingress = "lan0"
    else:
        wire("client", "eth0", f"{ECMP_CLIENT}/24", "rtr", "c0", f"{RTR['c0']}/24")
        for gw, addrs in ECMP_GW.items():
            port = RTR_PORT[gw]
            wire("rtr", port, f"{RTR[port]}/24", gw, "up0", f"{addrs['up0']}/24")
            wire(gw, "s0", f"{addrs['s0']}/24", "sww", f"p-{gw}", None)
            topo.route(gw, "10.80.1.0/24", RTR[port])
        wire("server", "eth0", f"{ECMP_SERVER}/24", "sww", "p-server", None)
        topo.bridge("sww", ["p-gwa", "p-gwb", "p-server"])
        topo.route("client", "default", RTR["c0"])
        hops = [(RTR_PORT[gw], addrs["up0"]) for gw, addrs in ECMP_GW.items()]
        topo.multipath_route("rtr", "0.0.0.0/0", hops)
        sysctl(lab.ns("rtr"), "net.ipv4.fib_multipath_hash_policy", 1)  # L4: per flow
        lab.settings.setdefault("rtr", []).append(
            "default: "
            + ", ".join(f"nexthop via {via} dev {dev}" for dev, via in hops)
            + "; fib_multipath_hash_policy 1 (5-tuple)"
        )
        # Unsplit flows (a pep that is down fails open) return through either gateway.
        back = [("eth0", addrs["s0"]) for addrs in ECMP_GW.values()]
        topo.multipath_route("server", "10.80.1.0/24", back)
        ingress = "up0"
    for node in nodes:
        sysctl(lab.ns(node), "net.ipv4.tcp_no_metrics_save", 1)
        lab.settings.setdefault(node, [])
    lab.save()
    say("starting the object server")
    argv = [sys.executable, "-m", "pep.lab.objects", "serve", "--port", "80"]
    lab.launch("server", "server", argv)
    for gw in GATEWAYS:
        sock = str(lab.dir / f"{gw}.sock")
        lab.config(gw).write_text(pep_config_text(ingress, None, sock))
        say(f"starting pep on {gw} (splitting {ingress})")
        lab.launch(gw, gw, lab.pep_argv(gw))
    lab.wait_ready("server", "listening on")
    for gw in GATEWAYS:
        lab.wait_ready(gw, "ready:")
    if lab.topology == "ha":
        # keepalived after pep is ready, gwa first: gwa (the higher priority) is master.
        for gw in GATEWAYS:
            conf = lab.dir / f"keepalived-{gw}.conf"
            conf.write_text(keepalived_conf(gw, str(lab.dir / f"{gw}.sock")))
            say(f"starting keepalived on {gw}")
            lab.launch(f"keepalived-{gw}", gw, keepalived_argv(lab, gw))
            lab.settings[gw].append(f"keepalived: {conf} (VRRPv3, {ADVERT * 1000:g} ms adverts)")
            if gw == "gwa":
                wait_master(lab, "gwa")
            else:  # the backup ready to take over before anything relies on it
                wait_state(lab, gw, 0)
    lab.save()


def keepalived_argv(lab: Lab, gw: str) -> list[str]:
    run = lab.dir / f"keepalived-{gw}"
    return [
        *("keepalived", "--dont-fork", "--log-console", "--vrrp", "--use-file"),
        str(lab.dir / f"keepalived-{gw}.conf"),
        *("--pid", f"{run}.pid", "--vrrp_pid", f"{run}-vrrp.pid"),
    ]
