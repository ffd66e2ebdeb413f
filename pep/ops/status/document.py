"""``pep status``: the daemon's state as one JSON document.

The document is built by pure functions (``document``, ``merge``), so what an operator sees
(pep.ops.status.render draws it), what ``--json`` prints and what the Prometheus endpoint exports
(pep.ops.status.metrics reads the same document) cannot drift apart, and all of it is unit-tested
without a daemon. pep.ops.status.socket serves it on a unix socket and reads it back.
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from pep.capture import nfq_proc
from pep.capture.flows import FlowTable
from pep.config import Config
from pep.split.connections import ConnectionTable
from pep.support.errors import describe

__all__ = [
    "Doc",
    "StatusError",
    "decode",
    "document",
    "encode",
    "fill_kernel_queues",
    "merge",
    "read_kernel_queues",
]

VERSION = 1
Doc = dict[str, Any]


class StatusError(RuntimeError):
    """The status socket could not be served or read; the message says what to do."""


# --------------------------------------------------------------------------------------------
# sans-IO: building, merging, encoding and rendering the document


def hostport(addr: Sequence[Any]) -> str:
    host, port = addr[0], addr[1]
    return f"[{host}]:{port}" if ":" in str(host) else f"{host}:{port}"


def _counters(obj: object) -> dict[str, int]:
    """Every int field of a counters dataclass: fields added later show up by themselves."""
    if obj is None:
        return {}
    return {
        f.name: v
        for f in dataclasses.fields(obj)  # type: ignore[arg-type]
        if isinstance(v := getattr(obj, f.name), int) and not isinstance(v, bool)
    }


def _plain(value: object) -> Any:
    """``value`` in JSON's types, for the document's "config": a dataclass (Config, LegTuning,
    Rule, LegOverride, ...) as an object of its fields, a tuple or list as an array, a mapping as
    an object, and anything else that is not a JSON scalar as its text: an ipaddress network
    as "10.0.0.0/8". ``dataclasses.asdict`` keeps such values as they are, and one network in a
    ``[[policy]]`` rule made the whole document unserializable (`pep status` failed)."""
    if value is None or isinstance(value, bool | int | float | str):
        return value
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {f.name: _plain(getattr(value, f.name)) for f in dataclasses.fields(value)}
    if isinstance(value, Mapping):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, tuple | list):
        return [_plain(v) for v in value]
    return str(value)


def document(
    *,
    cfg: Config,
    table: ConnectionTable,
    listener: object,
    syn: object | None,
    flows: FlowTable,
    queues: tuple[int, int],
    kernel_queues: list[nfq_proc.Row] | None,
    kernel_queues_error: str | None = None,
    queue_portids: Sequence[int] = (),
    state: str = "running",
    started: float = 0.0,
    now: float | None = None,
    worker: int | None = None,
    reloads: Mapping[str, Any] | None = None,
    link: Mapping[str, Any] | None = None,
    peer: Mapping[str, Any] | None = None,
) -> Doc:
    """The status of one daemon process (``started``/``now`` are monotonic seconds);
    ``link`` is the link sharer's snapshot (pep.link.pacer), None without [link]."""
    now = table.clock() if now is None else now
    up, down = table.bytes_total()
    conns = []
    for c in table:
        s = c.stats
        row = {
            "client": hostport(c.client),
            "dst": hostport(c.dst),
            "flow": c.flow,
            "age": round(now - c.started, 3),
            "state": c.state,
            "up": s.up if s else 0,
            "down": s.down if s else 0,
            "connect_ms": None if c.connect_seconds is None else round(c.connect_seconds * 1e3, 3),
            "worker": worker,
        }
        legs = _legs(c.links)
        if legs is not None:  # its legs that send into the link, with their shares
            row["link"] = legs
        conns.append(row)
    hist = table.connect_latency
    return {
        "version": VERSION,
        "pid": os.getpid(),
        "worker": worker,
        "workers": [],
        "state": state,
        "uptime": round(now - started, 3),
        "queues": list(queues),
        "config": _plain(cfg),
        "reloads": dict(reloads or {"ok": 0, "failed": 0, "last_error": None}),
        "connections": conns,
        "totals": {
            "active": len(conns),
            "closed": table.closed,
            "bytes_up": up,
            "bytes_down": down,
        },
        "listener": _counters(listener),
        "syn": _counters(syn),
        "upstream_failures": dict(table.failures),
        "connect_latency": {
            "le": list(hist.bounds),
            "counts": list(hist.counts),
            "sum": hist.total,
        },
        "flows": {"pending": len(flows), "evicted": flows.evicted, "expired": flows.expired},
        "kernel_queues": kernel_queues,
        "kernel_queues_error": kernel_queues_error,
        "queue_portids": list(queue_portids),  # our netlink sockets: the proc file's "portid"
        "link": dict(link) if link is not None else None,
        "peer": dict(peer) if peer is not None else None,
    }


