"""A small HTTP/1.0-like object server and client for the lab: fetch N bytes, check every byte.

Protocol (HTTP/1.0: one request per connection, like a browser fetching one object on a
fresh connection, which is the case a PEP speeds up most; HTTP/1.1: the connection stays open
for the next request, as a browser's keep-alive connections do for the objects of a page)::

    GET /<n> HTTP/1.x\\r\\n...\\r\\n        -> 200, Content-Length: n, n bytes of body(n)
    PUT /<n> HTTP/1.x\\r\\n...\\r\\n<n bytes> -> 200, the sha256 hex digest of what arrived

``body(n)`` is deterministic pseudo-random content (Mersenne Twister seeded with n): it does
not compress, and both ends can compute the sha256 the client checks without shipping a file.
The client measures completion time from the start of connect() to the last byte, as a user
waiting for a download does, and records (time, bytes) progress samples for the charts.
"""

from __future__ import annotations

import argparse
import functools
import hashlib
import logging
import random
import re
import socket
import ssl
import sys
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import trio

from pep.ops.entry import exit_code
from pep.support.errors import describe

__all__ = [
    "FetchError",
    "Session",
    "Transfer",
    "body",
    "body_sha256",
    "fetch",
    "fetch_tls",
    "handle",
    "main",
    "serve",
    "upload",
]

log = logging.getLogger("pep.lab.objects")

PORT = 80
_REQUEST = re.compile(rb"^(GET|PUT) /(\d{1,11}) HTTP/1\.([01])\r\n")
_HEADER_MAX = 4096
_RECV = 1 << 18
SAMPLE_EVERY = 0.005  # seconds between progress samples: smooth curves, bounded JSON


class FetchError(RuntimeError):
    """The transfer failed or its bytes were wrong; the message says which."""


@functools.lru_cache(maxsize=4)
def body(n: int) -> bytes:
    """The object of size n (cached: a demo asks for the same few sizes again and again).
    randbytes takes less than 2^28 bytes at once (its bit count is a C int): larger objects
    (a minute of LEO, pep lab bench's handover workload) are made in such pieces."""
    rng = random.Random(n)
    if n <= _PIECE:
        return rng.randbytes(n)
    return b"".join(rng.randbytes(min(_PIECE, n - at)) for at in range(0, n, _PIECE))


_PIECE = 1 << 27


@functools.lru_cache(maxsize=64)
def body_sha256(n: int) -> str:
    return hashlib.sha256(body(n)).hexdigest()


# --------------------------------------------------------------------------------------------
# server


async def _read_head(stream: trio.abc.Stream, buf: bytes) -> tuple[bytes, bytes] | None:
    """Read up to the blank line; returns (head, the bytes after it), or None when the client
    closed cleanly before starting another request (a keep-alive connection's normal end)."""
    while b"\r\n\r\n" not in buf:
        chunk = await stream.receive_some(_HEADER_MAX)
        if not chunk:
            if not buf:
                return None
            raise FetchError("connection closed before the request head ended")
        buf += chunk
        if len(buf) > _HEADER_MAX:
            raise FetchError("request head too long")
    head, _, rest = buf.partition(b"\r\n\r\n")
    return head + b"\r\n", rest


async def handle(stream: trio.abc.Stream) -> None:
    """Serve one connection (plain or TLS): one request (HTTP/1.0), or requests until the
    client closes (HTTP/1.1 without ``Connection: close``)."""
    peer = "?"
    try:
        sock = getattr(getattr(stream, "transport_stream", stream), "socket", None)
        if sock is not None:
            peer = "{}:{}".format(*sock.getpeername())
        buf = b""
        while True:
            got_head = await _read_head(stream, buf)
            if got_head is None:
                return
            head, buf = got_head
            m = _REQUEST.match(head)
            if not m:
                await stream.send_all(b"HTTP/1.0 400 Bad Request\r\nContent-Length: 0\r\n\r\n")
                return
            method, n, minor = m.group(1), int(m.group(2)), m.group(3)
            keep = minor == b"1" and b"\r\nconnection: close" not in head.lower()
            status = b"HTTP/1.%s 200 OK\r\nContent-Length: %d\r\n\r\n" % (minor, n)
            t0 = time.monotonic()
            if method == b"GET":
                await stream.send_all(status)
                await stream.send_all(body(n))
            else:
                buf = await _receive_upload(stream, n, buf, minor)
                if buf is None:
                    return
            log.info("%s %d from %s in %.3fs", method.decode(), n, peer, time.monotonic() - t0)
            if not keep:
                return
    except (FetchError, trio.BrokenResourceError, OSError) as e:
        log.info("request from %s failed: %s", peer, describe(e))
    finally:
        await stream.aclose()


