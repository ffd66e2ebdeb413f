"""[peer] with two real daemons: gw1 (near end, splitting the client's flows) keeps pooled
connections to gw2's peer listener (far end); flows go through them, byte for byte, with their
half-close and their resets, and nobody else gets through the peer port.

    client 10.78.1.2 — in0 gw1 out0 10.78.2.1 — 10.78.2.2 in0 gw2 out0 — 10.78.3.2 server
"""

from __future__ import annotations

import os
import signal
import socket
import struct
import sys
import time
from pathlib import Path

import pytest
import trio

from pep.config.peer import keygen
from pep.peer import wire as peerwire
from pep.testing.daemon import PepProcess, StartPep, status_json
from pep.testing.netenv import PORT, rules_in, series
from pep.testing.topology import Topology
from pep.testing.traffic import (
    connect,
    duplex,
    echo_upper,
    recv_to_eof,
    request,
    send_all,
    sending,
    serving,
    sha,
)
from tests.helpers.peer import near_handshake

pytestmark = [
    pytest.mark.netns,
    pytest.mark.parametrize("topo_layout", [series], ids=["series"]),
]

SERVER = ("10.78.3.2", PORT)
RESET = struct.pack("ii", 1, 0)  # SO_LINGER on, 0 s: close() sends an RST
PEER = "10.78.2.2:5001"


def key_file(tmp_path: Path, name: str = "peer.key", text: str | None = None) -> Path:
    path = tmp_path / name
    path.write_text((text or keygen()) + "\n")
    os.chmod(path, 0o600)
    return path


def far_config(key: Path) -> str:
    return (
        f'family = "ipv4"\n[peer]\nkey_file = "{key}"\nlisten = "{PEER}"\n'
        'allow = ["10.78.2.0/24"]\n'
    )


def near_config(key: Path, pool: int = 4) -> str:
    return f'family = "ipv4"\n[peer]\nkey_file = "{key}"\nconnect = "{PEER}"\npool = {pool}\n'


async def pool_ready(near: PepProcess, n: int, timeout: float = 10) -> dict[str, object]:
    deadline = time.monotonic() + timeout
    while True:
        pool = (await status_json(near))["peer"]["pool"]
        if pool["ready"] >= n:
            return pool
        assert time.monotonic() < deadline, (pool, near.log())
        await trio.sleep(0.05)


def two_peps(start_pep: StartPep, tmp_path: Path, pool: int = 4) -> tuple[PepProcess, PepProcess]:
    key = key_file(tmp_path)
    far = start_pep(config=far_config(key), node="gw2", interfaces=("in0",))
    near = start_pep(config=near_config(key, pool), node="gw1", interfaces=("in0",))
    return near, far


async def test_a_pooled_flow_carries_50_mb_each_way_byte_exact(
    topo: Topology, start_pep: StartPep, tmp_path: Path
) -> None:
    near, far = two_peps(start_pep, tmp_path)
    await pool_ready(near, 4)
    up, down = os.urandom(50 * 1024 * 1024), os.urandom(50 * 1024 * 1024)
    d = await duplex(topo, SERVER[0], SERVER[1], sending(up), sending(down), timeout=120)
    assert d.server_got == (sha(up), len(up))
    assert d.client_got == (sha(down), len(down))
    assert [a[0] for a in d.accepted] == ["10.78.3.1"]  # connected by gw2, the far end
    pool = (await status_json(near))["peer"]["pool"]
    assert (pool["taken"], pool["fallback"]) == (1, 0)
    listener = (await status_json(far))["peer"]["listener"]
    assert (listener["accepted"], listener["flows"]) == (pool["opened"], 1)
    # gw2 relayed it as a split connection of its own, and saw no SYN of it (no handshake)
    assert (await status_json(far))["syn"].get("queued", 0) == 0


