"""The plan of a lab, before anything is built: its nodes, links, routes, addresses, and what
each node is set to (sysctls, the PEP nodes' pep configs). Pure: unit-tested without root.

Symmetric topology (``one-ended`` drops pepb: the link's server side is the server's LAN)::

    client      pepa (pep -i lan0)      link (delay line)      pepb (pep -i sat0)      server
    eth0 .1.2 - lan0 .1.1|sat0 .2.1 - cl0 .2.2|sv0 .3.2 - sat0 .3.1|lan0 .4.1 - eth0 .4.2
                                      tbf down   tbf up                           objects :80

Addresses are 10.78.N.x inside the lab's own namespaces. Every namespace is named
``{prefix}-{node}``, so a lab is found from its prefix alone (pep.lab.state).
"""

from __future__ import annotations

import dataclasses
import json
import re
from dataclasses import dataclass
from typing import Any

from pep.lab.profiles import LinkProfile

__all__ = [
    "CLIENT_IP",
    "HOST_TCP_RMEM",
    "HOST_TCP_WMEM",
    "PEP_NODES",
    "SERVER_IP",
    "SERVER_PORT",
    "TFO_SYSCTL",
    "TLS_CERT",
    "TLS_PORT",
    "Iface",
    "LabError",
    "LabSpec",
    "check_prefix",
    "link_table",
    "peer_table",
    "pep_config_text",
    "plan",
]

CLIENT_IP = "10.78.1.2"
SERVER_IP = "10.78.4.2"
SERVER_PORT = 80
TLS_PORT = 443  # the object server's HTTPS (pep.lab.build.make_certificate)
TLS_CERT = "tls-cert.pem"  # in the lab's directory
TOPOLOGIES = ("symmetric", "one-ended", "ha", "ecmp", "star")
# A prefix never contains '-': namespace names are "{prefix}-{node}" and cleanup matches
# "{prefix}-*", so "lab" must not match the namespaces of a lab called "lab-x".
_PREFIX = re.compile(r"^[A-Za-z][A-Za-z0-9_]{0,23}$")

# Settings on the PEP nodes (what a satellite PEP operator sets; README "Lab" explains each).
# The link itself (initial windows, buffers, congestion control, pacing) is pep's job: each
# PEP node's config gets a [link] table made from the profile (link_table).
# End hosts keep the kernel's initial sizes and get the maximum raised, or the no-PEP baseline
# would be limited by its buffers rather than by the link (DESIGN.md).
HOST_TCP_RMEM = "4096 131072 33554432"
HOST_TCP_WMEM = "4096 16384 33554432"
# Client and server TFO enabled (1|2), data in SYN without a cookie (4), server accepts data
# without a cookie (0x200): the PEP-PEP leg needs no cookie exchange round trip.
TFO_SYSCTL = 0x207


class LabError(RuntimeError):
    """What went wrong, phrased for the user of ``pep lab``."""


def check_prefix(prefix: str) -> None:
    """Refuse a prefix that could name another lab's namespaces (see ``_PREFIX``)."""
    if not _PREFIX.match(prefix):
        raise LabError(f"prefix {prefix!r}: 1-24 letters, digits or '_', starting with a letter")


@dataclass(frozen=True)
class LabSpec:
    profile: LinkProfile
    topology: str = "symmetric"
    pep: bool = True
    prefix: str = "peplab"
    # The symmetric topology's PEPs keep pre-connected legs ([peer]) unless told not to.
    peer: bool = True
    # --topology star (pep.lab.star): each terminal's plan (default: the profile's, for
    # ``terminals`` of them), and whether each terminal runs its own pep.
    terminals: int = 2
    plans: tuple[Any, ...] = ()
    terminal_pep: bool = True

    def __post_init__(self) -> None:
        check_prefix(self.prefix)
        if self.topology not in TOPOLOGIES:
            raise LabError(f"topology {self.topology!r}: choose {', '.join(TOPOLOGIES)}")


@dataclass(frozen=True)
class Iface:
    node: str
    name: str
    addr: str


