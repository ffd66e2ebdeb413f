"""The listener over loopback (no root): its sockets' options, the accept loop, the refusal of a
waiting client when the process is out of descriptors, and ``listener_tuning``.

The listener binds every address of the host (0.0.0.0 and ::) in ``bind``; these tests put its
sockets on 127.0.0.1 themselves, so nothing here listens beyond loopback.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import resource
import socket
from collections.abc import AsyncIterator, Iterator

import pytest
import trio

from pep.capture.flows import FlowTable
from pep.config import Config, LegTuning
from pep.config.link import Link
from pep.split.listener import Listener, listener_tuning
from pep.split.session import Sessions
from pep.testing.traffic import read_until_end
from tests.helpers.loopback import LOCALHOST, listening

# REDIRECT mode: a client that connects to the listener itself has no conntrack entry, so the
# session refuses it at once (not_redirected) and each accepted client is over in a moment.
CFG = Config(mode="redirect", family="ipv4")


@contextlib.asynccontextmanager
async def serving(cfg: Config = CFG) -> AsyncIterator[Listener]:
    """A listener on 127.0.0.1 (a port of the kernel's choosing), accepting until the end."""
    listener = Listener(cfg, Sessions(cfg, FlowTable(64, 30.0)))
    try:
        for sock in listener.socks:
            sock.bind((LOCALHOST, 0))
            sock.listen(cfg.backlog)
        with trio.fail_after(15):
            async with trio.open_nursery() as n:
                n.start_soon(listener.serve, n)
                yield listener
                n.cancel_scope.cancel()
    finally:
        listener.close()


async def client_of(listener: Listener) -> trio.socket.SocketType:
    sock = trio.socket.socket()
    await sock.connect(listener.socks[0].getsockname())
    return sock


async def test_every_client_is_accepted_and_handed_to_its_session() -> None:
    async with serving() as listener:
        for _ in range(5):
            with await client_of(listener) as client:
                assert (await read_until_end(client))[0] == "reset"  # refused: not redirected
        c = listener.counters
        assert (c.accepted, c.not_redirected, c.accept_errors) == (5, 5, 0)


def test_the_listening_sockets_options() -> None:
    cfg = dataclasses.replace(CFG, workers=2, tcp_fastopen=True, backlog=77, family="both")
    listener = Listener(cfg, Sessions(cfg, FlowTable(64, 30.0)))
    try:
        v4, v6 = listener.socks
        assert (v4.family, v6.family) == (socket.AF_INET, socket.AF_INET6)
        assert v6.getsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY) == 1
        for sock in (v4, v6):
            assert sock.getsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT) == 1  # workers
            assert sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_FASTOPEN) == 77
            # SO_LINGER 0, inherited by every accepted client: a crash resets them
            assert sock.getsockopt(socket.SOL_SOCKET, socket.SO_LINGER, 8) == b"\1\0\0\0\0\0\0\0"
    finally:
        listener.close()


def test_a_port_in_use_is_named_in_the_error() -> None:
    with listening() as taken:
        port = taken.getsockname()[1]
        cfg = dataclasses.replace(CFG, listen_port=port)
        listener = Listener(cfg, Sessions(cfg, FlowTable(64, 30.0)))
        try:
            with pytest.raises(OSError, match=rf"cannot listen on \[0.0.0.0\]:{port}"):
                listener.bind()
        finally:
            listener.close()


@contextlib.contextmanager
def out_of_descriptors() -> Iterator[None]:
    """Every descriptor this process may open is open (RLIMIT_NOFILE lowered to a little over
    what is in use, then filled); all given back afterwards."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    highest = max(int(fd) for fd in os.listdir("/proc/self/fd"))
    filler: list[int] = []
    resource.setrlimit(resource.RLIMIT_NOFILE, (highest + 32, hard))
    try:
        with contextlib.suppress(OSError):
            while True:
                filler.append(os.open(os.devnull, os.O_RDONLY))
        yield
    finally:
        for fd in filler:
            os.close(fd)
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


async def test_out_of_descriptors_a_waiting_client_is_reset_at_once() -> None:
    """accept() fails with EMFILE while a client waits in the backlog: the listener gives up
    its reserve descriptor to accept that client and reset it, instead of leaving it hanging
    until a descriptor frees; then it takes a reserve again."""
    cfg = CFG
    listener = Listener(cfg, Sessions(cfg, FlowTable(64, 30.0)))
    sock = listener.socks[0]
    try:
        sock.bind((LOCALHOST, 0))
        sock.listen(16)
        with trio.fail_after(15), socket.create_connection(sock.getsockname()) as client:
            async with trio.open_nursery() as n:
                with out_of_descriptors():
                    assert await listener._accept_one(sock, n)  # accepted, and refused
                assert listener._reserve is not None  # held again
            client.settimeout(5)
            with pytest.raises(ConnectionResetError):
                client.recv(10)
        c = listener.counters
        assert (c.refused_no_fd, c.accept_errors, c.accepted) == (1, 1, 0)
    finally:
        listener.close()


# --- listener_tuning (pure) ---------------------------------------------------------------------


GEO = Link("sat0", 0.6, 20_000_000, 5_000_000, "reno")


def test_listener_tuning_is_the_client_leg_s_without_a_link() -> None:
    cfg = Config(client=LegTuning(sndbuf=1 << 20))
    assert listener_tuning(cfg) == cfg.client


def test_connections_arriving_on_the_link_get_the_link_s_buffers_only() -> None:
    """...on the listener, so the SYN-ACK's window is sized for the link. The rest of a link
    leg's tuning (congestion control, the outage timeouts) the session sets per link leg:
    inherited, it would reach every client, the LAN's too."""
    cfg = Config(interfaces=("sat0",), link=GEO, client=LegTuning(keepalive=True))
    tuning = listener_tuning(cfg)
    assert tuning == dataclasses.replace(cfg.client, sndbuf=GEO.sndbuf, rcvbuf=GEO.rcvbuf)
    assert GEO.leg_tuning(cfg.client).congestion == "reno"  # what it does not get


def test_a_link_elsewhere_leaves_the_listener_alone() -> None:
    cfg = Config(interfaces=("eth0",), link=GEO)
    assert listener_tuning(cfg) == cfg.client
