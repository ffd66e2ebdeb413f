"""The listener's loop-guard memory (pep.listener.LocalAddresses): pure apart from bind()."""

from __future__ import annotations

import pytest

from pep import listener
from pep.listener import LocalAddresses


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def asked(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Each address the guard really probed (bind), in order."""
    calls: list[str] = []
    real = listener.is_local_address

    def probe(host: str) -> bool:
        calls.append(host)
        return real(host)

    monkeypatch.setattr(listener, "is_local_address", probe)
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
