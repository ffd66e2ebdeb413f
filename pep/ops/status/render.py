"""``pep status`` for a human: the status document (pep.ops.status.document) as a summary and a
table.

Pure: it reads only the document, so the text cannot show what ``--json`` and the metrics do
not.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from pep.config import units
from pep.ops.status.document import Doc

__all__ = ["render"]


def _bytes(n: float) -> str:
    for unit in ("B", "kB", "MB", "GB"):
        if abs(n) < 1000 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    raise AssertionError("unreachable")


def _rate(bps: float) -> str:
    return units.format_rate(bps)


def _share(legs: Mapping[str, Any] | None) -> str:
    """'upstream 6.7 Mbit/s' (idle legs in brackets), or '' for a connection off the link."""
    if not legs:
        return ""
    parts = []
    for name, leg in legs.items():
        text = f"{name} {_rate(leg['share_bps'])}"
        parts.append(text if leg["active"] else f"({text})")
    return ", ".join(parts)


def _terminals(rows: list[dict[str, Any]] | None, limit: int) -> list[str]:
    """The terminals that have link legs now ([link] plans; pep.link.plans): plan, share,
    what they send, their legs, what TCP retransmitted and found lost."""
    busy = [r for r in rows or () if r["legs"]]
    if not busy:
        return []
    out = [f"terminals with link legs: {len(busy)} (of {len(rows or ())} seen)"]
    table = [("  TERMINAL", "PLAN OUT/IN", "SHARE", "SENDING", "LEGS", "RETRANS", "LOST")]
    for r in busy[:limit]:
        plan = (
            f"{_rate(r['egress_bps'])} / {_rate(r['ingress_bps'])}"
            if r["egress_bps"] is not None
            else "none (no terminal)"
        )
        table.append(
            (
                f"  {r['name']}",
                plan,
                _rate(r["share_bps"]),
                _rate(r["send_rate_bps"]),
                f"{r['legs_active']}/{r['legs']} active",
                str(r["retransmits"]),
                str(r["lost"]),
            )
        )
    widths = [max(len(row[i]) for row in table) for i in range(len(table[0]))]
    for row in table:
        out.append("  ".join(v.ljust(w) for v, w in zip(row, widths, strict=True)).rstrip())
    if len(busy) > limit:
        out.append(f"  ... and {len(busy) - limit} more (--json lists all)")
    return out


def _duration(s: float) -> str:
    if s < 60:
        return f"{s:.1f}s"
    m, s = divmod(int(s), 60)
    if m < 60:
        return f"{m}m{s:02d}s"
    h, m = divmod(m, 60)
    return f"{h}h{m:02d}m" if h < 48 else f"{h // 24}d{h % 24:02d}h"


def render(doc: Doc, limit: int = 200) -> str:
    """The human view: a summary, then the live connections oldest first (at most ``limit``)."""
    cfg, tot, lc, syn = doc["config"], doc["totals"], doc["listener"], doc["syn"]
    q0, q1 = doc["queues"]
    queues = f"queue {q0}" if q0 == q1 else f"queues {q0}-{q1}"
    lines = [
        f"pep (pid {doc['pid']}) {doc['state']}, up {_duration(doc['uptime'])}: "
        f"{','.join(cfg['interfaces'])} -> port {cfg['listen_port']}, {queues}"
        + (f", {len(doc['workers'])} workers" if doc["workers"] else ""),
    ]
    for w in doc["workers"]:
        if w["error"]:
            lines.append(f"  worker {w['worker']}: DOWN ({w['error']})")
    fails = doc["upstream_failures"]
    fail_text = ", ".join(f"{k}: {v}" for k, v in sorted(fails.items()))
    lines += [
        f"connections: {tot['active']} active, {lc.get('split', 0)} split, "
        f"{lc.get('not_redirected', 0)} refused (not redirected), "
        f"{lc.get('upstream_failed', 0)} upstream failures" + (f" ({fail_text})" if fails else ""),
        f"relayed: {_bytes(tot['bytes_up'])} up, {_bytes(tot['bytes_down'])} down",
    ]
    other = {k: v for k, v in syn.items() if k not in ("queued", "split") and v}
    lines.append(
        f"SYN verdicts: {syn.get('queued', 0)} queued, {syn.get('split', 0)} split, "
        f"{syn.get('queued', 0) - syn.get('split', 0)} not split"
        + (f" ({', '.join(f'{k} {v}' for k, v in sorted(other.items()))})" if other else "")
    )
    fl = doc["flows"]
    lines.append(
        f"flow table: {fl['pending']} pending, {fl['evicted']} evicted, {fl['expired']} expired"
    )
    peer = doc.get("peer") or {}
    if pool := peer.get("pool"):
        lines.append(
            f"peer pool {pool['connect']}: {pool['ready']} ready of {pool['target']}, "
            f"{pool['in_use']} in use; {pool['opened']} opened, {pool['fallback']} flows went "
            f"direct, {pool['died_idle']} died idle, {pool['connect_failed']} connect and "
            f"{pool['auth_failed']} authentication failures"
        )
    if far := peer.get("listener"):
        lines.append(
            f"peer listener {far['listen']}: {far['accepted']} authenticated, {far['flows']} "
            f"flows; refused: {far['not_allowed']} not allowed, {far['auth_failed']} "
            f"handshake, {far['bad_header']} header, {far['forbidden']} destination; "
            f"{far['upstream_failed']} destinations failed"
        )
    link = doc.get("link")
    if link:
        lines.append(
            f"link {link['interface']}: {link['rtt_s'] * 1000:g} ms RTT, egress "
            f"{_rate(link['egress_bps'])}, ingress {_rate(link['ingress_bps'])}, "
            f"{link['congestion'] or 'kernel default congestion control'}; sending "
            f"{_rate(link['send_rate_bps'])} of {_rate(link['pacing_capacity_bps'])} "
            f"(payload), {link['flows_active']} of {link['flows']} link legs active, "
            f"{link['retransmits']} retransmitted segments, "
            f"{link['congestion_restarts']} congestion-control restarts"
        )
        if state := link.get("state"):
            now = "up" if state["up"] else f"DOWN for {state['down_for_s']:.1f} s"
            lines.append(
                f"link {link['interface']} is {now}: {state['outages']} outage(s), "
                f"{state['outage_seconds']:.1f} s down in all"
            )
    lines += _terminals(link.get("terminals") if link else None, limit)
    if doc["kernel_queues"] is None:
        lines.append(f"kernel queues: unavailable ({doc['kernel_queues_error']})")
    else:
        for kq in doc["kernel_queues"]:
            lines.append(
                f"kernel queue {kq['queue']}: {kq['waiting']} waiting, "
                f"{kq['queue_dropped']} queue dropped, {kq['user_dropped']} user dropped"
            )
    conns = doc["connections"]
    if conns:
        rows = [("CLIENT", "DESTINATION", "AGE", "STATE", "UP", "DOWN")]
        if link:  # each connection's share of the link, per leg that sends into it
            rows[0] += ("LINK SHARE",)
        for c in sorted(conns, key=lambda c: -c["age"])[:limit]:
            row = (
                c["client"],
                c["dst"],
                _duration(c["age"]),
                c["state"],
                _bytes(c["up"]),
                _bytes(c["down"]),
            )
            rows.append(row + ((_share(c.get("link")),) if link else ()))
        widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
        lines.append("")
        for r in rows:
            lines.append("  ".join(v.ljust(w) for v, w in zip(r, widths, strict=True)).rstrip())
        if len(conns) > limit:
            lines.append(f"... and {len(conns) - limit} more (--json lists all)")
    return "\n".join(lines) + "\n"


# --------------------------------------------------------------------------------------------
# IO: the kernel's queue counters (pep.capture.nfq_proc)
