"""Unit tests for the link's pure parts: units, BDP and route metrics, the shares, the codecs."""

from __future__ import annotations

import socket
import struct

import pytest
from hypothesis import given
from hypothesis import strategies as st

from pep import config
from pep.config import units
from pep.config.link import Link, default_congestion, mss_for
from pep.link import routequery, tcpinfo
from pep.link.fairshare import HEADROOM, ShareTable, fair_shares
from pep.support import netlink

GEO_PEPB = Link("sat0", 0.6, 20_000_000, 5_000_000, "bbr")


# --- units ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "bps"),
    [
        ("20mbit", 20_000_000),
        ("20M", 20_000_000),
        ("512kbit", 512_000),
        ("1gbit", 1_000_000_000),
        ("2.5mbit/s", 2_500_000),
        ("100bit", 100),
        (" 5 Mbit ", 5_000_000),
    ],
)
def test_parse_rate(text: str, bps: int) -> None:
    assert units.parse_rate(text) == bps


@pytest.mark.parametrize("text", ["20", "fast", "20 parsecs", "-5mbit", "", "mbit"])
def test_parse_rate_needs_a_number_and_a_unit(text: str) -> None:
    with pytest.raises(ValueError, match="with a unit"):
        units.parse_rate(text)


def test_parse_rate_default_unit_is_for_the_lab() -> None:
    assert units.parse_rate("20", default_unit="mbit") == 20_000_000


@pytest.mark.parametrize(
    ("text", "s"), [("600ms", 0.6), ("0.6s", 0.6), ("1s", 1.0), ("40 ms", 0.04)]
)
def test_parse_duration(text: str, s: float) -> None:
    assert units.parse_duration(text) == pytest.approx(s)


@pytest.mark.parametrize("text", ["600", "600us", "soon", "1h"])
def test_parse_duration_needs_ms_or_s(text: str) -> None:
    with pytest.raises(ValueError, match=r"600ms or 0\.6s"):
        units.parse_duration(text)


def test_formats() -> None:
    assert units.format_rate(20_000_000) == "20 Mbit/s"
    assert units.format_rate(512_000) == "512 kbit/s"
    assert units.format_duration(0.6) == "600 ms"
    assert units.format_duration(1.5) == "1.5 s"


# --- the link's numbers -------------------------------------------------------------------------


def test_bdp_and_route_metrics_geo() -> None:
    assert GEO_PEPB.bdp("egress") == 1_500_000  # 20 Mbit/s x 600 ms
    assert GEO_PEPB.bdp("ingress") == 375_000
    # ceil(1.5 MB / 1448) = 1036 segments, ceil(375 kB / 1448) = 259: what the lab set by hand
    assert GEO_PEPB.route_metrics(1500) == {"initcwnd": 1036, "initrwnd": 259}
    assert mss_for(1500, 6) == 1428
    assert GEO_PEPB.route_metrics(1500, 6) == {"initcwnd": 1051, "initrwnd": 263}


def test_route_metrics_are_bounded() -> None:
    tiny = Link("x", 0.001, 8_000, 8_000, None)
    assert tiny.route_metrics(1500) == {"initcwnd": 10, "initrwnd": 10}
    huge = Link("x", 5.0, 400_000_000_000, 8_000, None)
    assert huge.route_metrics(1500)["initcwnd"] == 65535


def test_buffers_are_two_bdps_within_bounds() -> None:
    assert GEO_PEPB.sndbuf == 3_000_000
    assert GEO_PEPB.rcvbuf == 750_000
    assert Link("x", 0.001, 8_000, 8_000, None).sndbuf == 256 * 1024
    assert Link("x", 5.0, 400_000_000_000, 8_000, None).sndbuf == 1 << 30


def test_pacing_capacity_counts_payload_of_ethernet_frames() -> None:
    # 20 Mbit/s of 1514-byte frames carry 1448 payload bytes each
    assert GEO_PEPB.pacing_capacity(1500) == pytest.approx(2_500_000 * 1448 / 1514)


