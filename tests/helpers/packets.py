"""Packets and kernel messages for the tests, in one place: the bytes captured from a real
kernel, and builders for what the tests craft (netlink messages, IPv4 packets, TCP segments).

All of it is pure but the last section, a raw socket in a namespace that sends crafted
packets. The decoders' tests (tests/capture/test_nfq_codec.py, tests/capture/test_syn.py,
tests/capture/test_syn_queue.py) check against the captured bytes; the namespace tests send crafted
packets from the client namespace, where they never leave the namespaces the test created.
"""

from __future__ import annotations

import errno
import ipaddress
import random
import socket
import struct
from collections.abc import Iterable, Iterator

from pep.testing.topology import Topology, in_netns

# --- captured from a real kernel --------------------------------------------------------------

# Captured on kernel 6.18 (x86_64, so netlink headers are little-endian) in a throwaway network
# namespace: queue 7 bound with pep's codec, mangle OUTPUT `-p tcp --syn -j MARK --set-mark 0x2a`
# then `-j NFQUEUE --queue-num 7 --queue-bypass`, copy mode PACKET with copy range 256 (40 for
# the truncated one), SYNs from connect() to 127.0.0.1:5001, [::1]:5002 and 127.0.0.1:5003.
CAPTURED = {
    "ack_bind": "240000000200000101000000de210000000000001c000000020305000100000000000000",
    "ack_params": "240000000200000102000000de2100000000000020000000020305000200000000000000",
    # PARAMS for queue 8, which nobody bound: -ENODEV, with our whole request echoed.
    "err_params_unbound": (
        "340000000200000003000000de210000edffffff2000000002030500030000000000000000000008"
        "090002000000010002000000"
    ),
    "packet_v4": (
        "70000000000300000000000000000000020000070b00010000000001080003000800060000000001"
        "080003000000002a40000a004500003ca38b40004006992e7f0000017f000001b2161389c99c957e"
        "00000000a002ffd7214d00000204ffd70402080af00a19ec000000000103030a"
    ),
    "packet_v6": (
        "840000000003000000000000000000000a0000070b0001000000000286dd03000800060000000001"
        "080003000000002a54000a0060009ae8002806400000000000000000000000000000000100000000"
        "0000000000000000000000018480138add6242e300000000a002ffc46aa800000204ffc40402080a"
        "0c081f25000000000103030a"
    ),
    # copy range 40: the payload stops inside the TCP header, CAP_LEN gives the real length.
    "packet_v4_truncated": (
        "64000000000300000000000000000000020000070b00010000000003080003000800060000000001"
        "080003000000002a08000d000000003c2c000a004500003c23ec4000400618ce7f0000017f000001"
        "9cd2138b148de90100000000a002ffd7981a0000"
    ),
    # VERDICT (NLM_F_ACK set by hand) for packet id 123456, which is not queued: -ENOENT.
    "err_verdict_unknown_id": (
        "340000000200000009000000de210000feffffff20000000010305000900000000000000000000070c"
        "000200000000010001e240"
    ),
    "ack_unbind": "240000000200000105000000de210000000000001c000000020305000500000000000000",
}
RAW = {name: bytes.fromhex(h) for name, h in CAPTURED.items()}
# The NFQUEUE payloads of packet_v4 and packet_v6 above, written out once more so that the
# decoder's tests compare its output with bytes it did not produce: connect() to
# 127.0.0.1:5001 and to [::1]:5002.
SYN_V4 = bytes.fromhex(
    "4500003ca38b40004006992e7f0000017f000001b2161389c99c957e00000000a002ffd7214d00000204ffd7"
    "0402080af00a19ec000000000103030a"
)
SYN_V6 = bytes.fromhex(
    "60009ae80028064000000000000000000000000000000001000000000000000000000000000000018480138a"
    "dd6242e300000000a002ffc46aa800000204ffc40402080a0c081f25000000000103030a"
)
NF_INET_LOCAL_OUT = 3  # the hook the captured packets were queued from

# /proc/net/netfilter/nfnetlink_queue as the kernel prints it
# (seq_show: "%5u %6u %5u %1u %5u %5u %5u %8u %2d\n").
PROC_TEXT = """\
    0  31415     2 2   256     0     0       10  1
    1  27182     0 2   256     5     7       99  1
    7      0     0 2   256     0     0        0  1
"""

# --- netlink messages (the kernel's side of the nfnetlink_queue protocol) ---------------------


def nla(atype: int, payload: bytes, declared: int | None = None) -> bytes:
    """One attribute, padded to 4 bytes; ``declared`` is a length to write instead (a lie)."""
    length = 4 + len(payload) if declared is None else declared
    return struct.pack("=HH", length & 0xFFFF, atype) + payload + b"\0" * (-len(payload) % 4)


def nlmsg(msg_type: int, body: bytes, seq: int = 0, flags: int = 0) -> bytes:
    return struct.pack("=IHHII", 16 + len(body), msg_type, flags, seq, 0) + body


