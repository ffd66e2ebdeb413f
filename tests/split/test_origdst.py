"""Where an accepted client was going (pep.split.origdst): the loop guard's memory, the original
destination by mode. Pure apart from bind() and one getsockopt."""

from __future__ import annotations

import socket

import pytest

from pep.split import origdst
from pep.split.origdst import LocalAddresses, OriginalDst


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def asked(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Each address the guard really probed (bind), in order."""
    calls: list[str] = []
    real = origdst.is_local_address

    def probe(host: str) -> bool:
        calls.append(host)
        return real(host)

    monkeypatch.setattr(origdst, "is_local_address", probe)
    return calls


def test_answers_like_the_probe() -> None:
    local = LocalAddresses()
    assert "127.0.0.1" in local
    assert "203.0.113.1" not in local  # TEST-NET-3 (RFC 5737): documentation only


def test_each_address_is_probed_once_per_ttl(asked: list[str]) -> None:
    clock = Clock()
    local = LocalAddresses(ttl=1.0, clock=clock)
    for _ in range(3):
        assert "127.0.0.1" in local
        assert "203.0.113.1" not in local
    assert asked == ["127.0.0.1", "203.0.113.1"]
    clock.now += 1.0  # expired: asked again (an address added since is guarded from now on)
    assert "203.0.113.1" not in local
    assert asked == ["127.0.0.1", "203.0.113.1", "203.0.113.1"]


def test_memory_is_bounded(asked: list[str]) -> None:
    local = LocalAddresses(size=2, clock=Clock())
    for host in ("203.0.113.1", "203.0.113.2", "203.0.113.3"):
        assert host not in local
    assert len(local._known) <= 2
    assert "203.0.113.3" not in local  # kept after the reset
    assert asked.count("203.0.113.3") == 1


def test_tproxy_destination_is_the_socket_s_own_address_unless_it_is_the_listener() -> None:
    od = OriginalDst("tproxy", 5000, LocalAddresses(clock=Clock()))
    assert od.lookup(None, ("203.0.113.1", 80)) == ("203.0.113.1", 80)  # type: ignore[arg-type]
    # Our port on one of our addresses: a direct connection to the listener.
    assert od.lookup(None, ("127.0.0.1", 5000)) is None  # type: ignore[arg-type]
    # One of our addresses on another port: TPROXY'd, refused later by the loop guard.
    assert od.lookup(None, ("127.0.0.1", 80)) == ("127.0.0.1", 80)  # type: ignore[arg-type]


def test_redirect_destination_needs_a_conntrack_entry() -> None:
    od = OriginalDst("redirect", 5000, LocalAddresses(clock=Clock()))
    with socket.socket() as untracked:
        assert od.lookup(untracked, ("127.0.0.1", 5000)) is None
