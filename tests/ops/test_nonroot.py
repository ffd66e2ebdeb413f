"""The daemon as a non-root user with only CAP_NET_ADMIN + CAP_NET_RAW, as deploy/pep.service
runs it: the core scenarios (every mode and IP version) pass unchanged, and so does status.

The core tests are imported, not copied: collected here they use this module's ``variant`` and
``pep`` fixtures, so the very same scenarios run against the unprivileged daemon.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from pep.testing.daemon import (
    NOBODY,
    ONLY_THOSE,
    PepProcess,
    StartPep,
    nonroot_prefix,
    proc_status,
    status_json,
)
from pep.testing.topology import Topology
from tests.split import test_core as core

# Collected here, the core scenarios use this module's ``variant`` and ``pep`` fixtures.
net, pep_args = core.net, core.pep_args
# Both modes and both IP versions' code paths: the daemon installs both families' rules in
# every variant, so these two exercise iptables, ip6tables, REDIRECT, TPROXY and its routes.
VARIANTS = [("redirect", 4), ("tproxy", 6)]


@pytest.fixture(params=VARIANTS, ids=[f"{m}-ipv{f}" for m, f in VARIANTS])
def variant(request: pytest.FixtureRequest) -> tuple[str, int]:
    return request.param


test_request_response_is_split = core.test_request_response_is_split
test_100mib_each_way_byte_exact = core.test_100mib_each_way_byte_exact
test_half_close_then_10mib_reply = core.test_half_close_then_10mib_reply
test_closed_upstream_port_resets_client_fast = core.test_closed_upstream_port_resets_client_fast
test_200_concurrent_connections = core.test_200_concurrent_connections
test_sigterm_removes_rules = core.test_sigterm_removes_rules_and_traffic_flows_end_to_end
test_kill9_fails_open = core.test_kill9_fails_open_and_restart_replaces_stale_rules
test_direct_connection_refused = core.test_direct_connection_to_listener_is_refused

pytestmark = pytest.mark.netns


@pytest.fixture
def pep(nobody_dir: Path, start_pep: StartPep, pep_args: list[str]) -> Iterator[PepProcess]:
    p = start_pep(*pep_args, status_socket=str(nobody_dir / "pep.sock"), prefix=nonroot_prefix())
    yield p
    _assert_unprivileged(p)


def _assert_unprivileged(p: PepProcess) -> None:
    """Checked after each test too: the daemon never gained anything."""
    if not p.running:
        return
    st = proc_status(p.pid)
    assert st["Uid"].split() == [str(NOBODY)] * 4
    assert st["Gid"].split() == [str(NOBODY)] * 4
    for kind in ("CapEff", "CapPrm", "CapBnd", "CapAmb"):
        assert int(st[kind], 16) == ONLY_THOSE, (kind, st[kind])
    assert st["NoNewPrivs"] == "1"


@pytest.mark.parametrize("variant", [("redirect", 4)], indirect=True)
async def test_nonroot_daemon_has_only_two_capabilities_and_serves_status(
    topo: Topology, pep: PepProcess
) -> None:
    _assert_unprivileged(pep)
    assert pep.status_socket is not None
    st = os.stat(pep.status_socket)
    assert (st.st_uid, st.st_mode & 0o777) == (NOBODY, 0o660)
    doc = await status_json(pep)
    assert doc["kernel_queues"] is None and "Permission denied" in doc["kernel_queues_error"]
    doc = await status_json(pep, in_ns=True)
    assert doc["state"] == "running" and doc["pid"] == pep.pid
    # The kernel's queue counters file is 0440 root:root: the daemon cannot read it, and
    # `pep status` run as root in the daemon's namespace fills them in itself.
    assert [q["queue"] for q in doc["kernel_queues"]] == [0]