def _legs(legs: tuple[Any, Any]) -> dict[str, Any] | None:
    """A connection's legs that send into the link, with each one's share (bit/s)."""
    out = {
        name: {"share_bps": round(leg.share * 8), "active": leg.active}
        for name, leg in zip(("client", "upstream"), legs, strict=True)
        if leg is not None
    }
    return out or None


def _merge_peer(into: dict[str, Any] | None, more: Mapping[str, Any]) -> dict[str, Any]:
    """Workers' [peer] sections: each worker keeps its own pool and serves its own peer
    connections; the counts add up, the addresses are the same."""
    out: dict[str, Any] = {} if into is None else into
    for part in ("pool", "listener"):
        if more.get(part) is None:
            out.setdefault(part, None)
            continue
        mine = out.get(part) or {k: v for k, v in more[part].items() if not _number(v)}
        _add(mine, more[part])
        out[part] = mine
    return out


def _number(v: object) -> bool:
    return isinstance(v, int | float) and not isinstance(v, bool)


# The link section's counters, summed over workers; the rest (its settings) is the master's.
_LINK_SUMS = (
    "pacing_capacity_bps",
    "flows",
    "flows_active",
    "flows_total",
    "send_rate_bps",
    "bytes_sent",
    "retransmits",
    "congestion_restarts",
    "ticks",
    "tick_cpu_s",
)


def _merge_state(a: Mapping[str, Any] | None, b: Mapping[str, Any] | None) -> Any:
    """The link's state over workers, each of which watches its own sockets: down when one of
    them sees it down (the one that has traffic across it knows), and the history of the one
    that saw the most of it (outages are the link's, not a sum over processes)."""
    if not a or not b:
        return a or b
    seen = max(a, b, key=lambda s: (s["outages"], s["outage_seconds"]))
    down_for = [s["down_for_s"] for s in (a, b) if s["down_for_s"] is not None]
    return {**seen, "up": a["up"] and b["up"], "down_for_s": max(down_for, default=None)}


# A terminal's plan, the same in every worker; the rest of its row is summed over workers.
_PLAN_KEYS = ("egress_bps", "ingress_bps", "plan_capacity_bps")


def _merge_terminals(
    into: list[dict[str, Any]], more: list[dict[str, Any]] | None
) -> list[dict[str, Any]]:
    """Workers' terminal rows (pep.link.plans), one per terminal: each worker paces its own
    legs of a terminal, so their counts add up."""
    rows = {row["name"]: row for row in into}
    for row in more or ():
        mine = rows.get(row["name"])
        if mine is None:
            rows[row["name"]] = dict(row)
        else:
            _add(mine, {k: v for k, v in row.items() if k not in _PLAN_KEYS})
    return list(rows.values())


def _add(into: dict[str, Any], more: Mapping[str, Any]) -> None:
    for k, v in more.items():
        if isinstance(v, int | float) and not isinstance(v, bool):
            into[k] = into.get(k, 0) + v


