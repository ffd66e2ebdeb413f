"""SYN parser: real captured SYNs, hand-built edge cases, and totality on any bytes (pure)."""

from __future__ import annotations

import ipaddress
import socket
import struct

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pep.capture.syn import NotSyn, SynInfo, parse_syn
from tests.helpers.packets import ACK, FIN, RST, SYN, SYN_V4, SYN_V6, ipv4_packet, tcp_segment

# --- a test-only packet builder ---------------------------------------------------------------


def opt_mss(v: int) -> bytes:
    return struct.pack("!BBH", 2, 4, v)


def opt_ws(v: int) -> bytes:
    return struct.pack("!BBB", 3, 3, v)


def opt_sack() -> bytes:
    return b"\x04\x02"


def opt_ts(val: int, ecr: int) -> bytes:
    return struct.pack("!BBII", 8, 10, val, ecr)


LINUX_OPTIONS = opt_mss(1460) + opt_sack() + opt_ts(1000, 0) + b"\x01" + opt_ws(7)


def tcp(
    sport: int = 40000,
    dport: int = 80,
    flags: int = SYN,
    options: bytes = b"",
    data: bytes = b"",
    doff: int | None = None,
) -> bytes:
    return tcp_segment(None, None, sport, dport, flags, options, doff, seq=12345, payload=data)


def ipv4(
    payload: bytes,
    src: str = "10.0.0.1",
    dst: str = "192.0.2.7",
    *,
    tos: int = 0,
    ttl: int = 64,
    proto: int = 6,
    frag: int = 0x4000,  # DF
    options: bytes = b"",
    total: int | None = None,
) -> bytes:
    return ipv4_packet(
        src, dst, payload, tos=tos, ttl=ttl, proto=proto, frag=frag, options=options, total=total
    )