async def test_half_close_and_many_flows_through_the_pool(
    topo: Topology, start_pep: StartPep, tmp_path: Path
) -> None:
    near, _ = two_peps(start_pep, tmp_path, pool=2)
    await pool_ready(near, 2)
    async with serving(topo, SERVER, echo_upper):
        for i in range(12):  # more than the pool holds: it refills (or flows go direct)
            payload = b"half-closed %d " % i + os.urandom(100_000)
            # request(): the client sends, shuts down its side, reads the answer to EOF
            assert await request(topo, SERVER, payload) == payload.upper()
    pool = (await status_json(near))["peer"]["pool"]
    assert pool["taken"] + pool["fallback"] == 12 and pool["taken"] >= 2


async def test_resets_travel_both_ways(topo: Topology, start_pep: StartPep, tmp_path: Path) -> None:
    near, _ = two_peps(start_pep, tmp_path)
    await pool_ready(near, 4)
    seen: list[str] = []

    async def server_resets(conn: trio.socket.SocketType) -> None:
        await conn.recv(100)
        conn.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, RESET)
        conn.close()

    async def server_waits(conn: trio.socket.SocketType) -> None:
        try:
            while await conn.recv(1 << 16):
                pass
            seen.append("eof")
        except OSError as e:
            seen.append(type(e).__name__)

    with trio.fail_after(20):
        async with serving(topo, SERVER, server_resets):
            sock = await connect(topo.ns("client"), SERVER)
            with sock:
                await send_all(sock, b"hello")
                with pytest.raises(ConnectionResetError):
                    await recv_to_eof(sock)
        async with serving(topo, SERVER, server_waits):
            sock = await connect(topo.ns("client"), SERVER)
            await send_all(sock, b"x" * 1000)
            await trio.sleep(0.5)
            sock.setsockopt(
                socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00"
            )
            sock.close()
            while not seen:
                await trio.sleep(0.05)
    assert seen == ["ConnectionResetError"]
    assert (await status_json(near))["peer"]["pool"]["taken"] == 2


async def test_a_refused_destination_resets_the_client(
    topo: Topology, start_pep: StartPep, tmp_path: Path
) -> None:
    near, far = two_peps(start_pep, tmp_path)
    await pool_ready(near, 4)
    with trio.fail_after(20):
        sock = await connect(topo.ns("client"), SERVER)  # nothing listens on the server
        with sock:
            await send_all(sock, b"anyone there?")
            with pytest.raises(ConnectionResetError):
                await recv_to_eof(sock)
    assert (await status_json(far))["peer"]["listener"]["upstream_failed"] == 1
    assert (await status_json(near))["upstream_failures"] == {"far end: connect refused": 1}


async def handshake(topo: Topology, node: str, secret: bytes) -> trio.socket.SocketType:
    """A hand-made near end in ``node``: the handshake with ``secret``; the socket after READY."""
    sock = await connect(topo.ns(node), ("10.78.2.2", 5001))
    await near_handshake(sock, secret)
    return sock


