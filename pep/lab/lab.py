"""Build, record, inspect and remove a lab: namespaces, links, tc, sysctls and its processes.

Symmetric topology (``one-ended`` drops pepb: the link's server side is the server's LAN)::

    client      pepa (pep -i lan0)      link (delay line)      pepb (pep -i sat0)      server
    eth0 .1.2 - lan0 .1.1|sat0 .2.1 - cl0 .2.2|sv0 .3.2 - sat0 .3.1|lan0 .4.1 - eth0 .4.2
                                      tbf down   tbf up                           objects :80

Addresses are 10.78.N.x inside the lab's own namespaces. Every namespace is named
``{prefix}-{node}``, so ``down`` finds everything from the prefix alone, also after a crash;
the processes run in their own sessions and log to ``/run/pep-lab/{prefix}/``, so they outlive
the ``pep lab up`` command that started them. The state file there records the profile, the
settings and the process ids for ``status``; nothing depends on it for cleanup.
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime as dt
import json
import logging
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from pep.lab.profiles import LinkProfile
from pep.link import default_congestion

__all__ = [
    "CLIENT_IP",
    "SERVER_IP",
    "Lab",
    "LabError",
    "LabSpec",
    "check_environment",
    "down",
    "exists",
    "status_text",
    "up",
]

log = logging.getLogger("pep.lab")

STATE_ROOT = Path(os.environ.get("PEP_LAB_STATE", "/run/pep-lab"))
CLIENT_IP = "10.78.1.2"
SERVER_IP = "10.78.4.2"
SERVER_PORT = 80
TOPOLOGIES = ("symmetric", "one-ended")
# A prefix never contains '-': namespace names are "{prefix}-{node}" and cleanup matches
# "{prefix}-*", so "lab" must not match the namespaces of a lab called "lab-x".
_PREFIX = re.compile(r"^[A-Za-z][A-Za-z0-9_]{0,23}$")
_PACKAGE_ROOT = str(Path(__file__).resolve().parents[2])

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


@dataclass(frozen=True)
class LabSpec:
    profile: LinkProfile
    topology: str = "symmetric"
    pep: bool = True
    prefix: str = "peplab"

    def __post_init__(self) -> None:
        if not _PREFIX.match(self.prefix):
            raise LabError(
                f"prefix {self.prefix!r}: 1-24 letters, digits or '_', starting with a letter"
            )
        if self.topology not in TOPOLOGIES:
            raise LabError(f"topology {self.topology!r}: choose {' or '.join(TOPOLOGIES)}")


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
PEP_NODES = {"pepa": ("lan0", "up"), "pepb": ("sat0", "down")}


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


def pep_config_text(
    interface: str, link: dict[str, str] | None, status_socket: str | None = None
) -> str:
    """The TOML for one PEP node's ``pep run --config``.

    Keys newer than the lab (Fast Open, drain, status socket, [link]) are written only when
    this pep's Config knows them: an older pep refuses unknown keys, so the lab works with both.
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
    return "\n".join(lines) + "\n"


def check_environment() -> None:
    if os.geteuid() != 0:
        raise LabError("needs root (network namespaces, iptables, NFQUEUE): run it with sudo")
    for tool, package in (("ip", "iproute2"), ("iptables-legacy", "iptables")):
        if shutil.which(tool) is None:
            raise LabError(f"`{tool}` is not installed (Debian package {package})")


def _lab_namespaces(prefix: str) -> list[str]:
    from pyroute2 import netns

    return sorted(n for n in netns.listnetns() if n.startswith(prefix + "-"))


def exists(prefix: str) -> bool:
    return bool(_lab_namespaces(prefix))


def _ns_inode(ns: str) -> int | None:
    try:
        return os.stat(f"/run/netns/{ns}").st_ino
    except OSError:
        return None