def plan(topology: str) -> tuple[list[str], list[tuple[Iface, Iface]], dict[str, list[str]]]:
    """Nodes, veth links and routes (``"dst via gw"``) of a topology."""
    if topology == "symmetric":
        nodes = ["client", "pepa", "link", "pepb", "server"]
        links = [
            (Iface("client", "eth0", "10.78.1.2"), Iface("pepa", "lan0", "10.78.1.1")),
            (Iface("pepa", "sat0", "10.78.2.1"), Iface("link", "cl0", "10.78.2.2")),
            (Iface("link", "sv0", "10.78.3.2"), Iface("pepb", "sat0", "10.78.3.1")),
            (Iface("pepb", "lan0", "10.78.4.1"), Iface("server", "eth0", "10.78.4.2")),
        ]
        routes = {
            "client": ["default via 10.78.1.1"],
            "pepa": ["default via 10.78.2.2"],
            "link": ["10.78.1.0/24 via 10.78.2.1", "10.78.4.0/24 via 10.78.3.1"],
            "pepb": ["default via 10.78.3.2"],
            "server": ["default via 10.78.4.1"],
        }
    else:
        nodes = ["client", "pepa", "link", "server"]
        links = [
            (Iface("client", "eth0", "10.78.1.2"), Iface("pepa", "lan0", "10.78.1.1")),
            (Iface("pepa", "sat0", "10.78.2.1"), Iface("link", "cl0", "10.78.2.2")),
            (Iface("link", "sv0", "10.78.4.1"), Iface("server", "eth0", "10.78.4.2")),
        ]
        routes = {
            "client": ["default via 10.78.1.1"],
            "pepa": ["default via 10.78.2.2"],
            "link": ["10.78.1.0/24 via 10.78.2.1"],
            "server": ["default via 10.78.4.1"],
        }
    return nodes, links, routes


# pep nodes: node -> (interface connections arrive on, direction it sends into the link). Which
# leg faces the link pep derives itself (pepa: the upstream leg, pepb: the client leg).
PEP_NODES = {
    "pepa": ("lan0", "up"),
    "pepb": ("sat0", "down"),
    # the two-gateway labs (pep.lab.cluster): no satellite link, no direction
    "gwa": ("lan0", ""),
    "gwb": ("lan0", ""),
}


def link_table(profile: LinkProfile, sends: str) -> dict[str, str] | None:
    """The [link] table of a PEP node that sends ``sends`` ("up" or "down") into the link and
    receives the other direction; None when the profile has no delay or an unlimited rate
    (nothing for pep to size or share)."""
    receives = "up" if sends == "down" else "down"
    egress, ingress = profile.rate(sends), profile.rate(receives)
    if profile.rtt_ms < 1 or egress is None or ingress is None:
        return None
    return {
        "interface": "sat0",
        "rtt": f"{profile.rtt_ms:g}ms",
        "egress_rate": f"{egress}bit",
        "ingress_rate": f"{ingress}bit",
    }


# pepa keeps pooled connections to pepb's peer listener (on pepb's link-side address), which
# takes them from pepa's side of the link only.
PEER_PORT = 5001
PEER_TABLES = {
    "pepa": {"connect": f"10.78.3.1:{PEER_PORT}"},
    "pepb": {"listen": f"10.78.3.1:{PEER_PORT}", "allow": ["10.78.2.0/24"]},
}


def peer_table(topology: str, node: str, key_file: str) -> dict[str, object] | None:
    """A PEP node's [peer] table, or None where there is no PEP at the far end."""
    if topology != "symmetric":
        return None
    return {"key_file": key_file, **PEER_TABLES[node]}


def pep_config_text(
    interface: str,
    link: dict[str, str] | None,
    status_socket: str | None = None,
    peer: dict[str, object] | None = None,
) -> str:
    """The TOML for one PEP node's ``pep run --config``.

    Keys newer than the lab (Fast Open, drain, status socket, [link], [peer]) are written only
    when this pep's Config knows them: an older pep refuses unknown keys, so the lab works with
    both.
    """
    from pep.config import Config

    fields = {f.name for f in dataclasses.fields(Config)}
    lines = [f'interfaces = ["{interface}"]', 'log_level = "info"']
    optional = [
        ("tcp_fastopen", "true", "PEP-PEP leg: the client's request rides in the SYN"),
        ("fastopen_wait", "0.05", "seconds to wait for the client's first bytes"),
        # The demo switches pep off between fetches, when no connection is open: no need to
        # wait the default 30 s for stragglers.
        ("drain_timeout", "2.0", "seconds live connections get after SIGTERM"),
    ]
    if status_socket is not None:
        # One per PEP node, beside its log (pep's own default is per namespace too).
        optional.append(("status_socket", f'"{status_socket}"', "one per PEP node"))
    for key, value, why in optional:
        if key in fields:
            lines.append(f"{key} = {value}  # {why}")
    if link is not None and "link" in fields:
        lines += ["", "[link]  # the emulated satellite link, as the profile describes it"]
        lines += [f'{key} = "{value}"' for key, value in link.items()]
    if peer is not None and "peer" in fields:
        lines += ["", "[peer]  # pre-connected legs between the two PEPs"]
        lines += [f"{key} = {json.dumps(value)}" for key, value in peer.items()]
    return "\n".join(lines) + "\n"
