"""Shared test plumbing.

Tests that need root and network namespaces carry the ``netns`` marker. Unprivileged runs skip
them with a reason; under ``CI=true`` they fail instead, so a CI machine that silently lost its
privileges cannot pass by skipping the integration suite.
"""

from __future__ import annotations

import functools
import os
import shutil
from collections.abc import Iterator
from typing import Any

import pytest


@functools.cache
def netns_unavailable() -> str | None:
    """Why namespace tests cannot run here, or None when they can."""
    if os.geteuid() != 0:
        return "needs root (network namespaces, iptables, NFQUEUE)"
    for tool in ("iptables-legacy", "ip"):
        if shutil.which(tool) is None:
            return f"`{tool}` is not installed (Debian packages iptables, iproute2)"
    return None


def pytest_runtest_setup(item: pytest.Item) -> None:
    if item.get_closest_marker("netns") is None:
        return
    reason = netns_unavailable()
    if reason is None:
        return
    if os.environ.get("CI", "").lower() == "true":
        pytest.fail(f"CI=true but this test cannot run: {reason}", pytrace=False)
    pytest.skip(reason)


@pytest.fixture
def peps() -> Iterator[list[Any]]:
    """Daemons a test starts (tests.netenv.PepProcess): stopped at teardown, pass or fail."""
    started: list[Any] = []
    yield started
    for p in started:
        p.stop()