def pid_running(pid: int, ns: str | None = None) -> bool:
    """Alive, not a zombie, and (when ``ns`` is given) inside that namespace: a recorded pid
    that was reused by an unrelated process does not count."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            if f.read().rsplit(")", 1)[1].split()[0] == "Z":
                return False
        if ns is not None:
            return os.stat(f"/proc/{pid}/ns/net").st_ino == _ns_inode(ns)
    except (OSError, IndexError):
        return False
    return True


@dataclass
class Lab:
    """A lab that exists (or is being built); its state file mirrors this object."""

    prefix: str
    topology: str
    profile: LinkProfile
    pep: bool
    created: str = ""
    congestion: str | None = None
    nodes: dict[str, dict[str, str]] = field(default_factory=dict)  # node -> {iface: addr}
    settings: dict[str, list[str]] = field(default_factory=dict)  # node -> what was set
    procs: dict[str, dict[str, object]] = field(default_factory=dict)
    _children: dict[str, subprocess.Popen[bytes]] = field(default_factory=dict, repr=False)

    @property
    def dir(self) -> Path:
        return STATE_ROOT / self.prefix

    def ns(self, node: str) -> str:
        return f"{self.prefix}-{node}"

    @property
    def pep_nodes(self) -> list[str]:
        return [n for n in PEP_NODES if n in self.nodes]

    # --- state file ---------------------------------------------------------------------------

    def save(self) -> None:
        data = {
            "prefix": self.prefix,
            "topology": self.topology,
            "profile": self.profile.to_json(),
            "pep": self.pep,
            "created": self.created,
            "congestion": self.congestion,
            "nodes": self.nodes,
            "settings": self.settings,
            "procs": self.procs,
        }
        tmp = self.dir / "lab.json.tmp"
        tmp.write_text(json.dumps(data, indent=1))
        tmp.replace(self.dir / "lab.json")

    @classmethod
    def load(cls, prefix: str) -> Lab | None:
        try:
            data = json.loads((STATE_ROOT / prefix / "lab.json").read_text())
        except (OSError, ValueError):
            return None
        return cls(
            prefix=data["prefix"],
            topology=data["topology"],
            profile=LinkProfile.from_json(data["profile"]),
            pep=data["pep"],
            created=data.get("created", ""),
            congestion=data.get("congestion"),
            nodes=data.get("nodes", {}),
            settings=data.get("settings", {}),
            procs=data.get("procs", {}),
        )

    # --- processes ----------------------------------------------------------------------------

    def launch(self, name: str, node: str, argv: list[str]) -> None:
        """Start ``argv`` in ``node`` in its own session, so it outlives this command, logging
        to ``{name}.log``; ``wait_ready`` then waits for it."""
        log_path = self.dir / f"{name}.log"
        start = log_path.stat().st_size if log_path.exists() else 0
        env = dict(os.environ)
        env["PYTHONPATH"] = _PACKAGE_ROOT + os.pathsep + env.get("PYTHONPATH", "")
        with open(log_path, "ab") as logf:
            proc = subprocess.Popen(
                ["ip", "netns", "exec", self.ns(node), *argv],
                stdin=subprocess.DEVNULL,
                stdout=logf,
                stderr=subprocess.STDOUT,
                start_new_session=True,
                env=env,
            )
        self._children[name] = proc
        self.procs[name] = {
            "node": node,
            "pid": proc.pid,
            "argv": argv,
            "log": str(log_path),
            "log_offset": start,
        }
        self.save()

    def wait_ready(self, name: str, ready: str, timeout: float = 20) -> int:
        """Wait for ``ready`` in what the process logged since its launch."""
        info = self.procs[name]
        proc = self._children[name]
        ns = self.ns(str(info["node"]))
        log_path = Path(str(info["log"]))
        deadline = time.monotonic() + timeout
        while True:
            text = _read_from(log_path, int(info["log_offset"]))  # type: ignore[call-overload]
            if ready in text:
                return proc.pid
            if proc.poll() is not None:
                raise LabError(
                    f"{name} in {ns} exited with status {proc.returncode}:\n" + _tail(text)
                )
            if time.monotonic() > deadline:
                raise LabError(f"{name} in {ns} not ready after {timeout:g}s:\n" + _tail(text))
            time.sleep(0.05)

    def running(self, name: str) -> bool:
        info = self.procs.get(name)
        if not info:
            return False
        return pid_running(int(info["pid"]), self.ns(str(info["node"])))  # type: ignore[call-overload]

    def stop(self, *names: str, timeout: float = 10) -> None:
        """SIGTERM (pep removes its rules on it), then SIGKILL after ``timeout``; all the named
        processes at once, since each takes a moment to shut down."""
        pids = {}
        for name in names:
            info = self.procs.get(name)
            if info and self.running(name):
                pids[name] = int(info["pid"])  # type: ignore[call-overload]
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pids[name], signal.SIGTERM)
        deadline = time.monotonic() + timeout
        while any(self.running(n) for n in pids) and time.monotonic() < deadline:
            for name in pids:
                self._reap(name)
            time.sleep(0.02)
        for name, pid in pids.items():
            if self.running(name):
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
            self._reap(name, wait=True)

    def _reap(self, name: str, wait: bool = False) -> None:
        proc = self._children.get(name)
        if proc is not None:
            if wait:
                with contextlib.suppress(subprocess.TimeoutExpired):
                    proc.wait(5)
            else:
                proc.poll()

    def pep_argv(self, node: str) -> list[str]:
        return [sys.executable, "-m", "pep.cli", "run", "--config", str(self.dir / f"{node}.toml")]

    def set_split(self, on: bool) -> None:
        """Start or stop pep on every PEP node (the demo's with/without switch)."""
        if not self.pep:
            raise LabError(f"lab {self.prefix!r} was built with --no-pep: it has no pep to switch")
        if not on:
            self.stop(*self.pep_nodes)
            return
        starting = [n for n in self.pep_nodes if not self.running(n)]
        for node in starting:
            self.launch(node, node, self.pep_argv(node))
        for node in starting:
            self.wait_ready(node, "ready:")

    def link_drops(self) -> int:
        """Packets the link's rate limiters (tbf, both directions) have dropped so far: the
        modem queue overflowing."""
        from pyroute2 import NetNS

        with NetNS(self.ns("link")) as ipr:
            return sum(
                (q.get_attr("TCA_STATS") or {}).get("drop", 0)
                for q in ipr.get_qdiscs()
                if q.get_attr("TCA_KIND") == "tbf"
            )

    async def settle(self) -> None:
        """Let the last FIN/ACKs of a measurement cross the link before the next one starts."""
        import trio

        await trio.sleep(0.3 + self.profile.rtt_ms / 1000)

    def reap_all(self) -> None:
        for name in list(self._children):
            self._reap(name, wait=True)


def _read_from(path: Path, offset: int) -> str:
    try:
        with open(path, "rb") as f:
            f.seek(offset)
            return f.read().decode(errors="replace")
    except OSError:
        return ""


def _tail(text: str, lines: int = 15) -> str:
    return "\n".join("    " + line for line in text.strip().splitlines()[-lines:])


# --------------------------------------------------------------------------------------------
# up / down


def up(spec: LabSpec, progress: Callable[[str], None] | None = None) -> Lab:
    """Build the lab and start its processes; on any failure remove what was built."""
    say = progress or (lambda msg: None)
    check_environment()
    if exists(spec.prefix):
        raise LabError(
            f"a lab with prefix {spec.prefix!r} already exists "
            f"({', '.join(_lab_namespaces(spec.prefix))}); "
            f"remove it with `pep lab down --prefix {spec.prefix}`"
        )
    lab = Lab(
        prefix=spec.prefix,
        topology=spec.topology,
        profile=spec.profile,
        pep=spec.pep,
        created=dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
    )
    shutil.rmtree(lab.dir, ignore_errors=True)  # a stale state dir without namespaces
    lab.dir.mkdir(parents=True)
    try:
        _build(lab, say)
    except BaseException as e:
        down(spec.prefix, lab)
        if isinstance(e, LabError | OSError | ValueError):
            raise LabError(f"building lab {spec.prefix!r} failed: {e}") from e
        raise
    return lab


def _build(lab: Lab, say: Callable[[str], None]) -> None:
    from pyroute2 import NetNS

    from pep.topology import Topology, sysctl

    profile = lab.profile
    nodes, links, routes = plan(lab.topology)
    topo = Topology(lab.prefix)
    say(f"building {lab.topology} lab {lab.prefix!r}: {profile.describe()}")
    for node in nodes:
        lab.nodes[node] = {}
        topo.add_node(node, forwarding=node in ("pepa", "link", "pepb"))
        lab.save()  # early: status/down see a half-built lab for what it is
    for a, b in links:
        topo.link(a.node, a.name, a.addr, b.node, b.name, b.addr)
        lab.nodes[a.node][a.name] = a.addr
        lab.nodes[b.node][b.name] = b.addr
    peps = [n for n in PEP_NODES if n in nodes] if lab.pep else []
    tables = {node: link_table(profile, PEP_NODES[node][1]) for node in peps}
    lab.congestion = default_congestion() if any(tables.values()) else None
    for node, node_routes in routes.items():
        lab.settings.setdefault(node, [])
        for text in node_routes:
            dst, _, gw = text.partition(" via ")
            topo.route(node, dst, gw)
    for node in nodes:
        ns = lab.ns(node)
        notes = lab.settings.setdefault(node, [])
        # A finished connection's cached ssthresh/RTT would shape the next one (the demo
        # fetches the same server again and again): every fetch starts from scratch.
        sysctl(ns, "net.ipv4.tcp_no_metrics_save", 1)
        if node in ("client", "server"):
            sysctl(ns, "net.ipv4.tcp_rmem", HOST_TCP_RMEM)
            sysctl(ns, "net.ipv4.tcp_wmem", HOST_TCP_WMEM)
            notes += [f"tcp_rmem {HOST_TCP_RMEM}", f"tcp_wmem {HOST_TCP_WMEM}"]
        elif node in peps:
            sysctl(ns, "net.ipv4.tcp_fastopen", TFO_SYSCTL)
            notes.append(f"tcp_fastopen {TFO_SYSCTL:#x}")
    if profile.loss > 0:
        # The senders into the link hand it GSO packets of up to 64 KB; `-m statistic` would
        # drop one of those as one packet, i.e. up to 45 segments at a time and far fewer
        # loss events than the profile says. Segmenting before the link makes loss per packet.
        for a, b in links:
            for near, far in ((a, b), (b, a)):
                if far.node == "link":
                    disable_segmentation_offload(lab.ns(near.node), near.name)
                    lab.settings[near.node].append(f"{near.name}: TSO/GSO off (loss per packet)")
    # Rate: tbf on each direction's egress from the link node.
    with NetNS(lab.ns("link")) as ipr:
        for ifname, direction in (("cl0", "down"), ("sv0", "up")):
            params = profile.tbf(direction)
            if params is None:
                continue
            index = ipr.link_lookup(ifname=ifname)[0]
            ipr.tc("add", "tbf", index, handle="1:", **params)
            lab.settings["link"].append(
                f"{ifname}: tbf rate {params['rate'] * 8} bit/s burst {params['burst']} "
                f"limit {params['limit']} ({direction}link)"
            )
    lab.save()
    # The processes start in parallel (each needs a second or so to import and bind).
    waits = []
    if profile.rtt_ms > 0 or profile.loss > 0:
        say(f"starting the delay line ({profile.rtt_ms / 2:g} ms each way)")
        lab.launch("delayline", "link", delayline_argv(lab))
        waits.append(("delayline", "ready:"))
    say("starting the object server")
    server_argv = [sys.executable, "-m", "pep.lab.objects", "serve", "--port", str(SERVER_PORT)]
    lab.launch("server", "server", server_argv)
    waits.append(("server", "listening on"))
    for node in peps:
        interface = PEP_NODES[node][0]
        link = tables[node]
        text = pep_config_text(interface, link, status_socket=str(lab.dir / f"{node}.sock"))
        (lab.dir / f"{node}.toml").write_text(text)
        _validate_config(lab.dir / f"{node}.toml")
        say(f"starting pep on {node} (splitting {interface})")
        lab.launch(node, node, lab.pep_argv(node))
        waits.append((node, "ready:"))
        if link is not None:
            lab.settings[node].append(
                "[link] "
                + " ".join(f"{k} {v}" for k, v in link.items())
                + " (pep: initcwnd/initrwnd on its routes, link-leg buffers and "
                + f"{lab.congestion or 'default'} congestion control, pacing)"
            )
    for name, marker in waits:
        lab.wait_ready(name, marker)
    lab.save()


def disable_segmentation_offload(ns: str, ifname: str) -> None:
    """``ethtool -K IF tso off gso off`` (pyroute2's ioctl ethtool; its socket must be made in
    the namespace, like ns_socket)."""
    from pyroute2.ethtool import Ethtool

    from pep.topology import in_netns

    with in_netns(ns):
        ethtool = Ethtool()
    try:
        features = ethtool.get_features(ifname)
        for name, feature in features.features.items():
            if name == "tx-generic-segmentation" or (
                name.startswith("tx-tcp") and name.endswith("segmentation")
            ):
                feature.enable = False
        ethtool.set_features(ifname, features)
    finally:
        ethtool.close()


def delayline_argv(lab: Lab) -> list[str]:
    p = lab.profile
    buffer_ms = max(p.queue_s * 1000, 1.0)  # the tbf queue behind the delay line
    return [
        sys.executable,
        "-m",
        "pep.lab.delayline",
        "--up-if",
        "cl0",
        "--down-if",
        "sv0",
        "--delay-ms",
        f"{p.rtt_ms / 2:g}",
        "--up-rate",
        str(p.up_bps or 0),
        "--down-rate",
        str(p.down_bps or 0),
        "--buffer-ms",
        f"{buffer_ms:g}",
        "--loss",
        f"{p.loss:g}",
        "--stats",
        str(lab.dir / "delayline.json"),
    ]


def _validate_config(path: Path) -> None:
    from pep import config as config_mod

    try:
        config_mod.load(path, {})
    except config_mod.ConfigError as e:
        raise LabError(f"the lab's pep config {path} is refused: {e}") from e


def down(prefix: str, lab: Lab | None = None) -> list[str]:
    """Remove every namespace of the lab (killing its processes first) and its state dir.

    Works from the prefix alone, so it also cleans up a half-built or crashed lab.
    """
    from pep.topology import destroy_prefix

    if not _PREFIX.match(prefix):
        raise LabError(f"prefix {prefix!r}: 1-24 letters, digits or '_', starting with a letter")
    removed = destroy_prefix(prefix)
    if lab is not None:
        lab.reap_all()
    shutil.rmtree(STATE_ROOT / prefix, ignore_errors=True)
    return removed


# --------------------------------------------------------------------------------------------
# status


def _age(created: str) -> str:
    try:
        then = dt.datetime.fromisoformat(created)
    except ValueError:
        return "?"
    s = int((dt.datetime.now(dt.UTC) - then).total_seconds())
    return f"{s // 3600}h{s % 3600 // 60:02d}m" if s >= 3600 else f"{s // 60}m{s % 60:02d}s"


def _delayline_summary(lab: Lab) -> list[str]:
    try:
        stats = json.loads((lab.dir / "delayline.json").read_text())
    except (OSError, ValueError):
        return []
    out = []
    for name, d in stats.get("directions", {}).items():
        overflow = d.get("queue_dropped", 0) + d.get("user_dropped", 0)
        out.append(
            f"    {name:<4} {d['interface']}: {d['arrived']} packets delayed "
            f"{d['delay_ms']:g} ms, held now {d['held']} (max {d['max_held']} of "
            f"{d['maxlen']}), overflow {overflow} (queue dropped {d.get('queue_dropped', 0)}, "
            f"user dropped {d.get('user_dropped', 0)}, ENOBUFS {d.get('enobufs', 0)})"
        )
    return out


def status_text(prefix: str) -> str:
    """Human-readable state of the lab; raises LabError when there is no such lab."""
    namespaces = _lab_namespaces(prefix)
    lab = Lab.load(prefix)
    if lab is None:
        if namespaces:
            return (
                f"lab {prefix!r}: namespaces {', '.join(namespaces)} exist but there is no "
                f"state file (a crashed `pep lab up`?); remove them with "
                f"`pep lab down --prefix {prefix}`"
            )
        raise LabError(f"no lab with prefix {prefix!r} (start one with `pep lab up`)")
    p = lab.profile
    mode = "PEP" if lab.pep else "no PEP"
    lines = [
        f"lab {prefix!r}: {p.name.upper()} {lab.topology}, {mode}, up {_age(lab.created)}",
        f"link: {p.describe()}; {p.rtt_ms / 2:g} ms each way",
    ]
    if "delayline" in lab.procs:
        state = "running" if lab.running("delayline") else "NOT RUNNING (link is down)"
        lines.append(
            f"  delay line: {state} (pid {lab.procs['delayline']['pid']}; "
            "counters refreshed every second)"
        )
        lines += _delayline_summary(lab)
    if lab.congestion:
        lines.append(f"  link-leg congestion control on the PEP nodes: {lab.congestion}")
    lines.append("nodes:")
    for node, ifaces in lab.nodes.items():
        ns = lab.ns(node)
        present = "" if ns in namespaces else "  (namespace MISSING)"
        addrs = ", ".join(f"{i} {a}" for i, a in ifaces.items())
        lines.append(f"  {node:<7} {ns:<{len(prefix) + 8}} {addrs}{present}")
        if node in PEP_NODES:
            if not lab.pep:
                lines.append("          pep: not used (--no-pep)")
            elif node in lab.procs:
                pid = lab.procs[node]["pid"]
                state = f"running (pid {pid})" if lab.running(node) else "stopped"
                lines.append(f"          pep: {state}, splitting {PEP_NODES[node][0]}")
        if node == "server" and "server" in lab.procs:
            state = "running" if lab.running("server") else "NOT RUNNING"
            lines.append(f"          object server :{SERVER_PORT}: {state}")
        for note in lab.settings.get(node, []):
            lines.append(f"          {note}")
    lines.append(f"logs and configs: {lab.dir}")
    return "\n".join(lines)