def packet_msg(
    queue: int = 7,
    packet_id: int = 1,
    payload: bytes | None = b"",
    *,
    hw_protocol: int = 0x0800,
    hook: int = 1,
    mark: int | None = None,
    indev: int | None = None,
    outdev: int | None = None,
    cap_len: int | None = None,
    extra: bytes = b"",
) -> bytes:
    """An NFQNL_MSG_PACKET: PACKET_HDR first, then the optional attributes, ``extra``, and the
    payload (None: no PAYLOAD attribute)."""
    body = struct.pack("=BB", socket.AF_INET, 0) + struct.pack(">H", queue)
    body += nla(1, struct.pack(">IHB", packet_id, hw_protocol, hook))
    for atype, value in ((3, mark), (5, indev), (6, outdev), (13, cap_len)):
        if value is not None:
            body += nla(atype, struct.pack(">I", value))
    body += extra
    if payload is not None:
        body += nla(10, payload)
    return nlmsg(0x0300, body)


def error_msg(seq: int, err: int) -> bytes:
    return nlmsg(2, struct.pack("=i", err) + struct.pack("=IHHII", 16, 0x0302, 5, seq, 0), seq)


# --- IPv4 and TCP ------------------------------------------------------------------------------

FIN, SYN, RST, PSH, ACK, URG, ECE, CWR = 0x01, 0x02, 0x04, 0x08, 0x10, 0x20, 0x40, 0x80
MSS_1460 = b"\x02\x04\x05\xb4"


def checksum(data: bytes) -> int:
    """The Internet checksum (RFC 1071)."""
    if len(data) % 2:
        data += b"\0"
    s = sum(struct.unpack(f"!{len(data) // 2}H", data))
    while s >> 16:
        s = (s & 0xFFFF) + (s >> 16)
    return ~s & 0xFFFF


def tcp_segment(
    src: str | None,
    dst: str | None,
    sport: int,
    dport: int,
    flags: int = SYN,
    options: bytes = MSS_1460,
    doff: int | None = None,
    seq: int = 0,
    payload: bytes = b"",
) -> bytes:
    """A TCP segment, options padded with EOL; checksummed over the IPv4 pseudo header of
    ``src`` and ``dst``, or left 0 when they are None (pep's SYN parser does not check it)."""
    options += b"\0" * (-len(options) % 4)
    if doff is None:
        doff = (20 + len(options)) // 4
    head = struct.pack("!HHIIHHHH", sport, dport, seq, 0, (doff << 12) | flags, 64240, 0, 0)
    seg = head + options + payload
    if src is None or dst is None:
        return seg
    pseudo = struct.pack(
        "!4s4sBBH",
        ipaddress.IPv4Address(src).packed,
        ipaddress.IPv4Address(dst).packed,
        0,
        socket.IPPROTO_TCP,
        len(seg),
    )
    csum = checksum(pseudo + seg)
    return seg[:16] + struct.pack("!H", csum) + seg[18:]


def ipv4_packet(
    src: str,
    dst: str,
    payload: bytes,
    *,
    proto: int = socket.IPPROTO_TCP,
    ident: int = 1,
    tos: int = 0,
    ttl: int = 64,
    frag: int = 0,  # flags (MF 0x2000) | offset in 8-byte units
    options: bytes = b"",
    total: int | None = None,
) -> bytes:
    options += b"\0" * (-len(options) % 4)
    ihl = 5 + len(options) // 4
    if total is None:
        total = ihl * 4 + len(payload)
    head = struct.pack(
        "!BBHHHBBH4s4s",
        0x40 | ihl,
        tos,
        total,
        ident,
        frag,
        ttl,
        proto,
        0,
        ipaddress.IPv4Address(src).packed,
        ipaddress.IPv4Address(dst).packed,
    )
    head += options
    head = head[:10] + struct.pack("!H", checksum(head)) + head[12:]
    return head + payload


def raw_syns(src: str, dst: str, dport: int, count: int, seed: int = 1) -> Iterator[bytes]:
    """``count`` SYNs from distinct source ports (wrapping over 1024..65535)."""
    rng = random.Random(seed)
    for i in range(count):
        sport = 1024 + (i * 7919 + seed) % 64511
        seg = tcp_segment(src, dst, sport, dport, SYN, seq=rng.getrandbits(32))
        yield ipv4_packet(src, dst, seg, ident=i & 0xFFFF)


# --- sending them ------------------------------------------------------------------------------


def raw_sender(topo: Topology, node: str = "client") -> socket.socket:
    """A raw IPv4 socket in ``node`` that sends whole packets (IPPROTO_RAW implies HDRINCL)."""
    with in_netns(topo.ns(node)):
        s = socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_RAW)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4 << 20)
    return s


def send_packets(sock: socket.socket, packets: Iterable[bytes], dst: str) -> int:
    n = 0
    for pkt in packets:
        while True:
            try:
                sock.sendto(pkt, (dst, 0))
                break
            except BlockingIOError:  # pragma: no cover - blocking socket
                continue
            except OSError as e:
                if e.errno != errno.ENOBUFS:  # the qdisc is full for a moment
                    raise
        n += 1
    return n