async def _receive_upload(
    stream: trio.abc.Stream, n: int, buf: bytes, minor: bytes
) -> bytes | None:
    """Take a PUT's ``n`` bytes and answer with their sha256; returns what followed them, or
    None when the body was cut short (answered "short")."""
    h = hashlib.sha256(buf[:n])
    got, rest = min(n, len(buf)), buf[n:]
    while got < n:
        chunk = await stream.receive_some(min(_RECV, n - got))
        if not chunk:
            break
        h.update(chunk)
        got += len(chunk)
    digest = h.hexdigest().encode() if got == n else b"short"
    await stream.send_all(
        b"HTTP/1.%s 200 OK\r\nContent-Length: %d\r\n\r\n%s" % (minor, len(digest), digest)
    )
    return rest if got == n else None


async def serve(
    port: int = PORT,
    host: str = "0.0.0.0",
    tls_port: int | None = None,
    cert: str | None = None,
    key: str | None = None,
) -> None:
    """Serve forever; each connection in its own task, a failing one never stops the others.
    With ``tls_port``, also HTTPS there (TLS 1.3 only, the certificate in ``cert``)."""
    listeners: list[trio.abc.Listener[Any]] = list(
        await trio.open_tcp_listeners(port, host=host, backlog=1024)
    )
    if tls_port is not None:
        ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        ctx.minimum_version = ssl.TLSVersion.TLSv1_3
        ctx.load_cert_chain(cert or "", key)
        plain = await trio.open_tcp_listeners(tls_port, host=host, backlog=1024)
        listeners += [trio.SSLListener(ln, ctx, https_compatible=True) for ln in plain]
    log.info("listening on %s:%d" + (f" and TLS on {tls_port}" if tls_port else ""), host, port)
    await trio.serve_listeners(handle, listeners)


# --------------------------------------------------------------------------------------------
# client


@dataclass
class Transfer:
    """One completed transfer, as measured by the client."""

    method: str
    size: int
    seconds: float  # connect() start -> last byte
    first_byte: float  # connect() start -> first response byte
    connect: float  # connect() start -> connection established
    samples: list[tuple[float, int]] = field(default_factory=list)  # (s since start, bytes)

    @property
    def goodput_bps(self) -> float:
        return self.size * 8 / self.seconds if self.seconds > 0 else 0.0


async def _connect(ns: str | None, dst: tuple[str, int]) -> trio.socket.SocketType:
    if ns is None:
        sock = trio.socket.socket()
    else:
        from pep.testing.topology import ns_socket

        sock = trio.socket.from_stdlib_socket(ns_socket(ns))
    try:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        await sock.connect(dst)
    except BaseException:
        sock.close()
        raise
    return sock


def _split_response(buf: bytes) -> tuple[int, bytes] | None:
    if b"\r\n\r\n" not in buf:
        return None
    head, _, rest = buf.partition(b"\r\n\r\n")
    if not (head.startswith(b"HTTP/1.0 200") or head.startswith(b"HTTP/1.1 200")):
        raise FetchError(f"server answered {head.splitlines()[0]!r}")
    m = re.search(rb"\r\nContent-Length: (\d+)", head)
    if not m:
        raise FetchError("response without Content-Length")
    return int(m.group(1)), rest


async def fetch(
    ns: str | None,
    dst: tuple[str, int],
    size: int,
    on_progress: Callable[[int, float], None] | None = None,
) -> Transfer:
    """GET ``size`` bytes from ``dst`` (from namespace ``ns``) on a new connection and check
    their sha256.

    Raises FetchError on a short or wrong body: a benchmark must never time corrupt data.
    """
    t0 = time.monotonic()
    sock = await _connect(ns, dst)
    with sock:
        t_conn = time.monotonic() - t0
        await sock.send(b"GET /%d HTTP/1.0\r\n\r\n" % size)
        return await _response(sock.recv, size, t0, t_conn, on_progress)


async def _response(
    recv: Callable[[int], Awaitable[bytes]],
    size: int,
    t0: float,
    t_conn: float,
    on_progress: Callable[[int, float], None] | None = None,
) -> Transfer:
    """Read one GET response of ``size`` bytes and check it; times are from ``t0``."""
    h = hashlib.sha256()
    got = 0
    first_byte = 0.0
    buf = b""
    length: int | None = None
    samples: list[tuple[float, int]] = [(0.0, 0)]
    last_sample = 0.0
    while True:
        chunk = await recv(min(_RECV, size - got) if length is not None else _RECV)
        now = time.monotonic() - t0
        if not chunk:
            break
        if length is None:
            if not first_byte:
                first_byte = now
            buf += chunk
            split = _split_response(buf)
            if split is None:
                continue
            length, chunk = split
            if length != size:
                raise FetchError(f"asked for {size} bytes, server announced {length}")
        h.update(chunk)
        got += len(chunk)
        if now - last_sample >= SAMPLE_EVERY or got >= size:
            samples.append((round(now, 4), got))
            last_sample = now
            if on_progress is not None:
                on_progress(got, now)
        if got >= size:
            break
    seconds = time.monotonic() - t0
    if got != size:
        raise FetchError(f"fetch of {size} bytes ended after {got} bytes")
    if h.hexdigest() != body_sha256(size):
        raise FetchError(f"fetch of {size} bytes: sha256 mismatch (data corrupted in transit)")
    if samples[-1][1] != got:
        samples.append((round(seconds, 4), got))
    return Transfer("GET", size, seconds, first_byte, t_conn, samples)


