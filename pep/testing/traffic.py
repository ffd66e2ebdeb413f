"""Trio peers for the namespace tests and benchmarks: servers and clients in a namespace, and
the byte-exact streams they exchange through the gateway (every byte checked with sha256).

A server runs for the length of an ``async with serving(...)`` block and records the peer
address of every connection it accepts (split: the gateway's; routed end to end: the
client's); ``request`` / ``exchange`` are one request and its reply on a connection, ``duplex``
sends both ways at once, ``Pattern`` is a long stream in which a lost, repeated or foreign
chunk changes the hash. The namespaces themselves are pep/testing/netenv.py's.
"""

from __future__ import annotations

import contextlib
import errno
import functools
import hashlib
import random
import socket
import struct
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass
from typing import ClassVar

import trio

from pep.testing.topology import Topology, ns_socket

Handler = Callable[[trio.socket.SocketType], Awaitable[None]]
Peers = list[tuple[str, int]]  # the peer addresses a server accepted, in order


def _family(ip: str) -> int:
    return socket.AF_INET6 if ":" in ip else socket.AF_INET


async def listen(ns: str, ip: str, port: int = 0) -> trio.socket.SocketType:
    sock = trio.socket.from_stdlib_socket(ns_socket(ns, _family(ip)))
    sock.setsockopt(trio.socket.SOL_SOCKET, trio.socket.SO_REUSEADDR, 1)
    await sock.bind((ip, port))
    sock.listen(1024)
    return sock


async def serve(listener: trio.socket.SocketType, handler: Handler, accepted: Peers) -> None:
    """Accept forever, one task per connection, recording each peer address."""
    async with trio.open_nursery() as nursery:
        while True:
            conn, peer = await listener.accept()
            accepted.append(peer)
            nursery.start_soon(_run_closing, handler, conn)


async def _run_closing(handler: Handler, conn: trio.socket.SocketType) -> None:
    with conn:
        await handler(conn)


async def connect(ns: str, dst: tuple[str, int]) -> trio.socket.SocketType:
    sock = trio.socket.from_stdlib_socket(ns_socket(ns, _family(dst[0])))
    try:
        await sock.connect(dst)
    except BaseException:
        sock.close()
        raise
    return sock


async def send_all(
    sock: trio.socket.SocketType, data: bytes | memoryview, chunk: int = 1 << 20
) -> None:
    view = memoryview(data)
    while view:
        n = await sock.send(view[:chunk])
        view = view[n:]


async def recv_to_eof(sock: trio.socket.SocketType) -> bytes:
    parts = []
    while True:
        b = await sock.recv(1 << 20)
        if not b:
            return b"".join(parts)
        parts.append(b)


async def hash_to_eof(sock: trio.socket.SocketType) -> tuple[str, int]:
    h, total = hashlib.sha256(), 0
    while True:
        b = await sock.recv(1 << 20)
        if not b:
            return h.hexdigest(), total
        h.update(b)
        total += len(b)


async def read_until_end(sock: trio.socket.SocketType) -> tuple[str, int]:
    """("eof" | "reset", bytes read) for a socket read to its end."""
    total = 0
    while True:
        try:
            b = await sock.recv(1 << 20)
        except OSError as e:
            assert e.errno in (errno.ECONNRESET, errno.EPIPE), e
            return "reset", total
        if not b:
            return "eof", total
        total += len(b)


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


async def echo_upper(conn: trio.socket.SocketType) -> None:
    """The tests' usual server: read the request to EOF, answer it upper-cased."""
    data = await recv_to_eof(conn)
    await send_all(conn, data.upper())


@contextlib.asynccontextmanager
async def serving(
    topo: Topology,
    dst: tuple[str, int],
    handler: Handler = echo_upper,
    accepted: Peers | None = None,
    node: str = "server",
) -> AsyncIterator[Peers]:
    """A server at ``dst`` in ``node`` while the body runs; yields the peers it accepts
    (``accepted``, when given, is the list they are appended to)."""
    peers: Peers = [] if accepted is None else accepted
    async with trio.open_nursery() as n:
        n.start_soon(serve, await listen(topo.ns(node), *dst), handler, peers)
        yield peers
        n.cancel_scope.cancel()


async def exchange(sock: trio.socket.SocketType, payload: bytes) -> bytes:
    """One request/response on a connected socket: send, FIN, read the reply to EOF."""
    await send_all(sock, payload)
    sock.shutdown(socket.SHUT_WR)
    return await recv_to_eof(sock)


