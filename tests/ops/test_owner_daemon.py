"""One owner for pep's kernel state in a namespace, with the real daemon (issue 20, D1), and the
other refusals a second pep or a bad start meets: a queue held by another process (D2), a key
file made unreadable before a SIGHUP (D5), directories pep must not leave behind (D6), a failed
start's error without a "stopped" summary (D11).

A second `pep run` (or `pep rules install`/`remove`) while a live daemon owns the namespace is
refused with exit 2, naming the owner's pid and status socket, and touches nothing: the rules
stay the first one's, byte for byte, whatever queue, port or socket the second asks for.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import trio

from pep.config.peer import keygen
from pep.testing.daemon import REPO, StartPep, pep_cli, status_json
from pep.testing.netenv import INGRESS, PORT, SERVER_IP, rules_in
from pep.testing.topology import Topology
from pep.testing.traffic import request, serving

pytestmark = pytest.mark.netns

SERVER = (SERVER_IP, PORT)


async def second(topo: Topology, *args: str) -> subprocess.CompletedProcess[bytes]:
    """Another `pep ...` in the gateway, as an operator would type it."""
    return await pep_cli(topo, "gw", *args)


def run_args(tmp_path: Path, name: str, *extra: str) -> list[str]:
    return ["run", "-i", INGRESS, "--status-socket", str(tmp_path / f"{name}.sock"), *extra]


async def assert_splits(topo: Topology) -> None:
    async with serving(topo, SERVER):
        assert await request(topo, SERVER, b"ping") == b"PING"


async def test_a_second_pep_is_refused_and_touches_nothing(
    topo: Topology, start_pep: StartPep, tmp_path: Path
) -> None:
    first = start_pep()
    rules = rules_in(topo, "gw")
    refused = await second(topo, *run_args(tmp_path, "b", "--queue", "1", "--listen-port", "5001"))
    err = refused.stderr.decode()
    assert refused.returncode == 2, err
    assert f"pid {first.pid}" in err and str(first.status_socket) in err
    assert "stopped:" not in err  # never started: no summary
    for action in ("install", "remove"):
        r = await second(topo, "rules", action, *(["-i", INGRESS] if action == "install" else []))
        assert r.returncode == 2 and f"pid {first.pid}" in r.stderr.decode(), r.stderr
    assert rules_in(topo, "gw") == rules  # nothing of the first one's changed
    await assert_splits(topo)
    assert (await status_json(first))["state"] == "running"
    first.stop()
    # The owner gone, the second one may start (and does its job).
    start_pep("--queue", "1", "--listen-port", "5001")
    await assert_splits(topo)


async def test_a_killed_owner_is_replaced_cleanly(
    topo: Topology, start_pep: StartPep, tmp_path: Path
) -> None:
    first = start_pep()
    jumps = rules_in(topo, "gw").count("-j PEP_SYN")
    first.signal(signal.SIGKILL)
    first.proc.wait(10)  # type: ignore[union-attr]
    # Its rules are left (pep fails open) and its lock died with it: a new start takes over.
    assert "PEP_SYN" in rules_in(topo, "gw")
    start_pep("--listen-port", "5002")
    await assert_splits(topo)
    rules = rules_in(topo, "gw")
    assert rules.count("-j PEP_SYN") == jumps  # replaced, not doubled
    assert "--to-ports 5002" in rules and "--to-ports 5000" not in rules


async def test_a_workers_master_owns_for_all_of_them(
    topo: Topology, start_pep: StartPep, tmp_path: Path
) -> None:
    config = tmp_path / "w.toml"
    config.write_text("workers = 2\n")
    master = start_pep(config=config)
    r = await second(topo, *run_args(tmp_path, "b"))
    assert r.returncode == 2 and f"pid {master.pid}" in r.stderr.decode(), r.stderr
    await assert_splits(topo)


async def test_a_queue_another_process_holds_is_named(
    topo: Topology, tmp_path: Path, start_pep: StartPep
) -> None:
    """D2: not "EPERM (needs CAP_NET_ADMIN)" as root, but who holds the queue."""
    code = (
        "import time; from pep.capture.nfq_socket import QueueSocket; q = QueueSocket(3, 1 << 20)"
        "; q.open(copy_mode=2, copy_range=64, maxlen=16, flags=0); print('bound', flush=True)"
        "; time.sleep(60)"
    )
    pythonpath = os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))
    holder = topo.popen(
        "gw",
        [sys.executable, "-c", code],
        stdout=subprocess.PIPE,
        env={**os.environ, "PYTHONPATH": pythonpath},
    )
    try:
        assert holder.stdout is not None and holder.stdout.readline() == b"bound\n"
        r = await second(topo, *run_args(tmp_path, "q", "--queue", "3"))
        err = r.stderr.decode()
        assert r.returncode == 1, err
        assert "held by another process" in err and "CAP_NET_ADMIN" not in err
        assert f"likely pid {holder.pid}" in err, err
        assert "stopped:" not in err
    finally:
        holder.kill()
        holder.wait()


async def test_sighup_checks_the_key_file_as_start_does(
    topo: Topology, start_pep: StartPep, tmp_path: Path
) -> None:
    """D5: a [peer] key file made readable by others is refused on SIGHUP, as at start."""
    key = tmp_path / "peer.key"
    key.write_text(keygen() + "\n")
    os.chmod(key, 0o600)
    config = tmp_path / "p.toml"
    config.write_text(
        f'[peer]\nkey_file = "{key}"\nlisten = "10.77.1.1:5001"\nallow = ["10.77.1.0/24"]\n'
    )
    pep = start_pep(config=config)
    os.chmod(key, 0o644)
    pep.signal(signal.SIGHUP)
    deadline = time.monotonic() + 10
    while (await status_json(pep))["reloads"]["failed"] < 1:
        assert time.monotonic() < deadline, pep.log()
        await trio.sleep(0.05)
    doc = await status_json(pep)
    assert "chmod 600" in doc["reloads"]["last_error"] and doc["reloads"]["ok"] == 0
    assert "reload rejected" in pep.log()


async def test_nothing_is_left_in_the_runtime_directory(
    topo: Topology, start_pep: StartPep, tmp_path: Path
) -> None:
    """D6: the namespace's runtime directory (the lock, the link's recovery file) is gone
    after a stop; a status socket in a directory that does not exist creates nothing."""
    run_dir = Path("/run/pep/netns") / topo.ns("gw")
    topo.run("gw", ["ip", "route", "add", "10.99.0.0/16", "via", SERVER_IP])
    config = tmp_path / "l.toml"
    config.write_text(
        '[link]\ninterface = "srv0"\nrtt = "20ms"\negress_rate = "10mbit"\n'
        'ingress_rate = "10mbit"\n'
    )
    pep = start_pep(config=config, own_status_socket=False)  # the default socket: run_dir
    assert (run_dir / "owner.lock").exists() and (run_dir / "link-routes.json").exists()
    pep.stop()
    assert not run_dir.exists(), sorted(run_dir.iterdir())
    nowhere = tmp_path / "no" / "such"
    r = await second(topo, "run", "-i", INGRESS, "--status-socket", str(nowhere / "x.sock"))
    assert r.returncode == 1 and f"{nowhere} does not exist" in r.stderr.decode(), r.stderr
    assert not (tmp_path / "no").exists() and not run_dir.exists()
    assert "PEP_SYN" not in rules_in(topo, "gw")  # a failed start leaves no rules


async def test_a_failed_start_says_why_and_not_what_it_did(topo: Topology, tmp_path: Path) -> None:
    """D11: the listen port taken: the error, and no "stopped: syn queued=0 ..." summary."""
    blocker = topo.popen(
        "gw", [sys.executable, "-c", "import socket, time; s = socket.socket(); "
               "s.bind(('0.0.0.0', 5010)); s.listen(); print('up', flush=True); time.sleep(60)"],
        stdout=subprocess.PIPE,
    )  # fmt: skip
    try:
        assert blocker.stdout is not None and blocker.stdout.readline() == b"up\n"
        r = await second(topo, *run_args(tmp_path, "d", "--listen-port", "5010"))
        err = r.stderr.decode()
        assert r.returncode == 1 and "cannot listen" in err and "stopped:" not in err, err
    finally:
        blocker.kill()
        blocker.wait()
