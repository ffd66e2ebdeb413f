"""[peer]: the key file's checks, the table's checks, status and metrics of the pool."""

from __future__ import annotations

import os
import socket
import struct
import time
from pathlib import Path

import pytest
import trio

from pep import config
from pep.config.peer import KEY_BYTES, keygen, load_key
from pep.ops.status import document as status
from pep.ops.status import metrics
from pep.ops.status import render as status_render
from pep.split import sockopts
from tests.helpers.status import sample_doc


def write_key(path: Path, data: bytes, mode: int = 0o600) -> str:
    path.write_bytes(data)
    os.chmod(path, mode)
    return str(path)


def test_keys_raw_or_hex(tmp_path: Path) -> None:
    raw = os.urandom(32)
    assert load_key(write_key(tmp_path / "raw", raw)) == raw
    text = keygen()
    assert len(text) == 2 * KEY_BYTES
    assert load_key(write_key(tmp_path / "hex", text.encode() + b"\n")) == bytes.fromhex(text)
    assert load_key(write_key(tmp_path / "ro", raw, 0o400)) == raw


@pytest.mark.parametrize(
    ("data", "mode", "message"),
    [
        (os.urandom(32), 0o644, "readable or writable by others (mode 0644): chmod 600"),
        (os.urandom(32), 0o620, "mode 0620"),
        (os.urandom(31), 0o600, "holds 31 bytes of key, at least 32"),
        (b"0123456789abcdef" * 3 + b"\n", 0o600, "holds 24 bytes of key"),  # 48 hex digits
    ],
)
def test_bad_key_files_are_refused_naming_the_key(
    tmp_path: Path, data: bytes, mode: int, message: str
) -> None:
    path = write_key(tmp_path / "key", data, mode)
    with pytest.raises(config.ConfigError) as e:
        load_key(path)
    assert e.value.key == "peer.key_file"
    assert message in str(e.value)


def test_a_missing_key_file_or_a_directory(tmp_path: Path) -> None:
    with pytest.raises(config.ConfigError, match="does not exist"):
        load_key(str(tmp_path / "none"))
    os.chmod(tmp_path, 0o700)
    with pytest.raises(config.ConfigError, match=r"regular file|cannot be read"):
        load_key(str(tmp_path))


NEAR = {"key_file": "/etc/pep/peer.key", "connect": "10.78.3.1:5001"}


def test_peer_table() -> None:
    cfg = config.build({"interfaces": ["eth1"], "peer": NEAR})
    assert cfg.peer is not None and (cfg.peer.pool, cfg.peer.pool_max) == (8, 64)
    far = {"key_file": "/k", "listen": "[fd00::1]:5001", "allow": ["fd00::/64", "10.0.0.0/8"]}
    assert len(config.build({"interfaces": ["eth1"], "peer": far}).peer.allow) == 2  # type: ignore[union-attr]
    assert config.build({"interfaces": ["eth1"]}).peer is None


@pytest.mark.parametrize(
    ("table", "key", "message"),
    [
        ({"key_file": "/k"}, "peer", "needs `connect`"),
        ({"key_file": "/k", "listen": "10.0.0.1:5001"}, "peer.allow", "required with `listen`"),
        ({"connect": "10.0.0.1:5001"}, "peer.key_file", "is required"),
        (NEAR | {"key_file": "peer.key"}, "peer.key_file", "absolute path"),
        (NEAR | {"connect": "far.example:5001"}, "peer.connect", "IPV4:PORT"),
        (NEAR | {"pool": 0}, "peer.pool", "between 1 and 1024"),
        (NEAR | {"pool": 10, "pool_max": 5}, "peer.pool_max", "at least pool (10)"),
        (NEAR | {"allow": ["not-a-net"]}, "peer.allow", "not an IP network"),
        (NEAR | {"secret": "x"}, "peer.secret", "unknown key"),
    ],
)
def test_bad_peer_tables_name_the_key(table: dict[str, object], key: str, message: str) -> None:
    with pytest.raises(config.ConfigError) as e:
        config.build({"interfaces": ["eth1"], "peer": table})
    assert e.value.key == key
    assert message in str(e.value)


POOL = {
    "connect": "10.78.3.1:5001",
    "target": 8,
    "ready": 7,
    "opening": 1,
    "in_use": 2,
    "opened": 120,
    "taken": 113,
    "fallback": 3,
    "died_idle": 1,
    "connect_failed": 0,
    "auth_failed": 0,
}
FAR = {
    "listen": "10.78.3.1:5001",
    "accepted": 120,
    "not_allowed": 2,
    "auth_failed": 1,
    "bad_header": 0,
    "forbidden": 0,
    "flows": 113,
    "upstream_failed": 1,
}


def test_status_and_metrics_show_both_ends() -> None:
    doc = sample_doc()
    doc["peer"] = {"pool": POOL, "listener": FAR}
    text = status_render.render(doc)
    assert (
        "peer pool 10.78.3.1:5001: 7 ready of 8, 2 in use; 120 opened, 3 flows went direct" in text
    )
    assert (
        "peer listener 10.78.3.1:5001: 120 authenticated, 113 flows; refused: 2 not allowed" in text
    )
    body = metrics.exposition(doc)[0].decode()
    assert "pep_peer_pool_ready 7.0" in body
    assert "pep_peer_fallback_total 3.0" in body
    assert 'pep_peer_auth_failures_total{side="far"} 1.0' in body
    assert 'pep_peer_refused_total{reason="not_allowed"} 2.0' in body


