"""One owner for pep's kernel state in a namespace, with the real daemon (issue 20, D1), and the
other refusals a second pep or a bad start meets: a queue held by another process (D2), a key
file made unreadable before a SIGHUP (D5), directories pep must not leave behind (D6), a failed
start's error without a "stopped" summary (D11).

A second `pep run` (or `pep rules install`/`remove`) while a live daemon owns the namespace is
refused with exit 2, naming the owner's pid and status socket, and touches nothing: the rules
stay the first one's, byte for byte, whatever queue, port or socket the second asks for.
"""

from __future__ import annotations

import contextlib
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import trio

from pep.config import paths
from pep.config.peer import keygen
from pep.kernel import owner
from pep.testing.daemon import REPO, StartPep, pep_cli, status_json
from pep.testing.netenv import INGRESS, PORT, SERVER_IP, rules_in
from pep.testing.topology import Topology
from pep.testing.traffic import connect, read_until_end, recv_to_eof, request, send_all, serving

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


OTHER = ("--queue", "1", "--listen-port", "5001")
ORDERS = {"default-first": ((), OTHER), "other-first": (OTHER, ())}


@pytest.mark.parametrize("order", ORDERS)
async def test_a_second_pep_is_refused_and_touches_nothing(
    topo: Topology, start_pep: StartPep, tmp_path: Path, order: str
) -> None:
    first_args, second_args = ORDERS[order]
    first = start_pep(*first_args)
    rules = rules_in(topo, "gw")
    refused = await second(topo, *run_args(tmp_path, "b", *second_args))
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
    start_pep(*second_args)
    await assert_splits(topo)


def redirect_ports(topo: Topology) -> set[str]:
    return set(re.findall(r"--to-ports (\d+)", rules_in(topo, "gw")))


async def wait_unowned(topo: Topology, timeout: float = 15) -> None:
    """Until nothing holds the namespace's ownership lock (a killed master's workers exit on
    their parent's death, after their drain)."""
    run_dir = paths.runtime_dir_for(topo.ns("gw"))
    with trio.fail_after(timeout):
        while owner.holder(run_dir) is not None:
            await trio.sleep(0.05)


@pytest.mark.parametrize("workers", [1, 2])
async def test_every_stop_leaves_the_namespace_to_the_next_start(
    topo: Topology, start_pep: StartPep, workers: int
) -> None:
    """SIGTERM, SIGINT and kill -9, each followed by a start on another port: each new owner
    has the namespace's rules to itself (one set, its port only) and splits."""
    config = f"workers = {workers}\ndrain_timeout = 2.0\n"
    jumps = None
    stops = [signal.SIGTERM, signal.SIGINT, signal.SIGKILL, None]
    for port, stop in enumerate(stops, start=5000):
        pep = start_pep("--listen-port", str(port), config=config, timeout=30)
        await assert_splits(topo)
        assert redirect_ports(topo) == {str(port)}
        jumps = jumps or rules_in(topo, "gw").count("-j PEP_SYN")
        assert rules_in(topo, "gw").count("-j PEP_SYN") == jumps  # replaced, never doubled
        if stop is None:
            break
        pep.signal(stop)
        code = await trio.to_thread.run_sync(pep.wait, 20)
        if stop == signal.SIGKILL:
            assert code == -9 and redirect_ports(topo) == {str(port)}  # left: fails open
            await wait_unowned(topo)
        else:
            assert code == 0 and "PEP" not in rules_in(topo, "gw"), pep.log()
            assert owner.holder(paths.runtime_dir_for(topo.ns("gw"))) is None


async def hold(conn: trio.socket.SocketType) -> None:
    """A server that keeps its connection until the client's end (here: pep's reset)."""
    with contextlib.suppress(OSError):
        await recv_to_eof(conn)


async def test_a_killed_workers_master_owns_until_its_workers_are_done(
    topo: Topology, start_pep: StartPep, tmp_path: Path
) -> None:
    """The workers outlive a master killed with kill -9 for their drain, still bound to the
    queues and relaying: the namespace stays theirs. A new start meanwhile (on other queues
    and another port, so nothing else would stop it) is refused, saying the master is gone;
    once the workers are done, it takes over."""
    master = start_pep(config="workers = 2\ndrain_timeout = 3.0\n", timeout=30)
    async with serving(topo, SERVER, hold) as accepted:
        held = await connect(topo.ns("client"), SERVER)
        with held:
            await send_all(held, b"held through a worker")
            with trio.fail_after(5):
                while not accepted:  # split: a worker has connected upstream
                    await trio.sleep(0.02)
            master.signal(signal.SIGKILL)
            assert await trio.to_thread.run_sync(master.wait, 10) == -9
            other = ("--queue", "7", "--listen-port", "5007")
            refused = await second(topo, *run_args(tmp_path, "b", *other))
            err = refused.stderr.decode()
            assert refused.returncode == 2, err
            assert f"pid {master.pid}, which has exited" in err and "workers" in err, err
            assert redirect_ports(topo) == {"5000"}  # the workers' rules, untouched
            with trio.fail_after(15):  # the drain ends: the worker resets the connection
                assert (await read_until_end(held))[0] == "reset"
    await wait_unowned(topo)
    start_pep(*other)
    await assert_splits(topo)
    assert redirect_ports(topo) == {"5007"}


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
    # A netfilter netlink socket first, so the queue's socket gets a port id that is not
    # the holder's pid (as in pep itself, and in the lab's delay line): found exactly anyway.
    code = (
        "import socket, time; from pep.capture.nfq_socket import QueueSocket"
        "; first = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, 12); first.bind((0, 0))"
        "; q = QueueSocket(3, 1 << 20)"
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
        assert f", pid {holder.pid}: " in err and "likely" not in err, err
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


@pytest.mark.parametrize("workers", [1, 2])
async def test_a_failed_start_says_why_and_not_what_it_did(
    topo: Topology, tmp_path: Path, workers: int
) -> None:
    """D11: the listen port taken: the error, and no "stopped: ..." summary (a workers
    master's "stopped: worker exit statuses" neither)."""
    config = tmp_path / "w.toml"
    config.write_text(f"workers = {workers}\n")
    blocker = topo.popen(
        "gw", [sys.executable, "-c", "import socket, time; s = socket.socket(); "
               "s.bind(('0.0.0.0', 5010)); s.listen(); print('up', flush=True); time.sleep(60)"],
        stdout=subprocess.PIPE,
    )  # fmt: skip
    try:
        assert blocker.stdout is not None and blocker.stdout.readline() == b"up\n"
        r = await second(
            topo, *run_args(tmp_path, "d", "--listen-port", "5010"), "--config", str(config)
        )
        err = r.stderr.decode()
        assert r.returncode == 1 and "cannot listen" in err and "stopped:" not in err, err
    finally:
        blocker.kill()
        blocker.wait()