async def test_strangers_wrong_keys_and_garbage_get_nowhere(
    topo: Topology, start_pep: StartPep, tmp_path: Path
) -> None:
    key = key_file(tmp_path)
    far = start_pep(config=far_config(key), node="gw2", interfaces=("in0",))
    secret = bytes.fromhex(key.read_text().strip())
    accepted: list[tuple[str, int]] = []
    with trio.fail_after(30):
        async with serving(topo, SERVER, echo_upper, accepted):
            # From outside `allow` (the client's network): reset at once (so fast that the
            # connect itself may report it).
            with pytest.raises(ConnectionResetError):
                sock = await connect(topo.ns("client"), ("10.78.2.2", 5001))
                with sock:
                    await recv_to_eof(sock)
            # From inside, with a wrong key: no READY, closed.
            with pytest.raises(ConnectionResetError):
                await handshake(topo, "gw1", os.urandom(32))
            # Garbage, and a flow header before any handshake: closed.
            for junk in (
                b"GET / HTTP/1.1\r\n\r\n" + bytes(64),
                peerwire.encode_flow(peerwire.Flow(SERVER, ("10.78.1.2", 1))) + bytes(64),
            ):
                sock = await connect(topo.ns("gw1"), ("10.78.2.2", 5001))
                with sock, pytest.raises(ConnectionResetError):
                    await send_all(sock, junk)  # the reset may already answer the send
                    await recv_to_eof(sock)
            # The right key but a destination that is the far PEP itself: FORBIDDEN.
            sock = await handshake(topo, "gw1", secret)
            with sock:
                own = peerwire.Flow(("10.78.3.1", 22), ("10.78.1.2", 1))
                await send_all(sock, peerwire.encode_flow(own))
                assert await sock.recv(1) == bytes([peerwire.FORBIDDEN])
            # The right key, a good header: it does connect (the test's own positive control).
            sock = await handshake(topo, "gw1", secret)
            with sock:
                await send_all(sock, peerwire.encode_flow(peerwire.Flow(SERVER, ("10.78.1.2", 9))))
                assert await sock.recv(1) == bytes([peerwire.CONNECTED])
                await send_all(sock, b"only this one")
                sock.shutdown(socket.SHUT_WR)
                assert await recv_to_eof(sock) == b"ONLY THIS ONE"
    assert len(accepted) == 1  # nothing but the positive control reached the server
    listener = (await status_json(far))["peer"]["listener"]
    assert listener["not_allowed"] == 1
    assert listener["auth_failed"] == 3  # wrong key, garbage, header before the handshake
    assert listener["forbidden"] == 1 and listener["flows"] == 1
    assert "not in peer.allow" in far.log() and "handshake failed" in far.log()


async def test_peer_killed_flows_go_direct_peer_back_the_pool_refills(
    topo: Topology, start_pep: StartPep, tmp_path: Path
) -> None:
    key = key_file(tmp_path)
    far = start_pep(config=far_config(key), node="gw2", interfaces=("in0",))
    near = start_pep(config=near_config(key), node="gw1", interfaces=("in0",))
    await pool_ready(near, 4)
    far.signal(signal.SIGKILL)
    far.wait(10)
    with trio.fail_after(60):
        async with serving(topo, SERVER, echo_upper):
            for i in range(6):
                payload = b"while the peer is down %d" % i
                assert await request(topo, SERVER, payload) == payload.upper()
            pool = (await status_json(near))["peer"]["pool"]
            assert pool["fallback"] >= 6 - pool["taken"] and pool["fallback"] >= 1
            far = start_pep(config=far_config(key), node="gw2", interfaces=("in0",))
            refilled = await pool_ready(near, 4, timeout=30)  # back-off is at most 10 s
            taken = refilled["taken"]
            payload = b"peer is back"
            assert await request(topo, SERVER, payload) == payload.upper()
    assert (await status_json(near))["peer"]["pool"]["taken"] == taken + 1


async def test_exit_leaves_nothing_of_the_peer_behind(
    topo: Topology, start_pep: StartPep, tmp_path: Path
) -> None:
    before = {node: rules_in(topo, node) for node in ("gw1", "gw2")}
    near, far = two_peps(start_pep, tmp_path)
    await pool_ready(near, 4)
    for pep in (near, far):
        pep.signal(signal.SIGTERM)
        assert pep.wait(15) == 0, pep.log()
    for node in ("gw1", "gw2"):
        assert rules_in(topo, node) == before[node]
    listening = topo.run("gw2", ["ss", "-tlnH", "sport = :5001"]).stdout
    assert listening.strip() == ""
    established = topo.run("gw1", ["ss", "-tnH", "dport = :5001"]).stdout
    assert "ESTAB" not in established


async def test_a_key_readable_by_others_is_refused_at_start(topo: Topology, tmp_path: Path) -> None:
    key = key_file(tmp_path)
    os.chmod(key, 0o644)
    conf = tmp_path / "near.toml"
    conf.write_text(near_config(key))
    r = topo.run(
        "gw1", [sys.executable, "-m", "pep.ops.cli", "run", "--config", str(conf), "-i", "in0"]
    )
    assert r.returncode == 2, r.stderr
    assert "peer.key_file" in r.stderr and "chmod 600" in r.stderr
    assert rules_in(topo, "gw1").count("PEP") == 0