def test_workers_pools_add_up() -> None:
    master = sample_doc()
    workers = []
    for i in range(2):
        doc = sample_doc()
        doc["peer"] = {"pool": dict(POOL), "listener": None}
        workers.append((i, doc))
    merged = status.merge(master, workers)
    assert merged["peer"]["pool"]["ready"] == 14
    assert merged["peer"]["pool"]["connect"] == "10.78.3.1:5001"
    assert merged["peer"]["listener"] is None


TCP_CC_INFO = 26  # include/uapi/linux/tcp.h; struct tcp_bbr_info: bw_lo, bw_hi, min_rtt, gains


def _bbr_info(sock: socket.socket) -> tuple[int, int]:
    """(bandwidth estimate in bytes/s, pacing gain x 256) of a BBR socket."""
    bw_lo, bw_hi, _, pacing_gain, _ = struct.unpack(
        "5I", sock.getsockopt(socket.IPPROTO_TCP, TCP_CC_INFO, 20)
    )
    return bw_hi << 32 | bw_lo, pacing_gain


def test_a_pooled_connection_starts_its_flow_with_fresh_congestion_control() -> None:
    """restart_congestion: BBR's state from before (a bandwidth estimate, a min-RTT filter
    about to expire) is dropped; the module is still BBR, in STARTUP (gain 2.885)."""
    with socket.create_server(("127.0.0.1", 0)) as srv:
        a = socket.socket()
        try:
            a.setsockopt(socket.IPPROTO_TCP, sockopts.TCP_CONGESTION, b"bbr")
        except OSError:
            pytest.skip("bbr is not available here")
        with a:
            a.connect(srv.getsockname())
            b, _ = srv.accept()
            with b:
                data = os.urandom(1 << 20)
                for _ in range(4):
                    a.sendall(data)
                    got = 0
                    while got < len(data):
                        got += len(b.recv(1 << 20))
                assert _bbr_info(a)[0] > 0  # it has measured the path
                sockopts.restart_congestion(a)
                name = a.getsockopt(socket.IPPROTO_TCP, sockopts.TCP_CONGESTION, 16)
                assert name.rstrip(b"\0") == b"bbr"
                assert _bbr_info(a)[0] == 0  # the estimate is gone
                a.sendall(b"still works")
                assert b.recv(64) == b"still works"
                time.sleep(0.1)  # its ACK: BBR sets its gains on the first one
                assert _bbr_info(a)[1] == 739  # STARTUP's high gain, 2.885 x 256
        sockopts.restart_congestion(a)  # closed: no error (the flow's send reports it)


def test_restart_congestion_only_restarts_the_module_named() -> None:
    """The link sharer refreshes BBR only (pacer.BBR_REFRESH): a cubic leg keeps its state."""
    with socket.create_server(("127.0.0.1", 0)) as srv, socket.socket() as a:
        a.setsockopt(socket.IPPROTO_TCP, sockopts.TCP_CONGESTION, b"cubic")
        a.connect(srv.getsockname())
        b, _ = srv.accept()
        with b:
            assert sockopts.restart_congestion(a, only=b"bbr") is False
            assert sockopts.restart_congestion(a) is True
            name = a.getsockopt(socket.IPPROTO_TCP, sockopts.TCP_CONGESTION, 16)
            assert name.rstrip(b"\0") == b"cubic"
        a.close()
        assert sockopts.restart_congestion(a) is False  # closed: nothing to restart


async def test_a_connection_taken_before_its_watcher_ran_stays_the_flows() -> None:
    """The race CI hit once: a flow takes a pooled connection before the pool's watcher on it
    has first run, and the flow's relay waits on the fd; the watcher must then leave it alone
    (trio allows one waiter per fd: BusyResourceError took the daemon down)."""
    from types import SimpleNamespace

    from pep.peer.pool import PeerPool

    peer = SimpleNamespace(connect="127.0.0.1:5001", pool=1, pool_max=1)
    pool = PeerPool(peer, b"k" * 32, None, None)  # type: ignore[arg-type]
    a, b = socket.socketpair()
    a.setblocking(False)
    with a, b:
        with trio.fail_after(5):
            async with trio.open_nursery() as nursery:
                pool._nursery = nursery
                pool._enlist(a)
                assert pool.take() is a  # its watcher has not run yet
                with trio.move_on_after(0.2):  # the flow's relay waits, as the watcher starts
                    await trio.lowlevel.wait_readable(a)
                b.send(b"x")
                await trio.lowlevel.wait_readable(a)  # still the flow's to wait on
                nursery.cancel_scope.cancel()
        assert a.recv(1) == b"x" and a.fileno() != -1  # still open, nothing read by the pool
        assert pool.counters.taken == 1 and pool.counters.died_idle == 0
