"""Configuration against the real daemon in namespaces: a bad interface name is refused before
anything is installed."""

from __future__ import annotations

import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import trio

from pep.topology import Topology
from tests.netenv import gateway_topology, rules_in

pytestmark = pytest.mark.netns


@pytest.fixture
def topo() -> Iterator[Topology]:
    with gateway_topology("cf") as t:
        yield t


async def pep_cli(topo: Topology, node: str, *args: str) -> trio.Process:
    argv = ["ip", "netns", "exec", topo.ns(node), sys.executable, "-m", "pep.cli", *args]
    return await trio.run_process(argv, capture_stdout=True, capture_stderr=True, check=False)


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
