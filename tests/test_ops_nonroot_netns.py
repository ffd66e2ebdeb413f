"""The daemon as a non-root user with only CAP_NET_ADMIN + CAP_NET_RAW, as deploy/pep.service
runs it: the core scenarios (every mode and IP version) pass unchanged, and so does status.

The core tests are imported, not copied: collected here they use this module's ``topo`` and
``pep`` fixtures, so the very same scenarios run against the unprivileged daemon.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Iterator

import pytest

from pep.topology import Topology
from tests.netenv import PepProcess, gateway_topology
from tests.opsenv import NOBODY, nonroot_prefix, proc_status, status_json
from tests.test_core_netns import (  # noqa: F401  (fixtures and tests collected here)
    net,
    pep_args,
    test_100mib_each_way_byte_exact,
    test_200_concurrent_connections,
    test_closed_upstream_port_resets_client_fast,
    test_direct_connection_to_listener_is_refused,
    test_half_close_then_10mib_reply,
    test_kill9_fails_open_and_restart_replaces_stale_rules,
    test_request_response_is_split,
    test_sigterm_removes_rules_and_traffic_flows_end_to_end,
    variant,
)

pytestmark = pytest.mark.netns

CAP_NET_ADMIN, CAP_NET_RAW = 12, 13  # include/uapi/linux/capability.h
ONLY_THOSE = (1 << CAP_NET_ADMIN) | (1 << CAP_NET_RAW)


@pytest.fixture
def topo() -> Iterator[Topology]:
    with gateway_topology("on") as t:
        yield t


@pytest.fixture
def run_dir() -> Iterator[str]:
    """What RuntimeDirectory=pep gives the service: a directory the daemon's user owns."""
    d = tempfile.mkdtemp(prefix="pep-nonroot-")
    os.chown(d, NOBODY, NOBODY)
    try:
        yield d
    finally:
        shutil.rmtree(d, ignore_errors=True)


@pytest.fixture
def pep(topo: Topology, pep_args: list[str], run_dir: str) -> Iterator[PepProcess]:
    p = PepProcess(
        topo,
        "gw",
        pep_args,
        status_socket=os.path.join(run_dir, "pep.sock"),
        prefix=nonroot_prefix(),
    )
    try:
        yield p.start()
        _assert_unprivileged(p)
    finally:
        p.stop()


def _assert_unprivileged(p: PepProcess) -> None:
    """Checked after each test too: the daemon never gained anything."""
    if p.proc is None or p.proc.poll() is not None:
        return
    st = proc_status(p.proc.pid)
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
    assert doc["state"] == "running" and doc["pid"] == pep.proc.pid  # type: ignore[union-attr]
    # The kernel's queue counters file is 0440 root:root: the daemon cannot read it, and
    # `pep status` (run as root here) fills them in itself.
    assert doc["kernel_queues"] and doc["kernel_queues"][0]["queue"] == 0