def merge(master: Doc, workers: Iterable[tuple[int, Doc | str]]) -> Doc:
    """One document for a ``workers = N`` daemon: the master's identity and config, the
    workers' connections and counters summed. A worker that could not be asked is listed with
    its error (it is being restarted, and its queue is bypassed meanwhile)."""
    out = dict(master)
    out.update(
        connections=[],
        workers=[],
        kernel_queues=[],
        kernel_queues_error=None,
        queue_portids=[],
        link=None,
        peer=None,
    )
    for section in ("totals", "listener", "syn", "upstream_failures", "flows"):
        out[section] = {}
    hist: dict[str, Any] | None = None
    for index, doc in workers:
        if isinstance(doc, str):
            out["workers"].append(
                {"worker": index, "pid": None, "state": "down", "error": doc, "accepted": 0}
            )
            continue
        out["workers"].append(
            {
                "worker": index,
                "pid": doc["pid"],
                "state": doc["state"],
                "error": None,
                "accepted": doc["listener"].get("accepted", 0),
                "active": doc["totals"]["active"],
            }
        )
        out["connections"].extend(doc["connections"])
        out["queue_portids"].extend(doc["queue_portids"])
        for section in ("totals", "listener", "syn", "upstream_failures", "flows"):
            _add(out[section], doc[section])
        lat = doc["connect_latency"]
        if hist is None:
            hist = {"le": lat["le"], "counts": list(lat["counts"]), "sum": lat["sum"]}
        else:
            hist["counts"] = [a + b for a, b in zip(hist["counts"], lat["counts"], strict=True)]
            hist["sum"] += lat["sum"]
        if doc.get("peer"):
            out["peer"] = _merge_peer(out.get("peer"), doc["peer"])
        if doc.get("link"):
            link = out.get("link") or {
                **doc["link"],
                **dict.fromkeys(_LINK_SUMS, 0),
                "terminals": [],
            }
            for k in _LINK_SUMS:
                link[k] += doc["link"].get(k, 0)
            link["state"] = _merge_state(link.get("state"), doc["link"].get("state"))
            link["terminals"] = _merge_terminals(link["terminals"], doc["link"].get("terminals"))
            out["link"] = link
        if doc["kernel_queues"] is not None:
            out["kernel_queues"].extend(doc["kernel_queues"])
        elif doc.get("kernel_queues_error"):
            out["kernel_queues_error"] = doc["kernel_queues_error"]
    if hist is not None:
        out["connect_latency"] = hist
    if out["kernel_queues_error"]:
        out["kernel_queues"] = None
    return out


def encode(doc: Doc) -> bytes:
    return json.dumps(doc, separators=(",", ":")).encode() + b"\n"


# What every reader of a document (the text view, --json's consumers, the metrics) relies on:
# the top-level sections and their JSON types. A document without them is refused whole, with
# the section named, instead of failing in a reader with a traceback.
_SHAPE: dict[str, type | tuple[type, ...]] = {
    "pid": int,
    "state": str,
    "uptime": (int, float),
    "queues": list,
    "config": dict,
    "reloads": dict,
    "connections": list,
    "totals": dict,
    "listener": dict,
    "syn": dict,
    "upstream_failures": dict,
    "connect_latency": dict,
    "flows": dict,
    "queue_portids": list,
}


def decode(data: bytes) -> Doc:
    try:
        doc = json.loads(data)
    except (ValueError, RecursionError) as e:  # deeply nested: json recurses per level
        raise StatusError(f"the daemon's status is not valid JSON: {describe(e)}") from None
    version = doc.get("version") if isinstance(doc, dict) else None
    if version != VERSION:
        raise StatusError(
            f"unexpected status document (version {version}, this pep reads version "
            f"{VERSION}): is the daemon a different pep version?"
        )
    for key, kind in _SHAPE.items():
        if not isinstance(doc.get(key), kind):
            raise StatusError(
                f"the daemon's status document is malformed: {key!r} is "
                f"{'missing' if key not in doc else type(doc[key]).__name__}"
            )
    return doc


def read_kernel_queues(
    queues: tuple[int, int], path: str = nfq_proc.NFQUEUE_PROC
) -> tuple[list[nfq_proc.Row] | None, str | None]:
    """Our queues' kernel counters, or (None, why not).

    The file is 0440 root:root, so a daemon running as a non-root user with only
    CAP_NET_ADMIN + CAP_NET_RAW cannot read it; ``pep status`` run as root then reads it
    itself (it is per network namespace, like the daemon's queues).
    """
    try:
        return nfq_proc.read(queues, path), None
    except OSError as e:
        return None, f"{path}: {describe(e)}"


def fill_kernel_queues(doc: Doc, path: str = nfq_proc.NFQUEUE_PROC) -> None:
    """Fill in the kernel queue counters the daemon could not read, if we can read them.

    Only rows bound by the daemon's own netlink sockets count, so a ``pep status`` run in
    another network namespace than the daemon's shows nothing rather than someone else's queue.
    """
    if doc.get("kernel_queues") is not None or not doc.get("queue_portids"):
        return
    rows, _ = read_kernel_queues(tuple(doc["queues"]), path)  # type: ignore[arg-type]
    if rows is None:
        return
    ours = [r for r in rows if r["portid"] in doc["queue_portids"]]
    if ours:
        doc["kernel_queues"], doc["kernel_queues_error"] = ours, None