def ext(next_header: int, body: bytes = b"\x01\x04\0\0\0\0") -> bytes:
    """A hop-by-hop / routing / destination options header: 2 bytes + body, 8-byte units."""
    body += b"\0" * (-(2 + len(body)) % 8)
    return bytes([next_header, (2 + len(body)) // 8 - 1]) + body


def ipv6(
    payload: bytes,
    src: str = "2001:db8::1",
    dst: str = "2001:db8:1::2",
    *,
    next_header: int = 6,
    tclass: int = 0,
    hlim: int = 64,
    plen: int | None = None,
) -> bytes:
    if plen is None:
        plen = len(payload)
    head = struct.pack(
        "!IHBB16s16s",
        (6 << 28) | (tclass << 20) | 0x12345, plen, next_header, hlim,
        ipaddress.IPv6Address(src).packed, ipaddress.IPv6Address(dst).packed,
    )  # fmt: skip
    return head + payload


def not_syn(result: SynInfo | NotSyn) -> str:
    assert isinstance(result, NotSyn), result
    return result.reason


# --- real captured SYNs -----------------------------------------------------------------------

# SYN_V4 and SYN_V6 (tests/helpers/packets.py): NFQUEUE payloads captured on kernel 6.18, connect()
# to 127.0.0.1:5001 and to [::1]:5002.


def test_captured_ipv4_syn() -> None:
    assert parse_syn(SYN_V4) == SynInfo(
        family=4,
        src="127.0.0.1",
        sport=45590,
        dst="127.0.0.1",
        dport=5001,
        tos=0,
        ttl=64,
        mss=65495,  # loopback MTU 65536 - 40
        wscale=10,
        sack_permitted=True,
        timestamps=(4027193836, 0),
    )


def test_captured_ipv6_syn() -> None:
    assert parse_syn(SYN_V6) == SynInfo(
        family=6,
        src="::1",
        sport=33920,
        dst="::1",
        dport=5002,
        tos=0,
        ttl=64,
        mss=65476,  # loopback MTU 65536 - 60
        wscale=10,
        sack_permitted=True,
        timestamps=(201858853, 0),
    )


def test_captured_syn_cut_by_a_40_byte_copy_range() -> None:
    assert not_syn(parse_syn(SYN_V4[:40])) == "truncated TCP options"


def test_bytes_like_input() -> None:
    assert parse_syn(bytearray(SYN_V4)) == parse_syn(SYN_V4)
    assert parse_syn(memoryview(b"xx" + SYN_V6)[2:]) == parse_syn(SYN_V6)


# --- IPv4 -------------------------------------------------------------------------------------


def test_ipv4_with_options_tos_and_ttl() -> None:
    router_alert = b"\x94\x04\0\0"
    pkt = ipv4(tcp(1234, 443, options=LINUX_OPTIONS), tos=0xB8, ttl=17, options=router_alert)
    assert parse_syn(pkt) == SynInfo(
        4, "10.0.0.1", 1234, "192.0.2.7", 443, 0xB8, 17, 1460, 7, True, (1000, 0)
    )


def test_syn_without_options() -> None:
    assert parse_syn(ipv4(tcp())) == SynInfo(
        4, "10.0.0.1", 40000, "192.0.2.7", 80, 0, 64, None, None, False, None
    )


def test_syn_with_data_cut_by_copy_range() -> None:
    pkt = ipv4(tcp(options=opt_mss(1400), data=b"x" * 1000))  # e.g. TCP Fast Open
    info = parse_syn(pkt[:100])
    assert isinstance(info, SynInfo) and info.mss == 1400


@pytest.mark.parametrize(
    ("pkt", "reason"),
    [
        (b"", "empty packet"),
        (b"\x45" + b"\0" * 10, "truncated IPv4 header (11 bytes)"),
        (b"\x55" + b"\0" * 40, "not IP (version 5)"),
        (ipv4(b"\0" * 8, proto=17), "not TCP (protocol 17)"),
        (ipv4(tcp(), frag=0x2000), "fragment"),  # MF: first fragment
        (ipv4(tcp(), frag=0x0010), "fragment"),  # offset 128: a later fragment
        (ipv4(tcp(flags=SYN | ACK)), "not a SYN (flags 0x12)"),
        (ipv4(tcp(flags=ACK)), "not a SYN (flags 0x10)"),
        (ipv4(tcp(flags=SYN | RST)), "not a SYN (flags 0x06)"),
        (ipv4(tcp(flags=SYN | FIN)), "not a SYN (flags 0x03)"),
        (ipv4(tcp(doff=4)), "bad TCP data offset 16"),
        (ipv4(tcp(doff=15)), "truncated TCP options"),
        (ipv4(tcp())[:39], "truncated TCP header"),
        (ipv4(tcp(), total=30), "truncated TCP header"),  # total length rules over extra bytes
        (ipv4(tcp(), total=10), "bad IPv4 total length 10"),
        (b"\x44" + ipv4(tcp())[1:], "bad IPv4 header length 16"),
        (b"\x4f" + ipv4(tcp())[1:40], "truncated IPv4 options"),
    ],
)
def test_ipv4_not_syn(pkt: bytes, reason: str) -> None:
    assert not_syn(parse_syn(pkt)) == reason


def test_syn_with_ecn_bits_is_a_syn() -> None:
    info = parse_syn(ipv4(tcp(flags=SYN | 0x40 | 0x80)))  # ECE | CWR: ECN setup SYN
    assert isinstance(info, SynInfo)


# --- IPv6 -------------------------------------------------------------------------------------


def test_ipv6_hop_by_hop_and_destination_options_before_tcp() -> None:
    chain = ext(60) + ext(6, b"\x01\x0c" + b"\0" * 12)  # hop-by-hop -> dstopts (16 bytes) -> TCP
    pkt = ipv6(chain + tcp(5555, 22, options=LINUX_OPTIONS), next_header=0, tclass=0x2E, hlim=3)
    assert parse_syn(pkt) == SynInfo(
        6, "2001:db8::1", 5555, "2001:db8:1::2", 22, 0x2E, 3, 1460, 7, True, (1000, 0)
    )


def test_ipv6_routing_and_ah_headers() -> None:
    ah = bytes([6, 4]) + b"\0" * 22  # (4 + 2) * 4 = 24 bytes
    pkt = ipv6(ext(51) + ah + tcp(), next_header=43)
    info = parse_syn(pkt)
    assert isinstance(info, SynInfo) and info.dport == 80


@pytest.mark.parametrize(
    ("pkt", "reason"),
    [
        (b"\x60" + b"\0" * 38, "truncated IPv6 header (39 bytes)"),
        (ipv6(b"\x06\0\0\0\0\0\0\0" + tcp(), next_header=44), "fragment"),
        (ipv6(ext(44) + b"\x06\0\0\0\0\0\0\0" + tcp(), next_header=0), "fragment"),
        (ipv6(b"\0" * 8, next_header=17), "not TCP (next header 17)"),
        (ipv6(b"\0" * 8, next_header=58), "not TCP (next header 58)"),
        (ipv6(b"\0" * 16, next_header=50), "ESP-encrypted (next header 50)"),
        (ipv6(b"", next_header=59), "no next header (59)"),
        (ipv6(ext(60) * 9 + tcp(), next_header=60), "more than 8 IPv6 extension headers"),
        (ipv6(b"", next_header=0), "truncated IPv6 extension header 0"),
        (ipv6(ext(6, b"\0" * 30) + tcp(), next_header=0)[:60], "truncated TCP header"),
        (ipv6(tcp(flags=SYN | ACK)), "not a SYN (flags 0x12)"),
        (ipv6(tcp(), plen=10), "truncated TCP header"),  # payload length rules over extra bytes
    ],
)
def test_ipv6_not_syn(pkt: bytes, reason: str) -> None:
    assert not_syn(parse_syn(pkt)) == reason


def test_addresses_read_as_socket_accept_reports_them() -> None:
    # The flow table is keyed by the text accept() gives (inet_ntop); Python 3.11's ipaddress
    # would print this one as "::ffff:a00:1".
    info = parse_syn(ipv6(tcp(), "::ffff:10.0.0.1", "2001:db8::1"))
    assert isinstance(info, SynInfo) and info.src == "::ffff:10.0.0.1"
    packed = ipaddress.IPv6Address("::ffff:10.0.0.1").packed
    assert info.src == socket.inet_ntop(socket.AF_INET6, packed)


def test_ipv6_eight_extension_headers_are_fine() -> None:
    assert isinstance(parse_syn(ipv6(ext(60) * 7 + ext(6) + tcp(), next_header=60)), SynInfo)


def test_ipv6_payload_length_zero_uses_the_captured_bytes() -> None:
    assert isinstance(parse_syn(ipv6(tcp(), plen=0)), SynInfo)


# --- TCP options ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "options",
    [
        b"\x02\x00\x05\xb4",  # length 0
        b"\x02\x01\x05\xb4",  # length 1
        b"\x01\x01\x01\x08\x0a\0\0",  # timestamps running past the header
        b"\x01\x01\x01\x02",  # kind in the last byte, length beyond it
        opt_mss(1460) + b"\x1e\x09\0\0",  # unknown kind, length 9 > the 6 bytes left
    ],
)
def test_malformed_options(options: bytes) -> None:
    assert not_syn(parse_syn(ipv4(tcp(options=options)))) == "malformed TCP options"


def test_eol_stops_option_parsing() -> None:
    info = parse_syn(ipv4(tcp(options=opt_mss(1200) + b"\0" + b"\x02\x01\x99\x99")))
    assert isinstance(info, SynInfo) and info.mss == 1200


def test_unknown_options_are_skipped_and_wrong_lengths_ignored() -> None:
    mptcp = b"\x1e\x0c" + b"\0" * 10
    bad_mss = b"\x02\x05\x05\xb4\x00"  # MSS with length 5: skipped, as the kernel does
    options = mptcp + bad_mss + opt_ws(14) + b"\x04\x03\0" + opt_ts(7, 9)
    info = parse_syn(ipv4(tcp(options=options)))
    assert isinstance(info, SynInfo)
    assert (info.mss, info.wscale, info.timestamps) == (None, 14, (7, 9))
    assert not info.sack_permitted


def test_wscale_is_reported_as_sent() -> None:
    info = parse_syn(ipv4(tcp(options=opt_ws(200))))
    assert isinstance(info, SynInfo) and info.wscale == 200


# --- totality ---------------------------------------------------------------------------------

VALID = [
    SYN_V4,
    SYN_V6,
    ipv4(tcp(options=LINUX_OPTIONS), options=b"\x94\x04\0\0"),
    ipv6(ext(60) + ext(43) + ext(6) + tcp(options=LINUX_OPTIONS), next_header=0),
]


@pytest.mark.parametrize("pkt", VALID, ids=["v4", "v6", "v4-ipopts", "v6-ext"])
def test_every_truncation_of_a_valid_syn(pkt: bytes) -> None:
    assert isinstance(parse_syn(pkt), SynInfo)
    for cut in range(len(pkt)):
        assert isinstance(parse_syn(pkt[:cut]), NotSyn)


@given(st.binary(max_size=200))
@settings(max_examples=1000)
def test_never_raises_on_arbitrary_bytes(data: bytes) -> None:
    assert isinstance(parse_syn(data), SynInfo | NotSyn)


@given(
    st.sampled_from(VALID),
    st.lists(st.tuples(st.integers(0, 200), st.integers(0, 255)), min_size=1, max_size=6),
)
@settings(max_examples=1000)
def test_never_raises_on_mutated_syns(pkt: bytes, flips: list[tuple[int, int]]) -> None:
    buf = bytearray(pkt)
    for pos, value in flips:
        buf[pos % len(buf)] = value
    assert isinstance(parse_syn(bytes(buf)), SynInfo | NotSyn)


@st.composite
def syn_cases(draw: st.DrawFn) -> tuple[bytes, SynInfo]:
    v6 = draw(st.booleans())
    src = str(draw(st.ip_addresses(v=6 if v6 else 4)))
    dst = str(draw(st.ip_addresses(v=6 if v6 else 4)))
    sport, dport = draw(st.integers(0, 65535)), draw(st.integers(0, 65535))
    tos, ttl = draw(st.integers(0, 255)), draw(st.integers(0, 255))
    mss = draw(st.none() | st.integers(0, 65535))
    ws = draw(st.none() | st.integers(0, 255))
    sack = draw(st.booleans())
    ts = draw(st.none() | st.tuples(st.integers(0, 2**32 - 1), st.integers(0, 2**32 - 1)))
    opts = []
    if mss is not None:
        opts.append(opt_mss(mss))
    if ws is not None:
        opts.append(opt_ws(ws))
    if sack:
        opts.append(opt_sack())
    if ts is not None:
        opts.append(opt_ts(*ts))
    opts += [b"\x01"] * draw(st.integers(0, 4))  # NOPs anywhere
    opts = draw(st.permutations(opts))
    segment = tcp(sport, dport, options=b"".join(opts))
    if v6:
        pkt = ipv6(segment, src, dst, tclass=tos, hlim=ttl)
    else:
        pkt = ipv4(segment, src, dst, tos=tos, ttl=ttl)
    expected = SynInfo(6 if v6 else 4, src, sport, dst, dport, tos, ttl, mss, ws, sack, ts)
    return pkt, expected


@given(syn_cases())
def test_valid_syns_round_trip(case: tuple[bytes, SynInfo]) -> None:
    pkt, expected = case
    got = parse_syn(pkt)
    assert isinstance(got, SynInfo)
    assert ipaddress.ip_address(got.src) == ipaddress.ip_address(expected.src)
    assert ipaddress.ip_address(got.dst) == ipaddress.ip_address(expected.dst)
    assert got == SynInfo(
        expected.family, got.src, expected.sport, got.dst, expected.dport, expected.tos,
        expected.ttl, expected.mss, expected.wscale, expected.sack_permitted, expected.timestamps,
    )  # fmt: skip
