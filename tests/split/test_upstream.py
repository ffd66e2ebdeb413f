"""The upstream leg against loopback listeners (no root): a connect, a refusal, Fast Open's
first bytes, a timeout against a listener whose backlog is full (its SYNs are dropped, as a
black hole would), and the options ``open_for`` puts on the socket from the config and the link.
"""

from __future__ import annotations

import contextlib
import dataclasses
import socket
from collections.abc import Iterator

import pytest
import trio

from pep.capture.syn import SynInfo
from pep.config import Config, LegTuning
from pep.split.upstream import UpstreamError, connect, open_for
from tests.helpers.fakes import FakeLink
from tests.helpers.loopback import listening

TIMEOUT = 10  # for each test: the kernel answers on loopback within milliseconds


async def test_a_connect_returns_an_established_socket() -> None:
    with listening() as srv, trio.fail_after(TIMEOUT):
        sock = await connect(srv.getsockname(), LegTuning(), 5)
        with sock, srv.accept()[0] as server:
            assert sock.getpeername() == srv.getsockname()
            assert not sock.getblocking()
            sock.send(b"ping")
            assert server.recv(10) == b"ping"


async def test_a_refusal_is_an_upstream_error() -> None:
    with listening() as srv:
        closed = srv.getsockname()
    with trio.fail_after(TIMEOUT), pytest.raises(UpstreamError, match="ECONNREFUSED"):
        await connect(closed, LegTuning(), 5)


@pytest.mark.parametrize("size", [100, 200_000], ids=["in-the-syn", "more-than-a-syn"])
async def test_fast_open_first_bytes_arrive_once(size: int) -> None:
    """With first bytes the SYN carries them (TCP_FASTOPEN_CONNECT); whatever does not fit is
    sent after the handshake. The connect returns established, every byte sent once."""
    data = bytes(range(256)) * (size // 256 + 1)
    data = data[:size]
    with listening() as srv, trio.fail_after(TIMEOUT):
        async with trio.open_nursery() as n:
            got: list[bytes] = []

            def read_all() -> None:
                server, _ = srv.accept()
                with server:
                    got.append(b"".join(iter(lambda: server.recv(1 << 16), b"")))

            n.start_soon(trio.to_thread.run_sync, read_all)
            sock = await connect(srv.getsockname(), LegTuning(), 5, first_bytes=data)
            with sock:
                assert sock.getpeername() == srv.getsockname()
                sock.shutdown(socket.SHUT_WR)
        assert got == [data]


@contextlib.contextmanager
def full_backlog() -> Iterator[tuple[str, int]]:
    """A listener that accepts nothing, its accept queue full: a SYN to it is dropped (the
    kernel counts ListenOverflows), and the connect waits as for a server that never answers."""
    with listening(backlog=0) as srv:
        fillers = []
        try:
            for _ in range(2):
                filler = socket.socket()
                filler.setblocking(False)
                filler.connect_ex(srv.getsockname())
                fillers.append(filler)
            yield srv.getsockname()
        finally:
            for filler in fillers:
                filler.close()


@pytest.mark.parametrize("first", [b"", b"GET / HTTP/1.1\r\n\r\n"], ids=["plain", "fast-open"])
async def test_a_destination_that_does_not_answer_times_out(first: bytes) -> None:
    with full_backlog() as dst, trio.fail_after(TIMEOUT):
        t0 = trio.current_time()
        with pytest.raises(UpstreamError, match="connect timeout"):
            await connect(dst, LegTuning(), 0.3, first_bytes=first)
        assert trio.current_time() - t0 >= 0.3


def congestion(sock: socket.socket) -> str:
    return sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_CONGESTION, 16).rstrip(b"\0").decode()


@pytest.mark.parametrize("faces", [False, True], ids=["lan", "link"])
async def test_open_for_tunes_the_leg_for_its_destination(faces: bool) -> None:
    """[upstream]'s tuning, and the link's under it when the destination is across the link;
    the client SYN's TOS and MSS when mirrored."""
    cfg = Config(
        upstream=LegTuning(congestion="cubic", keepalive=True, keepidle=77),
        mirror_tos=True,
        mirror_mss=True,
    )
    link = FakeLink({"127.0.0.1"} if faces else set(), congestion="reno")
    with listening() as srv, trio.fail_after(TIMEOUT):
        dst = srv.getsockname()
        syn = SynInfo(4, "10.0.0.2", 40000, dst[0], dst[1], 0x28, 64, 1000, 7, True, None)
        sock = await open_for(cfg, dst, ("10.0.0.2", 40000), syn, links=link)
        with sock:
            assert congestion(sock) == ("reno" if faces else "cubic")
            assert sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPIDLE) == 77
            assert sock.getsockopt(socket.IPPROTO_IP, socket.IP_TOS) == 0x28
            assert sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_MAXSEG) <= 1000
        assert link.asked == ["127.0.0.1"]


async def test_open_for_mirrors_nothing_unless_asked() -> None:
    cfg = dataclasses.replace(Config(), connect_timeout=5)
    with listening() as srv, trio.fail_after(TIMEOUT):
        dst = srv.getsockname()
        syn = SynInfo(4, "10.0.0.2", 40000, dst[0], dst[1], 0x28, 64, 1000, 7, True, None)
        sock = await open_for(cfg, dst, ("10.0.0.2", 40000), syn)
        with sock:
            assert sock.getsockopt(socket.IPPROTO_IP, socket.IP_TOS) == 0
            assert sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_MAXSEG) > 1000
