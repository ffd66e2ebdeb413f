"""The link's sharer with real loopback TCP sockets (no root): the caps it sets are read back
from the kernel (SO_MAX_PACING_RATE), its tick reads the sockets' tcp_info.

Loopback plays the link here (the route to 127.0.0.1 leaves through ``lo``). A link leg that
must stay active keeps unsent bytes in its socket (its peer reads nothing), as a leg does while
the link is its bottleneck; one that pep gives nothing more goes idle at the next tick.
"""

from __future__ import annotations

import contextlib
import dataclasses
import socket
from collections.abc import AsyncIterator, Callable, Iterator

import pytest
import trio

from pep.config.link import Link
from pep.link.pacer import SO_MAX_PACING_RATE, Sharer
from pep.split.relay_state import RelayStats
from tests.helpers.loopback import listening

LINK = Link("lo", 0.6, 20_000_000, 5_000_000, "cubic")
MTU = 1500
LO = socket.if_nametoindex("lo")
CAPACITY = LINK.pacing_capacity(MTU)  # payload bytes/s


def pacing(sock: socket.socket) -> int:
    return sock.getsockopt(socket.SOL_SOCKET, SO_MAX_PACING_RATE)


@contextlib.contextmanager
def legs(n: int) -> Iterator[list[socket.socket]]:
    """``n`` connected loopback sockets, their peers open but never read."""
    with listening() as srv:
        mine, theirs = [], []
        try:
            for _ in range(n):
                mine.append(socket.create_connection(srv.getsockname()))
                theirs.append(srv.accept()[0])
            yield mine
        finally:
            for sock in mine + theirs:
                sock.close()


def backlog(sock: socket.socket) -> None:
    """Fill the socket until it takes no more: its bytes wait unsent, the leg stays busy."""
    sock.setblocking(False)
    with contextlib.suppress(BlockingIOError):
        while True:
            sock.send(bytes(1 << 16))


@contextlib.asynccontextmanager
async def running(sharer: Sharer) -> AsyncIterator[Sharer]:
    with trio.fail_after(15):
        async with trio.open_nursery() as n:
            await n.start(sharer.run)
            yield sharer
            n.cancel_scope.cancel()


async def until(condition: Callable[[], bool]) -> None:
    """Until ``condition`` holds (the test's fail_after bounds it): the sharer's tick and its
    reshare run on their own time."""
    while not condition():
        await trio.sleep(0.01)


def test_the_legs_that_face_the_link_are_those_routed_through_its_interface() -> None:
    assert Sharer(LINK, LO, MTU).faces_link("127.0.0.1")
    assert not Sharer(LINK, LO + 1000, MTU).faces_link("127.0.0.1")


async def test_a_leg_is_capped_from_the_moment_it_joins() -> None:
    """Idle, with an equal share (bytes sent before its first wake are paced too); woken, with
    its max-min share: alone, the whole link."""
    sharer = Sharer(LINK, LO, MTU)
    with legs(1) as [sock]:
        leg = sharer.open(sock, RelayStats(), up=True)
        assert not leg.active and pacing(sock) == int(leg.share) == int(CAPACITY)
        leg.wake()
        assert leg.active and pacing(sock) == int(CAPACITY)
        assert sharer.snapshot()["flows_active"] == 1


async def test_busy_legs_share_the_link_and_a_closed_one_gives_its_share_back() -> None:
    sharer = Sharer(LINK, LO, MTU)
    with legs(3) as socks:
        async with running(sharer):
            opened = [sharer.open(sock, RelayStats(), up=True) for sock in socks]
            for sock, leg in zip(socks, opened, strict=True):
                backlog(sock)
                leg.wake()
            third = int(CAPACITY / 3)
            await until(lambda: all(abs(pacing(s) - third) <= 1 for s in socks))
            sharer.close(opened[0])
            half = int(CAPACITY / 2)
            await until(lambda: all(abs(pacing(s) - half) <= 1 for s in socks[1:]))
            snap = sharer.snapshot()
            assert (snap["flows"], snap["flows_active"], snap["flows_total"]) == (2, 2, 3)
            assert sharer.totals.bytes_sent > 0  # the closed leg's, read from its tcp_info


async def test_a_leg_with_nothing_more_to_send_goes_idle_at_the_next_tick() -> None:
    sharer = Sharer(LINK, LO, MTU)
    with legs(2) as [quiet, busy]:
        async with running(sharer):
            idle_leg = sharer.open(quiet, RelayStats(), up=True)
            busy_leg = sharer.open(busy, RelayStats(), up=True)
            backlog(busy)
            busy_leg.wake()
            idle_leg.wake()  # pep was about to write, but wrote nothing
            await until(lambda: not idle_leg.active)
            await until(lambda: pacing(busy) == int(CAPACITY))  # its share came back
            assert busy_leg.active


async def test_a_resized_link_is_shared_at_its_new_rate() -> None:
    sharer = Sharer(LINK, LO, MTU)
    faster = dataclasses.replace(LINK, egress_rate=2 * LINK.egress_rate)
    with legs(1) as [sock]:
        async with running(sharer):
            leg = sharer.open(sock, RelayStats(), up=True)
            backlog(sock)
            leg.wake()
            sharer.resize(faster, MTU)
            new = faster.pacing_capacity(MTU)
            await until(lambda: pacing(sock) == int(new))
            assert sharer.snapshot()["pacing_capacity_bps"] == round(new * 8)


@pytest.mark.parametrize("up", [True, False])
async def test_the_snapshot_describes_the_link_and_counts_its_legs(up: bool) -> None:
    sharer = Sharer(LINK, LO, MTU)
    with legs(1) as [sock]:
        stats = RelayStats()
        leg = sharer.open(sock, stats, up=up)
        sock.sendall(b"x" * 1000)
        setattr(stats, "up" if up else "down", 1000)
        assert leg.written == 1000  # the relay's count for the leg's direction
        sharer.close(leg)
        sharer.close(leg)  # twice: no harm
    snap = sharer.snapshot()
    assert snap["interface"] == "lo" and snap["egress_bps"] == LINK.egress_rate
    assert (snap["flows"], snap["flows_active"], snap["flows_total"]) == (0, 0, 1)
    assert snap["bytes_sent"] == 1000
