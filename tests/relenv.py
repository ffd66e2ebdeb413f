"""Helpers for the reliability and security tests (tests/test_reliability_*.py).

What the daemon costs (RSS, descriptors, CPU time) is read from /proc, the kernel's queue
counters from the gateway namespace's /proc/net/netfilter/nfnetlink_queue, and hostile traffic
is crafted with raw sockets inside the client namespace: nothing leaves the namespaces a test
creates.
"""

from __future__ import annotations

import dataclasses
import hashlib
import random
import socket
import struct
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

import trio

from pep import nfq_proc
from pep.topology import Topology
from tests.netenv import INGRESS, PepProcess, connect, recv_to_eof, send_all
from tests.packets import (  # noqa: F401 (what the reliability tests import from here)
    ACK,
    CWR,
    ECE,
    FIN,
    PSH,
    RST,
    SYN,
    URG,
    checksum,
    ipv4_packet,
    raw_sender,
    raw_syns,
    send_packets,
    tcp_segment,
)

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


# --- crafted packets: tests/packets.py (tcp_segment, ipv4_packet, raw_syns, ... used here) ---


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
