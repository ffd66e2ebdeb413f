"""Configuration against the real daemon in namespaces: a bad interface name is refused before
anything is installed, a missing interface is a warning, and the default status socket differs
per named namespace, so two peps on one host need no status_socket line."""

from __future__ import annotations

import contextlib
import json
import os
from pathlib import Path

import pytest

from pep.config import paths
from pep.testing.daemon import PepProcess, StartPep, pep_cli
from pep.testing.netenv import INGRESS, rules_in
from pep.testing.topology import Topology

pytestmark = pytest.mark.netns


@pytest.mark.parametrize("where", ["file", "flag"])
async def test_bad_interface_name_exits_2_and_installs_nothing(
    topo: Topology, tmp_path: Path, where: str
) -> None:
    """`interfaces = ["eth!1"]` passed the config check, then RuleSpec raised: a traceback,
    exit 1. The config check is now the one check, strict enough for iptables."""
    sock = tmp_path / "pep.sock"
    conf = tmp_path / "pep.toml"
    conf.write_text('interfaces = ["eth!1"]\n' if where == "file" else "")
    args = ["run", "--config", str(conf), "--status-socket", str(sock)]
    if where == "flag":
        args += ["--interface", "eth!1"]
    r = await pep_cli(topo, "gw", *args)
    assert r.returncode == 2, r.stderr
    assert r.stderr.decode() == (
        "pep: config: interfaces = 'eth!1': is not a valid interface name "
        "(1-15 chars, no whitespace, '/', ':', '!')\n"
    )
    assert not sock.exists()
    state = rules_in(topo, "gw")
    assert "PEP" not in state and "NFQUEUE" not in state and "proto 94" not in state


def own_socket(topo: Topology, node: str) -> str:
    """Where pep's default puts the status socket in this node's namespace (README)."""
    return f"/run/pep/netns/{topo.ns(node)}/pep.sock"


async def test_two_namespaces_default_status_sockets_and_missing_interface(
    topo: Topology, start_pep: StartPep, peps: list[PepProcess]
) -> None:
    """Two peps, two namespaces, no status_socket configured: both start (they collided on
    /run/pep/pep.sock) and `pep status` in each namespace finds its own daemon."""
    runs = {"gw": [INGRESS, "nonexist0"], "server": ["eth0"]}
    made_run_dir = not os.path.exists(paths.RUN_DIR)
    try:
        for node, interfaces in runs.items():
            start_pep(node=node, interfaces=interfaces, own_status_socket=False)  # into peps
        for pep, (node, interfaces) in zip(peps, runs.items(), strict=True):
            assert os.path.exists(own_socket(topo, node))
            r = await pep_cli(topo, node, "status", "--json")
            assert r.returncode == 0, r.stderr
            doc = json.loads(r.stdout)
            assert doc["pid"] == pep.pid
            assert doc["config"]["interfaces"] == interfaces
            assert doc["config"]["status_socket"] == own_socket(topo, node)
        assert own_socket(topo, "gw") != own_socket(topo, "server")
        assert paths.RUN_DIR + "/pep.sock" not in {own_socket(topo, n) for n in runs}
        # An ingress interface that does not exist is said at start, once, and pep runs.
        gw_log = peps[0].log()
        assert gw_log.count("interface nonexist0 does not exist (yet)") == 1, gw_log
        assert "does not exist" not in peps[1].log()
    finally:
        for p in peps:  # every one start_pep began, even one that never got ready
            p.stop()
        # Only what this test made, and only if empty: another run may be using it.
        leftovers = [os.path.dirname(own_socket(topo, node)) for node in runs]
        leftovers += [os.path.join(paths.RUN_DIR, "netns")] + [paths.RUN_DIR] * made_run_dir
        for directory in leftovers:
            with contextlib.suppress(OSError):
                os.rmdir(directory)