async def fetch_tls(
    ns: str | None, dst: tuple[str, int], size: int, ca: str, name: str = "lab"
) -> Transfer:
    """GET ``size`` bytes over HTTPS (TLS 1.3, the server's certificate checked against
    ``ca``) on a new connection; timed from connect() as ``fetch`` is, so the TLS handshake's
    round trip counts as it does for a user."""
    ctx = ssl.create_default_context(cafile=ca)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_3
    t0 = time.monotonic()
    sock = await _connect(ns, dst)
    stream = trio.SSLStream(
        trio.SocketStream(sock), ctx, server_hostname=name, https_compatible=True
    )
    try:
        await stream.do_handshake()
        t_conn = time.monotonic() - t0
        await stream.send_all(b"GET /%d HTTP/1.1\r\nHost: %s\r\n\r\n" % (size, name.encode()))
        return await _response(stream.receive_some, size, t0, t_conn)
    finally:
        await trio.aclose_forcefully(stream)


class Session:
    """One persistent HTTP/1.1 connection, as a browser keeps for the objects of a page."""

    def __init__(self, sock: trio.socket.SocketType, t_conn: float) -> None:
        self.sock, self.t_conn = sock, t_conn

    @classmethod
    async def open(cls, ns: str | None, dst: tuple[str, int]) -> Session:
        t0 = time.monotonic()
        sock = await _connect(ns, dst)
        return cls(sock, time.monotonic() - t0)

    async def get(self, size: int) -> Transfer:
        """GET ``size`` bytes on this connection, checked; timed from the request."""
        t0 = time.monotonic()
        await self.sock.send(b"GET /%d HTTP/1.1\r\nHost: lab\r\n\r\n" % size)
        return await _response(self.sock.recv, size, t0, 0.0)

    def close(self) -> None:
        self.sock.close()


async def upload(ns: str | None, dst: tuple[str, int], size: int) -> Transfer:
    """PUT ``size`` bytes; the server's sha256 of what it received must match ours."""
    t0 = time.monotonic()
    sock = await _connect(ns, dst)
    with sock:
        t_conn = time.monotonic() - t0
        data = memoryview(b"PUT /%d HTTP/1.0\r\n\r\n" % size + body(size))
        while data:
            data = data[await sock.send(data[:_RECV]) :]
        buf = b""
        while True:
            chunk = await sock.recv(_HEADER_MAX)
            if not chunk:
                break
            buf += chunk
        seconds = time.monotonic() - t0
    split = _split_response(buf)
    if split is None:
        raise FetchError(f"upload of {size} bytes: no complete response ({buf[:80]!r})")
    _, digest = split
    if digest.decode(errors="replace") != body_sha256(size):
        raise FetchError(f"upload of {size} bytes: server got different bytes ({digest[:16]!r})")
    return Transfer("PUT", size, seconds, seconds, t_conn, [(0.0, 0), (seconds, size)])


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m pep.lab.objects", description=__doc__)
    sub = p.add_subparsers(dest="cmd", required=True)
    s = sub.add_parser("serve", help="serve objects until killed")
    s.add_argument("--port", type=int, default=PORT)
    s.add_argument("--host", default="0.0.0.0")
    s.add_argument("--tls-port", type=int, help="also serve HTTPS (TLS 1.3) on this port")
    s.add_argument("--cert", help="the TLS certificate chain (PEM)")
    s.add_argument("--key", help="its private key (PEM)")
    f = sub.add_parser("fetch", help="fetch one object and print its timing")
    f.add_argument("host")
    f.add_argument("size", type=int)
    f.add_argument("--port", type=int, default=PORT)
    args = p.parse_args(argv)
    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )

    def run() -> None:
        if args.cmd == "serve":
            trio.run(serve, args.port, args.host, args.tls_port, args.cert, args.key)
        else:
            t = trio.run(fetch, None, (args.host, args.port), args.size)
            print(
                f"{t.size} bytes in {t.seconds:.3f} s ({t.goodput_bps / 1e6:.2f} Mbit/s), sha256 ok"
            )

    return exit_code(run, (FetchError,), lambda e: print(f"objects: {e}", file=sys.stderr))


if __name__ == "__main__":
    sys.exit(main())