def test_tick_and_floor_follow_the_rtt() -> None:
    assert GEO_PEPB.tick == pytest.approx(0.05)
    assert Link("x", 0.04, 1, 1, None).tick == pytest.approx(0.01)
    assert Link("x", 0.3, 1, 1, None).tick == pytest.approx(0.025)
    assert GEO_PEPB.min_share == pytest.approx(2 * 1448 / 0.6)


LINK = {"interface": "sat0", "rtt": "600ms", "egress_rate": "20mbit", "ingress_rate": "5mbit"}


def test_link_table_is_parsed_with_units() -> None:
    cfg = config.build({"interfaces": ["eth1"], "link": LINK})
    assert cfg.link == Link("sat0", 0.6, 20_000_000, 5_000_000, default_congestion())
    assert config.build({"interfaces": ["eth1"]}).link is None  # no [link]: as before


@pytest.mark.parametrize(
    ("change", "key", "message"),
    [
        ({"rtt": "600"}, "link.rtt", "with a unit such as 600ms"),
        ({"rtt": "0.5ms"}, "link.rtt", "between 1 ms and 5 s"),
        ({"rtt": "6s"}, "link.rtt", "between 1 ms and 5 s"),
        ({"egress_rate": "0mbit"}, "link.egress_rate", "between 8 kbit/s and 400 Gbit/s"),
        ({"egress_rate": 20_000_000}, "link.egress_rate", "with a unit such as 20mbit"),
        ({"ingress_rate": "5 parsecs"}, "link.ingress_rate", "with a unit"),
        ({"interface": "sat!0"}, "link.interface", "not a valid interface name"),
        ({"congestion": "nosuchcc"}, "link.congestion", "not available on this kernel"),
        ({"speed": 1}, "link.speed", "unknown key"),
        ({"interface": None}, "link.interface", "is required"),
    ],
)
def test_bad_link_values_name_the_key(change: dict[str, object], key: str, message: str) -> None:
    table = {k: v for k, v in (LINK | change).items() if v is not None}
    with pytest.raises(config.ConfigError) as e:
        config.build({"interfaces": ["eth1"], "link": table})
    assert e.value.key == key
    assert message in str(e.value)


# --- fair shares ----------------------------------------------------------------------------------


def test_equal_shares_when_everyone_wants_all() -> None:
    assert fair_shares(60.0, [None, None, None]) == [20.0, 20.0, 20.0]


def test_max_min_a_slow_flow_leaves_its_rest_to_others() -> None:
    shares = fair_shares(60.0, [5.0, None, None])
    assert shares == [5.0, 27.5, 27.5]
    assert sum(shares) == pytest.approx(60.0)


def test_what_nobody_wants_is_spread_over_all() -> None:
    shares = fair_shares(60.0, [5.0, 10.0])
    assert shares == [27.5, 32.5]
    assert sum(shares) == pytest.approx(60.0)


def test_floor_and_empty() -> None:
    assert fair_shares(10.0, []) == []
    assert fair_shares(10.0, [None] * 20, floor=1.0) == [1.0] * 20


@given(
    st.floats(1.0, 1e9),
    st.lists(st.one_of(st.none(), st.floats(0.0, 1e9)), min_size=1, max_size=50),
)
def test_shares_add_up_and_respect_demands(capacity: float, demands: list[float | None]) -> None:
    shares = fair_shares(capacity, demands)
    assert sum(shares) == pytest.approx(capacity, rel=1e-6)
    fair = capacity / len(demands)
    for d, s in zip(demands, shares, strict=True):
        assert s >= min(d if d is not None else fair, fair) - 1e-6 * capacity  # max-min


def test_table_a_waking_flow_gets_its_max_min_share_at_once() -> None:
    t = ShareTable(capacity=6000.0)
    for fid in (1, 2):
        t.add(fid)
        t.wake(fid)
    t.reshare()
    t.sample(1, sent=100, written=200, waiting=0, dt=0.1)  # 1000 B/s and being fed
    t.sample(2, sent=1000, written=2000, waiting=900, dt=0.1)  # backlogged
    t.reshare()
    t.add(3)
    cap = t.wake(3)  # takes from the backlogged flow, not from the slow one
    assert cap == pytest.approx((6000.0 - 1000 * HEADROOM) / 2)