async def request(
    topo: Topology, dst: tuple[str, int], payload: bytes, node: str = "client"
) -> bytes:
    """One request/response from ``node`` to ``dst`` on a new connection: the reply."""
    sock = await connect(topo.ns(node), dst)
    with sock:
        return await exchange(sock, payload)


async def peer_seen(
    topo: Topology, dst: tuple[str, int], accepted: Peers, payload: bytes = b"ping"
) -> str:
    """One echo request to a server that records into ``accepted``: the address it saw."""
    before = len(accepted)
    assert await request(topo, dst, payload) == payload.upper()
    return accepted[before][0]


async def peer_of(
    topo: Topology, dst: tuple[str, int], payload: bytes = b"ping", timeout: float = 10
) -> str:
    """One echo request to a server started for it: the address the server saw it from
    (the gateway's: split; the client's: routed end to end)."""
    with trio.fail_after(timeout):
        async with serving(topo, dst) as accepted:
            return await peer_seen(topo, dst, accepted, payload)


async def http_get(
    topo: Topology, node: str, addr: tuple[str, int], path: str, method: str = "GET"
) -> tuple[int, dict[str, str], bytes]:
    """A minimal HTTP/1.1 request from inside ``node`` (the metrics endpoint lives in the gw
    ns): status, headers, body."""
    raw = await request(topo, addr, f"{method} {path} HTTP/1.1\r\nHost: pep\r\n\r\n".encode(), node)
    head, _, body = raw.partition(b"\r\n\r\n")
    lines = head.decode().split("\r\n")
    headers = dict(line.split(": ", 1) for line in lines[1:])
    return int(lines[0].split()[1]), headers, body


# --- full-duplex and byte-exact streams -------------------------------------------------------

Sender = Callable[[trio.socket.SocketType], Awaitable[None]]


@dataclass
class Duplex:
    """What one full-duplex transfer through the gateway produced."""

    server_got: tuple[str, int]  # (sha256 hex, bytes) the server read to EOF
    client_got: tuple[str, int]  # (sha256 hex, bytes) the client read to EOF
    accepted: Peers  # the peer address(es) the server saw
    client_port: int


async def duplex(
    topo: Topology, server: str, port: int, send_up: Sender, send_down: Sender, timeout: float
) -> Duplex:
    """One connection client -> server; both ends send (then FIN) and hash what they read,
    at the same time, so both directions of the split connection carry data at once."""
    got: dict[str, tuple[str, int]] = {}

    async def server_side(sock: trio.socket.SocketType) -> None:
        got["server"] = await send_and_hash(sock, send_down)

    with trio.fail_after(timeout):
        async with serving(topo, (server, port), server_side) as accepted:
            sock = await connect(topo.ns("client"), (server, port))
            client_port = sock.getsockname()[1]
            with sock:
                got["client"] = await send_and_hash(sock, send_up)
            while "server" not in got:
                await trio.sleep(0.01)
    return Duplex(got["server"], got["client"], accepted, client_port)


async def both_ways(
    a: trio.socket.SocketType, b: trio.socket.SocketType, send_a: Sender, send_b: Sender
) -> tuple[tuple[str, int], tuple[str, int]]:
    """The two ends of a connection send at once (``duplex`` on sockets a test already has):
    (what ``a`` read, what ``b`` read), each (sha256 hex, bytes)."""
    got: dict[int, tuple[str, int]] = {}

    async def side(i: int, sock: trio.socket.SocketType, send: Sender) -> None:
        got[i] = await send_and_hash(sock, send)

    async with trio.open_nursery() as n:
        n.start_soon(side, 0, a, send_a)
        n.start_soon(side, 1, b, send_b)
    return got[0], got[1]


async def send_and_hash(sock: trio.socket.SocketType, send: Sender) -> tuple[str, int]:
    """Send (then FIN) while reading to EOF: (sha256 hex, bytes) of what was read."""
    got: list[tuple[str, int]] = []
    async with trio.open_nursery() as n:

        async def rx() -> None:
            got.append(await hash_to_eof(sock))

        n.start_soon(rx)
        await send(sock)
        sock.shutdown(socket.SHUT_WR)
    return got[0]


def sending(data: bytes) -> Sender:
    return functools.partial(send_all, data=data)


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
