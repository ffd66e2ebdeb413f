"""``pep lab status``: what a lab is, what runs in it and what its link has done, as text.

Read from the state file (pep.lab.state) and the delay line's stats file; the namespaces that
really exist are checked against what the state file says, so a half-removed or crashed lab
shows as such.
"""

from __future__ import annotations

import datetime as dt
import json
import tomllib

from pep.lab.cluster import CLUSTERS, vips_held
from pep.lab.plan import PEP_NODES, SERVER_PORT
from pep.lab.state import Lab, lab_namespaces, not_up

__all__ = ["status_text"]


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
    namespaces = lab_namespaces(prefix)
    lab = Lab.load(prefix)
    if lab is None:
        if namespaces:
            return (
                f"lab {prefix!r}: namespaces {', '.join(namespaces)} exist but there is no "
                f"state file (a crashed `pep lab up`?); remove them with "
                f"`pep lab down --prefix {prefix}`"
            )
        raise not_up(prefix)
    p = lab.profile
    mode = "PEP" if lab.pep else "no PEP"
    if lab.topology in CLUSTERS:
        lines = [
            f"lab {prefix!r}: {lab.topology}, two PEP gateways, {mode}, up {_age(lab.created)}",
            "link: none emulated (veth at full speed): the topology is what is shown",
        ]
    else:
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
        addrs = ", ".join(f"{i} {a}" for i, a in ifaces.items()) or "a switch (bridge br0)"
        lines.append(f"  {node:<7} {ns:<{len(prefix) + 8}} {addrs}{present}")
        if node in PEP_NODES or node in lab.pep_nodes:
            if not lab.pep:
                lines.append("          pep: not used (--no-pep)")
            elif node in lab.procs:
                pid = lab.procs[node]["pid"]
                state = f"running (pid {pid})" if lab.running(node) else "stopped"
                lines.append(f"          pep: {state}, splitting {_interfaces(lab, node)}")
        if f"keepalived-{node}" in lab.procs:
            name = f"keepalived-{node}"
            state = "running" if lab.running(name) else "NOT RUNNING"
            held = vips_held(lab.ns(node))
            role = f"MASTER, holds {', '.join(held)}" if held else "backup"
            lines.append(f"          keepalived: {state} (pid {lab.procs[name]['pid']}), {role}")
        if node == "server" and "server" in lab.procs:
            state = "running" if lab.running("server") else "NOT RUNNING"
            lines.append(f"          object server :{SERVER_PORT}: {state}")
        for note in lab.settings.get(node, []):
            lines.append(f"          {note}")
    lines += _plans(lab)
    conf = lab.dir / "keepalived-gwa.conf"
    if conf.exists():
        lines.append(f"keepalived.conf of gwa ({conf}; gwb's differs in priority only):")
        lines += ["    " + line for line in conf.read_text().splitlines()]
    lines.append(f"logs and configs: {lab.dir}")
    return "\n".join(lines)


def _plans(lab: Lab) -> list[str]:
    """A star lab's terminals: each plan (the modem's classes and the hub's plans file), its
    addresses, and what its queue at the modem dropped so far (root only; else not shown)."""
    if not lab.star:
        return []
    from pep.lab.star_build import queue_drops, star_of

    star = star_of(lab)
    try:
        drops: dict[str, int] | None = queue_drops(lab)
    except OSError:
        drops = None
    file = lab.dir / "terminals.txt"
    lines = [
        f"terminals: {len(star.plans)}, plans {'in ' + str(file) if file.exists() else '(no pep)'}"
        + f"; terminal peps {'yes' if star.terminal_pep else 'no'}"
    ]
    for i, (name, plan) in enumerate(zip(star.names, star.plans, strict=True), start=1):
        dropped = "" if drops is None else f", {drops[name]} dropped at its queue"
        lines.append(
            f"  {name}: plan {plan.text()} down/up, client c{i} {star.client(i)}, "
            f"networks {' '.join(star.networks(i))}{dropped}"
        )
    return lines


def _interfaces(lab: Lab, node: str) -> str:
    """What this pep was told to split: its config's ``interfaces`` (the lab wrote it)."""
    try:
        return ", ".join(tomllib.loads(lab.config(node).read_text())["interfaces"])
    except (OSError, tomllib.TOMLDecodeError, KeyError):
        return PEP_NODES.get(node, ("?",))[0]