def test_table_new_flow_gets_its_share_at_once_and_others_follow() -> None:
    t = ShareTable(capacity=60.0)
    assert t.add(1) == 60.0  # alone: the whole link, before its first byte
    assert t.wake(1) is None  # unchanged
    assert t.add(2) == 30.0
    assert t.wake(2) is None  # it has its share since add: nothing to re-set
    assert t.flows[2].cap == 30.0
    assert t.dirty
    assert t.reshare() == {1: 30.0}  # the first flow gives half back
    assert not t.dirty


def test_table_idle_flow_gives_its_share_back() -> None:
    t = ShareTable(capacity=6000.0)
    for fid in (1, 2):
        t.add(fid)
        t.wake(fid)
    t.reshare()
    t.sample(1, sent=1000, written=1000, waiting=500, dt=0.1)  # backlogged
    t.sample(2, sent=10, written=20, waiting=0, dt=0.1)  # 100 B/s, fed more, none waiting
    slow = 10 / 0.1 * HEADROOM
    assert t.reshare() == {1: pytest.approx(6000.0 - slow), 2: pytest.approx(slow)}
    t.sample(2, sent=20, written=20, waiting=0, dt=0.1)  # sent the rest, given nothing: idle
    assert list(t.active) == [1]
    assert t.reshare() == {1: 6000.0}


def test_table_written_but_not_yet_sent_stays_active() -> None:
    t = ShareTable(capacity=60.0)
    t.add(1)
    t.wake(1)
    t.sample(1, sent=0, written=100, waiting=0, dt=0.1)
    assert list(t.active) == [1]


def test_table_removing_an_active_flow_reshares_at_once() -> None:
    t = ShareTable(capacity=60.0)
    for fid in (1, 2, 3):
        t.add(fid)
        t.wake(fid)
    t.reshare()
    t.remove(3)
    assert t.dirty
    assert t.reshare() == {1: 30.0, 2: 30.0}
    t.remove(99)  # unknown: nothing happens


def test_table_small_changes_are_not_reapplied() -> None:
    t = ShareTable(capacity=60.0)
    t.add(1)
    t.wake(1)
    t.resize(60.5, 0.0)  # under TOLERANCE
    assert t.reshare() == {}
    t.resize(30.0, 0.0)
    assert t.reshare() == {1: 30.0}


# --- tcp_info ---------------------------------------------------------------------------


def test_tcpinfo_decodes_offsets_of_the_uapi_struct() -> None:
    raw = bytearray(tcpinfo.TCP_INFO_LEN)
    raw[0] = 1  # TCP_ESTABLISHED
    struct.pack_into("=I", raw, 100, 7)  # total_retrans
    struct.pack_into("=Q", raw, 112, 2_500_000)  # max_pacing_rate
    struct.pack_into("=I", raw, 144, 4096)  # notsent_bytes
    struct.pack_into("=Q", raw, 200, 10**9)  # bytes_sent
    info = tcpinfo.decode(bytes(raw))
    assert (info.state, info.total_retrans, info.max_pacing_rate) == (1, 7, 2_500_000)
    assert (info.notsent_bytes, info.bytes_sent) == (4096, 10**9)


def test_tcpinfo_short_answer_reads_missing_fields_as_zero() -> None:
    info = tcpinfo.decode(bytes([1]) + bytes(103))
    assert info.state == 1 and info.bytes_sent == 0


def test_tcpinfo_on_a_real_socket() -> None:
    with socket.create_server(("127.0.0.1", 0)) as srv:
        c = socket.create_connection(srv.getsockname())
        a, _ = srv.accept()
        with c, a:
            c.setsockopt(socket.SOL_SOCKET, 47, 123456)  # SO_MAX_PACING_RATE
            c.sendall(b"x" * 1000)
            assert a.recv(2000)
            info = tcpinfo.read(c)
    assert info.max_pacing_rate == 123456
    assert info.bytes_sent == 1000


