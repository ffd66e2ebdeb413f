"""Hostile netlink messages and packets (pure, hypothesis), against the NFQUEUE codec and the
verdict core.

tests/capture/test_nfq_codec.py and tests/capture/test_syn.py already fuzz the decoders with
arbitrary and mutated bytes; what is added here is structure: messages built from random
attribute lists (nested, oversized, wrong lengths, unknown types) and IPv4 packets with random
options, fragment fields and protocols, checked for the property the daemon relies on: every
queued packet gets exactly one verdict. The same packets sent to the real daemon:
tests/reliability/test_badinput.py.
"""

from __future__ import annotations

import socket
import struct

from hypothesis import given, settings
from hypothesis import strategies as st

from pep.capture import nfq_codec as nfq
from pep.capture.flows import FlowTable
from pep.capture.syn import NotSyn, SynInfo, parse_syn
from pep.capture.syn_queue import Decider, SynCounters
from pep.config import Config
from tests.helpers.packets import (
    ipv4_packet,
    nla,
    tcp_segment,
)

# --- structured fuzzing of the NFQUEUE codec and the verdict core (pure) --------------------


attr_types = st.integers(0, 20) | st.sampled_from([0x8000 | 11, 0x4000 | 3, 0xC000 | 10, 0xFFFF])


@st.composite
def attributes(draw: st.DrawFn, depth: int = 0) -> bytes:
    """One attribute: any type (with nesting/byte-order flags), a payload that is random,
    oversized or itself a list of attributes, and a declared length that may lie."""
    atype = draw(attr_types)
    kind = draw(st.sampled_from(["bytes", "u32", "nested", "big"] if depth < 2 else ["bytes"]))
    if kind == "nested":
        payload = b"".join(draw(st.lists(attributes(depth + 1), max_size=4)))
        atype |= 0x8000  # NLA_F_NESTED
    elif kind == "u32":
        payload = draw(st.binary(min_size=0, max_size=6))
    elif kind == "big":
        payload = bytes(draw(st.integers(1000, 65000)))  # an oversized payload
    else:
        payload = draw(st.binary(max_size=64))
    lie = draw(st.none() | st.integers(0, 0xFFFF))
    return nla(atype, payload, lie)


@st.composite
def packet_messages(draw: st.DrawFn) -> tuple[bytes, int | None]:
    """A PACKET message; returns it and its packet id when PACKET_HDR is valid and first."""
    queue = draw(st.integers(0, 0xFFFF))
    body = struct.pack("=BBH", socket.AF_INET, 0, socket.htons(queue))
    packet_id = None
    if draw(st.booleans()):
        packet_id = draw(st.integers(0, 0xFFFFFFFF))
        body += nla(1, struct.pack(">IHB", packet_id, 0x0800, 1))
    body += b"".join(draw(st.lists(attributes(), max_size=6)))
    declared = 16 + len(body)
    if draw(st.integers(0, 9)) == 0:  # sometimes a lying netlink length too
        declared = draw(st.integers(0, declared + 100))
        packet_id = None
    return struct.pack("=IHHII", declared, 0x0300, 0, 0, 0) + body, packet_id


def verdicts_for(messages: list[nfq.Packet | nfq.Ack | nfq.Malformed]) -> list[int]:
    decider = Decider(Config(interfaces=("x",)), FlowTable(1024, 30), SynCounters())
    verdicts, holds = decider.decide(messages)
    assert not holds
    return [v.packet_id for v in verdicts]


@given(st.lists(packet_messages(), min_size=1, max_size=5))
@settings(max_examples=400, deadline=None)
def test_every_decodable_packet_id_gets_exactly_one_verdict(
    msgs: list[tuple[bytes, int | None]],
) -> None:
    buf = b"".join(m + b"\0" * (-len(m) % 4) for m, _ in msgs)
    parsed = nfq.parse_messages(buf)
    assert all(isinstance(m, nfq.Packet | nfq.Ack | nfq.Malformed) for m in parsed)
    ids = [m.packet_id for m in parsed if getattr(m, "packet_id", None) is not None]
    assert verdicts_for(parsed) == ids  # one verdict per packet we could name, in order
    # A message whose netlink header is sound and whose PACKET_HDR comes first is always
    # verdicted, whatever follows it; the walk stops at the first unsound header.
    for (_, packet_id), m in zip(msgs, parsed, strict=False):
        if packet_id is None or isinstance(m, nfq.Ack):
            break
        assert m.packet_id == packet_id


OPTION_KINDS = st.sampled_from([0, 1, 7, 68, 130, 131, 137, 148, 255])


@st.composite
def ipv4_options(draw: st.DrawFn) -> bytes:
    """Up to 40 bytes of IPv4 options: real kinds (record route, timestamp, security, router
    alert, ...) with right or wrong lengths, or plain garbage."""
    out = b""
    for kind in draw(st.lists(OPTION_KINDS, max_size=6)):
        if kind in (0, 1):
            out += bytes([kind])
        else:
            body = draw(st.binary(max_size=10))
            out += bytes([kind, draw(st.sampled_from([len(body) + 2, 0, 1, 255]))]) + body
    return out[:40]


@given(ipv4_options(), st.integers(0, 65535), st.integers(0, 65535))
@settings(max_examples=500)
def test_ipv4_options_never_shift_the_tcp_header(opts: bytes, sport: int, dport: int) -> None:
    pkt = ipv4_packet("10.1.1.1", "10.2.2.2", tcp_segment("10.1.1.1", "10.2.2.2", sport, dport),
                      options=opts)  # fmt: skip
    info = parse_syn(pkt)
    assert isinstance(info, SynInfo) and (info.sport, info.dport) == (sport, dport)


@given(
    st.integers(1, 0x1FFF) | st.just(0),
    st.booleans(),
    st.integers(0, 255),
    st.binary(max_size=80),
)
@settings(max_examples=500)
def test_fragments_and_other_protocols_are_never_syns(
    offset: int, more: bool, proto: int, payload: bytes
) -> None:
    frag = (0x2000 if more else 0) | offset
    seg = tcp_segment("10.1.1.1", "10.2.2.2", 1, 2) if proto == 6 else payload
    result = parse_syn(ipv4_packet("10.1.1.1", "10.2.2.2", seg, proto=proto, frag=frag))
    if frag:
        assert result == NotSyn("fragment")
    elif proto != 6:
        assert result == NotSyn(f"not TCP (protocol {proto})")
    else:
        assert isinstance(result, SynInfo)


# --- odd packets injected into the real daemon's queue --------------------------------------
