"""Helpers for the reliability and security tests (tests/test_reliability_*.py).

What the daemon costs (RSS, descriptors, CPU time) is read from /proc, the kernel's queue
counters from the gateway namespace's /proc/net/netfilter/nfnetlink_queue, and hostile traffic
is crafted with raw sockets inside the client namespace: nothing leaves the namespaces a test
creates.
"""

from __future__ import annotations

import dataclasses
import errno
import hashlib
import ipaddress
import random
import socket
import struct
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

import trio

from pep import nfq_proc
from pep.topology import Topology, in_netns
from tests.netenv import INGRESS, PepProcess, connect, recv_to_eof, send_all

# --- the daemon under test (what it costs: bench.paths rss_kib, fd_count, cpu_seconds) -------


def pid_of(pep: PepProcess) -> int:
    assert pep.proc is not None
    return pep.proc.pid


async def settle(probe, want, timeout: float = 5.0, step: float = 0.1):
    """Poll ``probe()`` until ``want(value)``; returns the last value either way."""
    value = probe()
    with trio.move_on_after(timeout):
        while not want(value):
            await trio.sleep(step)
            value = probe()
    return value


# --- the kernel's queue counters --------------------------------------------------------------


@dataclass(frozen=True)
class KernelQueue:
    queue: int
    portid: int
    waiting: int
    queue_dropped: int
    user_dropped: int
    last_id: int


def kernel_queue(topo: Topology, node: str = "gw", queue: int = 0) -> KernelQueue | None:
    """Row ``queue`` of the node's nfnetlink_queue table, or None when nothing is bound."""
    text = topo.run(node, ["cat", nfq_proc.NFQUEUE_PROC]).stdout
    rows = nfq_proc.parse(text, (queue, queue))
    if not rows:
        return None
    return KernelQueue(**{f.name: rows[0][f.name] for f in dataclasses.fields(KernelQueue)})


# --- starting the daemon with a config --------------------------------------------------------


def start_pep(
    topo: Topology,
    conf: Path,
    text: str = "",
    *,
    node: str = "gw",
    interfaces: tuple[str, ...] = (INGRESS,),
    prefix: tuple[str, ...] = (),
    log_level: str = "info",
    started: list[PepProcess] | None = None,
) -> PepProcess:
    conf.write_text(text)
    args = ["--config", str(conf), "--log-level", log_level]
    for iface in interfaces:
        args += ["--interface", iface]
    p = PepProcess(topo, node, args, prefix=list(prefix))
    if started is not None:
        started.append(p)  # stopped by the caller's cleanup even if start fails
    return p.start()


# --- crafted packets --------------------------------------------------------------------------

FIN, SYN, RST, PSH, ACK, URG, ECE, CWR = 0x01, 0x02, 0x04, 0x08, 0x10, 0x20, 0x40, 0x80


def checksum(data: bytes) -> int:
    if len(data) % 2:
        data += b"\0"
    s = sum(struct.unpack(f"!{len(data) // 2}H", data))
    while s >> 16:
        s = (s & 0xFFFF) + (s >> 16)
    return ~s & 0xFFFF


def tcp_segment(
    src: str,
    dst: str,
    sport: int,
    dport: int,
    flags: int = SYN,
    options: bytes = b"\x02\x04\x05\xb4",  # MSS 1460
    doff: int | None = None,
    seq: int = 0,
    payload: bytes = b"",
) -> bytes:
    options += b"\0" * (-len(options) % 4)
    if doff is None:
        doff = (20 + len(options)) // 4
    head = struct.pack("!HHIIHHHH", sport, dport, seq, 0, (doff << 12) | flags, 64240, 0, 0)
    seg = head + options + payload
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


def raw_sender(topo: Topology, node: str = "client") -> socket.socket:
    """A raw IPv4 socket in ``node`` that sends whole packets (IPPROTO_RAW implies HDRINCL)."""
    with in_netns(topo.ns(node)):
        s = socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_RAW)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4 << 20)
    return s


def raw_syns(src: str, dst: str, dport: int, count: int, seed: int = 1) -> Iterator[bytes]:
    """``count`` SYNs from distinct source ports (wrapping over 1024..65535)."""
    rng = random.Random(seed)
    for i in range(count):
        sport = 1024 + (i * 7919 + seed) % 64511
        seg = tcp_segment(src, dst, sport, dport, SYN, seq=rng.getrandbits(32))
        yield ipv4_packet(src, dst, seg, ident=i & 0xFFFF)


def send_packets(sock: socket.socket, packets: Iterator[bytes] | list[bytes], dst: str) -> int:
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


# --- byte-exact streams -----------------------------------------------------------------------

CHUNK = 1 << 20


class Pattern:
    """A deterministic stream of ``size`` bytes, unique per ``seed``: a random 1 MiB block
    with every chunk stamped with (seed, index), so a lost, repeated or reordered chunk, or
    bytes crossing from another stream, change the sha256."""

    _blocks: ClassVar[dict[int, bytes]] = {}

    def __init__(self, seed: int, size: int) -> None:
        self.seed, self.size = seed, size
        key = seed % 4
        if key not in Pattern._blocks:
            Pattern._blocks[key] = random.Random(key).randbytes(CHUNK)
        self.block = Pattern._blocks[key]

    def chunks(self) -> Iterator[bytes]:
        left, i = self.size, 0
        while left:
            n = min(CHUNK, left)
            yield struct.pack("!QQ", self.seed, i) + self.block[16:n] if n > 16 else self.block[:n]
            left -= n
            i += 1

    def sha256(self) -> str:
        h = hashlib.sha256()
        for c in self.chunks():
            h.update(c)
        return h.hexdigest()


async def send_pattern(sock: trio.socket.SocketType, pattern: Pattern) -> None:
    for chunk in pattern.chunks():
        await send_all(sock, chunk)


async def request(topo: Topology, dst: tuple[str, int], payload: bytes) -> bytes:
    sock = await connect(topo.ns("client"), dst)
    with sock:
        await send_all(sock, payload)
        sock.shutdown(socket.SHUT_WR)
        return await recv_to_eof(sock)