# --- route queries ----------------------------------------------------------------------


def _answer(seq: int, oif: int | None, mtype: int = routequery.RTM_NEWROUTE) -> bytes:
    attrs = b""
    if oif is not None:
        attrs += struct.pack("=HHI", 8, routequery.RTA_OIF, oif)
    body = bytes(12) + struct.pack("=HH4s", 8, 1, b"\x0a\x00\x00\x01") + attrs
    return struct.pack("=IHHII", 16 + len(body), mtype, 0, seq, 0) + body


def test_encode_get_is_an_rtm_getroute_for_a_host() -> None:
    msg = routequery.encode_get(socket.AF_INET, socket.inet_pton(socket.AF_INET, "10.0.0.1"), 7)
    length, mtype, flags, seq, _ = struct.unpack_from("=IHHII", msg)
    assert (length, mtype, flags, seq) == (len(msg), 26, 1, 7)
    assert msg[16] == socket.AF_INET and msg[17] == 32  # family, dst_len
    assert msg[-4:] == b"\x0a\x00\x00\x01"


def test_decode_oif_finds_the_answer_to_its_request() -> None:
    assert routequery.decode_oif(_answer(5, 3), 5) == 3
    assert routequery.decode_oif(_answer(4, 9) + _answer(5, 3), 5) == 3  # a late answer first
    assert routequery.decode_oif(_answer(5, None), 5) is None
    assert routequery.decode_oif(_answer(5, 3, mtype=netlink.NLMSG_ERROR), 5) is None


@given(st.binary(max_size=200), st.integers(0, 2**32 - 1))
def test_decode_oif_is_total(buf: bytes, seq: int) -> None:
    result = routequery.decode_oif(buf, seq)
    assert result is None or isinstance(result, int)


def test_route_cache_asks_once_per_ttl() -> None:
    now = [0.0]
    cache = routequery.RouteCache(ttl=5.0, clock=lambda: now[0])
    assert cache.oif("127.0.0.1") == socket.if_nametoindex("lo")
    cache.oif("127.0.0.1")
    assert cache.asked == 1
    now[0] = 6.0
    cache.oif("127.0.0.1")
    assert cache.asked == 2
    cache.close()


LINK_DOC = {
    "interface": "sat0",
    "rtt_s": 0.6,
    "egress_bps": 20_000_000,
    "ingress_bps": 5_000_000,
    "congestion": "bbr",
    "pacing_capacity_bps": 19_128_000,
    "flows": 6,
    "flows_active": 4,
    "flows_total": 120,
    "send_rate_bps": 18_500_000,
    "bytes_sent": 9_000_000,
    "retransmits": 12,
    "congestion_restarts": 3,
    "ticks": 400,
    "tick_cpu_s": 0.02,
}


def test_status_and_metrics_show_the_link() -> None:
    from pep.ops.status import document as status
    from pep.ops.status import metrics
    from pep.ops.status import render as status_render
    from tests.helpers.status import sample_doc

    doc = sample_doc()
    doc["link"] = dict(LINK_DOC)
    text = status_render.render(doc)
    assert "link sat0: 600 ms RTT, egress 20 Mbit/s" in text
    assert "4 of 6 link legs active, 12 retransmitted segments, 3 congestion-control" in text
    body = metrics.exposition(doc)[0].decode()
    assert 'pep_link_congestion_restarts_total{interface="sat0"} 3.0' in body
    assert 'pep_link_retransmits_total{interface="sat0"} 12.0' in body
    assert 'pep_link_legs{interface="sat0",state="idle"} 2.0' in body
    workers = [(i, sample_doc() | {"link": dict(LINK_DOC)}) for i in range(2)]
    merged = status.merge(sample_doc() | {"link": dict(LINK_DOC)}, workers)
    assert merged["link"]["congestion_restarts"] == 6  # the workers' counts, summed
    assert merged["link"]["interface"] == "sat0"
