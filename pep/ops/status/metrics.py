"""Prometheus metrics, derived from the status document at scrape time.

Nothing in the data path calls into prometheus_client: the listener and the SYN reader keep
their plain counters, and a scrape turns the same document ``pep status`` prints into metric
families (``families``, pure) and lets the library's registry and exposition format them. With
``workers = N`` the master merges its workers' documents first, so the metrics are the sum over
processes without prometheus_client's multiprocess mode and its shared files.

The endpoint is a small trio HTTP/1.x responder on ``metrics_listen`` (GET /metrics, or /);
``choose_encoder`` picks the classic text format or OpenMetrics from the Accept header.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable, Iterator
from typing import Any

import trio
from prometheus_client.core import (
    CollectorRegistry,
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.exposition import choose_encoder

from pep.config.schema import parse_listen_address
from pep.support.errors import describe

__all__ = ["exposition", "families", "open_listeners", "reason_label", "serve_metrics"]

log = logging.getLogger(__name__)

Doc = dict[str, Any]

# Help texts of the SYN reader's counters; a counter added later is exported with a generic one.
_SYN_HELP = {
    "queued": "Packets received from the NFQUEUE (new connections' SYNs).",
    "split": "SYNs recorded and marked, so their connection is split.",
    "unparsable": "Queued packets that were not a parsable TCP SYN; accepted unsplit.",
    "malformed": "Netlink messages from the queue that could not be decoded.",
    "enobufs": "Netlink receive buffer overflows (the kernel accepted those SYNs unsplit).",
    "bypassed": "SYNs the split/bypass policy let through unsplit.",
    "admission_bypassed": "SYNs let through unsplit because pep was at max_connections.",
}
_LISTENER = {  # status key -> (metric name, help)
    "accepted": ("pep_connections_accepted", "Connections accepted on the listener."),
    "not_redirected": (
        "pep_connections_refused",
        "Direct (not redirected) connections to the listener, refused: no open proxy.",
    ),
    "flow_missing": (
        "pep_flow_table_misses",
        "Accepted connections without a SYN record (expected with workers > 1).",
    ),
    "flow_mismatch": (
        "pep_flow_table_mismatches",
        "SYN record and SO_ORIGINAL_DST disagreed (the latter was used).",
    ),
    "accept_errors": ("pep_accept_errors", "accept() errors (EMFILE and the like)."),
}


def reason_label(reason: str) -> str:
    """A short label value for an upstream failure: ``connect failed: ECONNREFUSED`` ->
    ``ECONNREFUSED``, ``connect timeout`` -> ``timeout``."""
    if reason == "connect timeout":
        return "timeout"
    return reason.rsplit(": ", 1)[-1].replace(" ", "_")


def families(doc: Doc) -> Iterator[Metric]:
    tot, lc = doc["totals"], doc["listener"]
    g = GaugeMetricFamily(
        "pep_connections_active", "Connections being connected upstream or relayed."
    )
    g.add_metric([], tot["active"])
    yield g
    c = CounterMetricFamily("pep_connections", "Connections split (upstream connect succeeded).")
    c.add_metric([], lc.get("split", 0))
    yield c
    c = CounterMetricFamily("pep_connections_closed", "Split connections that have closed.")
    c.add_metric([], tot["closed"])
    yield c
    for key, (name, text) in _LISTENER.items():
        c = CounterMetricFamily(name, text)
        c.add_metric([], lc.get(key, 0))
        yield c
    c = CounterMetricFamily(
        "pep_relayed_bytes", "Bytes relayed, live connections included.", labels=["direction"]
    )
    c.add_metric(["up"], tot["bytes_up"])  # client -> server
    c.add_metric(["down"], tot["bytes_down"])
    yield c

    syn = doc["syn"]
    for key, value in syn.items():
        c = CounterMetricFamily(f"pep_syn_{key}", _SYN_HELP.get(key, f"SYN reader: {key}."))
        c.add_metric([], value)
        yield c
    c = CounterMetricFamily(
        "pep_syn_unsplit", "Queued packets accepted without the split mark, for any reason."
    )
    c.add_metric([], syn.get("queued", 0) - syn.get("split", 0))
    yield c

    c = CounterMetricFamily(
        "pep_upstream_connect_failures",
        "Upstream connects that failed (the client was reset), by reason.",
        labels=["reason"],
    )
    failures: dict[str, int] = {}
    for reason, n in doc["upstream_failures"].items():
        label = reason_label(reason)
        failures[label] = failures.get(label, 0) + n
    for label, n in sorted(failures.items()):
        c.add_metric([label], n)
    yield c

    lat = doc["connect_latency"]
    buckets, running = [], 0
    for le, n in zip([*lat["le"], float("inf")], lat["counts"], strict=True):
        running += n
        buckets.append((_le(le), running))
    h = HistogramMetricFamily(
        "pep_upstream_connect_seconds", "Time to connect to the original destination."
    )
    h.add_metric([], buckets, sum_value=lat["sum"])
    yield h

    fl = doc["flows"]
    g = GaugeMetricFamily("pep_flow_table_entries", "SYN records waiting for their connection.")
    g.add_metric([], fl["pending"])
    yield g
    c = CounterMetricFamily("pep_flow_table_evicted", "SYN records evicted: the table was full.")
    c.add_metric([], fl["evicted"])
    yield c
    c = CounterMetricFamily("pep_flow_table_expired", "SYN records never claimed within flow_ttl.")
    c.add_metric([], fl["expired"])
    yield c

    if doc["kernel_queues"] is not None:
        waiting = GaugeMetricFamily(
            "pep_queue_waiting", "Packets waiting in the kernel queue.", labels=["queue"]
        )
        dropped = CounterMetricFamily(
            "pep_queue_dropped", "Packets the kernel queue dropped (queue full).", labels=["queue"]
        )
        user = CounterMetricFamily(
            "pep_queue_user_dropped",
            "Packets dropped because netlink could not deliver them to pep.",
            labels=["queue"],
        )
        for kq in doc["kernel_queues"]:
            q = [str(kq["queue"])]
            waiting.add_metric(q, kq["waiting"])
            dropped.add_metric(q, kq["queue_dropped"])
            user.add_metric(q, kq["user_dropped"])
        yield from (waiting, dropped, user)

    yield from _link_families(doc.get("link"))
    yield from _peer_families(doc.get("peer"))
    g = GaugeMetricFamily("pep_draining", "1 after SIGTERM while live connections finish.")
    g.add_metric([], 1 if doc["state"] == "draining" else 0)
    yield g
    if doc["workers"]:
        g = GaugeMetricFamily("pep_workers_up", "Worker processes answering.")
        g.add_metric([], sum(1 for w in doc["workers"] if not w["error"]))
        yield g
    c = CounterMetricFamily("pep_reloads", "SIGHUP reloads, by result.", labels=["result"])
    c.add_metric(["ok"], doc["reloads"]["ok"])
    c.add_metric(["failed"], doc["reloads"]["failed"])
    yield c


def _each(section: str, values: dict[str, Any], labels: dict[str, str]) -> Iterator[Metric]:
    """One family per row of ``_SECTIONS`` for ``section``, its value from ``values``, each
    with the same labels."""
    for where, kind, name, key, text in _SECTIONS:
        if where == section:
            cls = GaugeMetricFamily if kind == "gauge" else CounterMetricFamily
            m = cls(name, text, labels=list(labels))
            m.add_metric(list(labels.values()), values[key])
            yield m


# The [link] and [peer] sections of the status document as metrics: (section, kind, name, the
# document's key, help).
_SECTIONS = (
    ("link", "gauge", "pep_link_egress_rate_bits", "egress_bps", "[link] egress_rate."),
    ("link", "gauge", "pep_link_ingress_rate_bits", "ingress_bps", "[link] ingress_rate."),
    ("link", "gauge", "pep_link_pacing_capacity_bits", "pacing_capacity_bps", "Payload rate."),
    ("link", "gauge", "pep_link_send_rate_bits", "send_rate_bps", "Payload bit/s sent now."),
    ("link", "gauge", "pep_link_rtt_seconds", "rtt_s", "[link] rtt."),
    ("link", "counter", "pep_link_legs_opened", "flows_total", "Link legs opened."),
    ("link", "counter", "pep_link_sent_bytes", "bytes_sent", "Bytes sent, resends included."),
    ("link", "counter", "pep_link_retransmits", "retransmits", "Segments retransmitted."),
    ("link", "counter", "pep_link_congestion_restarts", "congestion_restarts", "BBR refreshes."),
    ("link", "counter", "pep_link_sharer_ticks", "ticks", "Ticks the sharer sampled its legs."),
    ("link", "counter", "pep_link_sharer_cpu_seconds", "tick_cpu_s", "CPU those ticks took."),
    ("link_state", "gauge", "pep_link_up", "up", "1 while the link is up, 0 while it is down."),
    ("link_state", "counter", "pep_link_outages", "outages", "Outages of the link so far."),
    ("link_state", "counter", "pep_link_outage_seconds", "outage_seconds", "Time it was down."),
    ("pool", "gauge", "pep_peer_pool_target", "target", "Pooled connections aimed for."),
    ("pool", "gauge", "pep_peer_pool_ready", "ready", "Pooled connections ready for a flow."),
    ("pool", "gauge", "pep_peer_pool_in_use", "in_use", "Pooled connections carrying a flow."),
    ("pool", "counter", "pep_peer_pool_opened", "opened", "Pooled connections authenticated."),
    ("pool", "counter", "pep_peer_fallback", "fallback", "Flows that went direct."),
    ("pool", "counter", "pep_peer_died_idle", "died_idle", "Pooled connections lost idle."),
    ("pool", "counter", "pep_peer_connect_failures", "connect_failed", "Connects that failed."),
    ("listener", "counter", "pep_peer_accepted", "accepted", "Peers that proved the key."),
    ("listener", "counter", "pep_peer_flows", "flows", "Flows the peer listener relayed."),
    ("listener", "counter", "pep_peer_upstream_failures", "upstream_failed", "Peer flows failed."),
)


def _link_families(link: dict[str, Any] | None) -> Iterator[Metric]:
    """The [link] section (pep.link.pacer's snapshot): nothing without a [link] table."""
    if not link:
        return
    iface = {"interface": link["interface"]}
    yield from _each("link", link, iface)
    if link.get("state"):
        yield from _each("link_state", link["state"], iface)
    g = GaugeMetricFamily(
        "pep_link_legs",
        "Link legs open, by whether they are sending.",
        labels=["interface", "state"],
    )
    g.add_metric([link["interface"], "active"], link["flows_active"])
    g.add_metric([link["interface"], "idle"], link["flows"] - link["flows_active"])
    yield g
    yield from _terminal_families(link.get("terminals") or [])


# Per terminal ([link] plans, pep.link.plans): (kind, name, the row's key, help). The label set
# is bounded: the terminals configured (those that have had a leg) and "(other)" for
# addresses in none.
_TERMINAL = (
    ("gauge", "pep_terminal_share_bits", "share_bps", "Pacing caps of its active legs, payload."),
    ("gauge", "pep_terminal_send_rate_bits", "send_rate_bps", "Payload bit/s its legs send now."),
    ("counter", "pep_terminal_sent_bytes", "bytes_sent", "Bytes its link legs sent."),
    ("counter", "pep_terminal_retransmits", "retransmits", "Segments its legs retransmitted."),
    ("counter", "pep_terminal_lost", "lost", "Retransmitted segments not D-SACKed: drops."),
)


def _terminal_families(rows: list[dict[str, Any]]) -> Iterator[Metric]:
    if not rows:
        return
    for kind, name, key, text in _TERMINAL:
        cls = GaugeMetricFamily if kind == "gauge" else CounterMetricFamily
        m = cls(name, text, labels=["terminal"])
        for row in rows:
            m.add_metric([row["name"]], row[key])
        yield m
    legs = GaugeMetricFamily(
        "pep_terminal_legs",
        "Its link legs open, by whether they send.",
        labels=["terminal", "state"],
    )
    plan = GaugeMetricFamily(
        "pep_terminal_plan_bits", "Its plan, bit/s.", labels=["terminal", "direction"]
    )
    for row in rows:
        legs.add_metric([row["name"], "active"], row["legs_active"])
        legs.add_metric([row["name"], "idle"], row["legs"] - row["legs_active"])
        if row["egress_bps"] is not None:
            plan.add_metric([row["name"], "egress"], row["egress_bps"])
            plan.add_metric([row["name"], "ingress"], row["ingress_bps"])
    yield from (legs, plan)


def _peer_families(peer: dict[str, Any] | None) -> Iterator[Metric]:
    """The [peer] section: the pool (near end) and the peer listener (far end)."""
    if not peer:
        return
    pool, far = peer.get("pool"), peer.get("listener")
    auth = CounterMetricFamily(
        "pep_peer_auth_failures", "Handshakes that failed, by end.", labels=["side"]
    )
    if pool:
        yield from _each("pool", pool, {})
        auth.add_metric(["near"], pool["auth_failed"])
    if far:
        yield from _each("listener", far, {})
        auth.add_metric(["far"], far["auth_failed"])
        refused = CounterMetricFamily(
            "pep_peer_refused", "Peer connections closed unserved, by reason.", labels=["reason"]
        )
        for reason in ("not_allowed", "bad_header", "forbidden"):
            refused.add_metric([reason], far[reason])
        yield refused
    yield auth


def _le(bound: float) -> str:
    return "+Inf" if bound == float("inf") else repr(float(bound))


class _DocCollector:
    def __init__(self, doc: Doc) -> None:
        self.doc = doc

    def collect(self) -> Iterator[Metric]:
        return families(self.doc)


def exposition(doc: Doc, accept: str = "") -> tuple[bytes, str]:
    """(body, content type) for one scrape, in the format the Accept header asks for."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(_DocCollector(doc))
    encoder, content_type = choose_encoder(accept)
    return encoder(registry), content_type


# --------------------------------------------------------------------------------------------
# IO: the HTTP endpoint

_MAX_REQUEST = 16 * 1024  # request line and headers; Prometheus sends a few hundred bytes


def _parse_request(head: bytes) -> tuple[str, str, dict[str, str]]:
    lines = head.decode("latin-1").split("\r\n")
    method, target = [*lines[0].split(), "", ""][:2]
    headers = {}
    for line in lines[1:]:
        name, sep, value = line.partition(":")
        if sep:
            headers[name.strip().lower()] = value.strip()
    return method, target, headers


def _response(status: str, content_type: str, body: bytes, head_only: bool = False) -> bytes:
    head = (
        f"HTTP/1.1 {status}\r\nContent-Type: {content_type}\r\n"
        f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n"
    ).encode()
    return head if head_only else head + body


async def open_listeners(listen: str) -> list[trio.SocketListener]:
    """Bind ``metrics_listen`` ("ADDRESS:PORT") now, so a clash fails the start cleanly."""
    host, port = parse_listen_address(listen)
    try:
        return await trio.open_tcp_listeners(port, host=host)
    except OSError as e:
        raise OSError(e.errno, f"metrics_listen {listen}: cannot listen: {describe(e)}") from None


async def serve_metrics(
    listeners: list[trio.SocketListener],
    get_doc: Callable[[], Awaitable[Doc]],
    *,
    task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Serve ``GET /metrics`` on listeners from ``open_listeners`` until cancelled."""

    async def handle(stream: trio.SocketStream) -> None:
        with trio.move_on_after(10):  # a client that stalls must not pin a task
            try:
                head = b""
                while b"\r\n\r\n" not in head and len(head) < _MAX_REQUEST:
                    chunk = await stream.receive_some(4096)
                    if not chunk:
                        return
                    head += chunk
                method, target, headers = _parse_request(head)
                path = target.split("?", 1)[0]
                if method not in ("GET", "HEAD"):
                    reply = _response("405 Method Not Allowed", "text/plain", b"GET only\n")
                elif path not in ("/metrics", "/"):
                    reply = _response("404 Not Found", "text/plain", b"see /metrics\n")
                else:
                    try:
                        body, ctype = exposition(await get_doc(), headers.get("accept", ""))
                    except Exception:  # a bug here must cost one scrape, not the daemon
                        log.exception("metrics: building the exposition failed")
                        reply = _response("500 Internal Server Error", "text/plain", b"see log\n")
                    else:
                        reply = _response("200 OK", ctype, body, head_only=method == "HEAD")
                await stream.send_all(reply)
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                pass
            finally:
                await trio.aclose_forcefully(stream)

    await trio.serve_listeners(handle, listeners, task_status=task_status)
