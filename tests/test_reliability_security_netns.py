"""Security, against the real daemon: never an open proxy, never a relay into the gateway
itself, never a loop between two PEPs, and the least privilege it is deployed with."""

from __future__ import annotations

import errno
import os
import shutil
import socket
import stat
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest
import trio

from pep.topology import Topology
from tests.netenv import (
    CLIENT_IP,
    GW_CLIENT_IP,
    GW_SERVER_IP,
    INGRESS,
    SERVER_IP,
    PepProcess,
    connect,
    gateway_topology,
    listen,
    recv_to_eof,
    send_all,
    serve,
    unique_prefix,
)
from tests.opsenv import NOBODY, nonroot_prefix, proc_status, status_json
from tests.relenv import kernel_queue, request, start_pep
from tests.test_core_netns import echo_upper

pytestmark = pytest.mark.netns

PORT, LOCAL_PORT, LISTEN = 8080, 7000, 5000
CAP_NET_ADMIN, CAP_NET_RAW = 12, 13  # include/uapi/linux/capability.h


@pytest.fixture
def topo() -> Iterator[Topology]:
    with gateway_topology("rx") as t:
        yield t


async def refused(ns: str, dst: tuple[str, int], payload: bytes) -> bool:
    """Connect and send; True when the far end reset or closed without answering."""
    try:
        sock = await connect(ns, dst)
    except (ConnectionRefusedError, ConnectionResetError):
        return True
    with sock:
        try:
            await send_all(sock, payload)
            return await sock.recv(100) == b""
        except OSError as e:
            return e.errno in (errno.ECONNRESET, errno.EPIPE)


async def test_direct_connections_to_the_listener_are_refused_from_everywhere(
    topo: Topology, peps: list[PepProcess], tmp_path: Path
) -> None:
    pep = start_pep(topo, tmp_path / "p.toml", started=peps)
    accepted: list[tuple[str, int]] = []
    proxy_request = f"CONNECT {SERVER_IP}:{PORT} HTTP/1.1\r\n\r\n".encode()
    tries = [
        ("client", (GW_CLIENT_IP, LISTEN)),  # from the ingress side, both gateway addresses
        ("client", (GW_SERVER_IP, LISTEN)),
        ("server", (GW_SERVER_IP, LISTEN)),  # from the other side
        ("gw", ("127.0.0.1", LISTEN)),  # from the gateway itself
        ("client", ("fd77:1::1", LISTEN)),  # and over IPv6
    ]
    with trio.fail_after(20):
        async with trio.open_nursery() as n:
            n.start_soon(serve, await listen(topo.ns("server"), SERVER_IP, PORT), echo_upper,
                         accepted)  # fmt: skip
            for node, dst in tries:
                for _ in range(4):
                    assert await refused(topo.ns(node), dst, proxy_request), (node, dst)
            await trio.sleep(0.2)
            n.cancel_scope.cancel()
    assert accepted == []  # no upstream connection was ever made
    doc = await status_json(pep)
    assert doc["listener"]["not_redirected"] == 4 * len(tries)
    assert doc["listener"]["split"] == 0 and doc["syn"]["queued"] == 0


async def test_the_gateways_own_addresses_are_never_split_nor_relayed_to(
    topo: Topology, peps: list[PepProcess], tmp_path: Path
) -> None:
    pep = start_pep(topo, tmp_path / "p.toml", started=peps)
    gw_seen: list[tuple[str, int]] = []
    with trio.fail_after(20):
        async with trio.open_nursery() as n:
            for addr in (GW_CLIENT_IP, GW_SERVER_IP):  # a service on the gateway itself
                n.start_soon(serve, await listen(topo.ns("gw"), addr, LOCAL_PORT), echo_upper,
                             gw_seen)  # fmt: skip
            # Plain connections to the gateway: never queued, served by the gateway directly.
            for addr in (GW_CLIENT_IP, GW_SERVER_IP):
                assert await request(topo, (addr, LOCAL_PORT), b"own") == b"OWN"
            assert [p[0] for p in gw_seen] == [CLIENT_IP, CLIENT_IP]
            doc = await status_json(pep)
            assert doc["syn"]["queued"] == 0 and doc["listener"]["accepted"] == 0

            # A foreign mark (another tool's rule, a mistake) on SYNs to the gateway's own
            # addresses makes the nat rule redirect them to pep: the loop guard refuses them.
            for addr, port in ((GW_SERVER_IP, LOCAL_PORT), (GW_CLIENT_IP, LOCAL_PORT)):
                mark = ["-t", "mangle", "-I", "PREROUTING", "-i", INGRESS, "-p", "tcp", "-d",
                        addr, "--dport", str(port), "-j", "MARK", "--set-xmark",
                        "0x5e9/0xffff"]  # fmt: skip
                r = topo.run("gw", ["iptables-legacy", *mark])
                assert r.returncode == 0, r.stderr
            gw_seen.clear()
            for addr in (GW_SERVER_IP, GW_CLIENT_IP):
                for _ in range(3):
                    assert await refused(topo.ns("client"), (addr, LOCAL_PORT), b"relay me")
            await trio.sleep(0.2)
            n.cancel_scope.cancel()
    assert gw_seen == []  # pep never connected to the gateway's own service
    doc = await status_json(pep)
    assert doc["listener"]["refused_local"] == 6
    assert doc["listener"]["split"] == 0
    assert "the destination is this gateway (loop guard)" in pep.log()


def series_topology(prefix: str) -> Topology:
    """client — gw1 — gw2 — server, IPv4."""
    topo = Topology(prefix)
    for node in ("client", "gw1", "gw2", "server"):
        topo.add_node(node, forwarding=node.startswith("gw"))
    topo.link("client", "eth0", "10.78.1.2/24", "gw1", "in0", "10.78.1.1/24")
    topo.link("gw1", "out0", "10.78.2.1/24", "gw2", "in0", "10.78.2.2/24")
    topo.link("gw2", "out0", "10.78.3.1/24", "server", "eth0", "10.78.3.2/24")
    topo.route("client", "default", "10.78.1.1")
    topo.route("gw1", "default", "10.78.2.2")
    topo.route("gw2", "10.78.1.0/24", "10.78.2.1")
    topo.route("server", "default", "10.78.3.1")
    return topo


async def test_two_peps_in_series_split_once_each_and_never_loop(tmp_path: Path) -> None:
    topo = series_topology(unique_prefix("rxs"))
    peps: list[PepProcess] = []
    try:
        # The worst case: each pep takes new connections from both of its interfaces.
        for node in ("gw1", "gw2"):
            start_pep(topo, tmp_path / f"{node}.toml", 'family = "ipv4"\n', node=node,
                      interfaces=("in0", "out0"), started=peps)  # fmt: skip
        accepted: list[tuple[str, int]] = []
        count = 20
        with trio.fail_after(30):
            async with trio.open_nursery() as n:
                n.start_soon(serve, await listen(topo.ns("server"), "10.78.3.2", PORT),
                             echo_upper, accepted)  # fmt: skip
                for i in range(count):
                    payload = b"through two peps %d " % i + os.urandom(50_000)
                    sock = await connect(topo.ns("client"), ("10.78.3.2", PORT))
                    with sock:
                        await send_all(sock, payload)
                        sock.shutdown(socket.SHUT_WR)
                        assert await recv_to_eof(sock) == payload.upper()
                n.cancel_scope.cancel()
        # The server saw each connection once, from gw2: split at gw2 (and so at gw1 too).
        assert [a[0] for a in accepted] == ["10.78.3.1"] * count
        for p, node in zip(peps, ("gw1", "gw2"), strict=True):
            doc = await status_json(p)
            kq = kernel_queue(topo, node)
            assert kq is not None
            # Exactly one SYN per connection reached each pep, and each split it once.
            assert (kq.last_id, doc["syn"]["queued"], doc["syn"]["split"]) == (count,) * 3, node
            assert doc["listener"]["split"] == count, node
            assert doc["listener"]["not_redirected"] == doc["listener"]["refused_local"] == 0
            assert len(p.closed_lines(expect=count)) == count
    finally:
        for p in peps:
            p.stop()
        topo.destroy()


# --- least privilege --------------------------------------------------------------------------


def can_connect_as(uid: int, path: str) -> str:
    """Try to connect to a unix socket as another user (in a forked child); "ok" or the
    error's name."""
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:  # child: plain syscalls only, then _exit
        try:
            os.close(r)
            os.setgroups([])
            os.setgid(uid)
            os.setuid(uid)
            s = socket.socket(socket.AF_UNIX)
            try:
                s.connect(path)
                result = "ok"
            except OSError as e:
                result = type(e).__name__
            os.write(w, result.encode())
        finally:
            os._exit(0)
    os.close(w)
    with os.fdopen(r) as f:
        result = f.read()
    os.waitpid(pid, 0)
    return result


def caps(pid: int) -> dict[str, int]:
    st = proc_status(pid)
    return {k: int(st[k], 16) for k in ("CapEff", "CapPrm", "CapInh", "CapBnd", "CapAmb")}


async def test_status_socket_is_not_world_writable(
    topo: Topology, peps: list[PepProcess], tmp_path: Path
) -> None:
    # In a directory anyone may enter, so that the socket's own mode is what keeps others out.
    run_dir = tempfile.mkdtemp(prefix="pep-status-")
    os.chmod(run_dir, 0o755)
    conf = tmp_path / "p.toml"
    conf.write_text(f'interfaces = ["{INGRESS}"]\nstatus_socket = "{run_dir}/pep.sock"\n')
    pep = PepProcess(topo, "gw", ["--config", str(conf)], status_socket=f"{run_dir}/pep.sock")
    try:
        pep.start()
        assert pep.status_socket is not None
        st = os.stat(pep.status_socket)
        assert stat.S_ISSOCK(st.st_mode)
        assert st.st_mode & 0o777 == 0o660 and st.st_uid == 0  # owner and group only
        parent = os.stat(os.path.dirname(pep.status_socket))
        assert not parent.st_mode & stat.S_IWOTH
        # Root's daemon: another user cannot even connect (it would learn who talks to whom).
        assert can_connect_as(NOBODY, pep.status_socket) == "PermissionError"
        assert (await status_json(pep))["state"] == "running"  # root can
    finally:
        pep.stop()
        shutil.rmtree(run_dir, ignore_errors=True)


async def test_daemon_deployed_as_a_user_keeps_only_net_admin_and_net_raw_under_load(
    topo: Topology,
) -> None:
    """pep does not drop privileges itself: as root it keeps them all. Deployed as
    deploy/pep.service runs it (a user with ambient CAP_NET_ADMIN + CAP_NET_RAW, started here
    with setpriv), it holds exactly those two, also after serving traffic and a reload."""
    run_dir = tempfile.mkdtemp(prefix="pep-nonroot-")
    os.chown(run_dir, NOBODY, NOBODY)
    conf = Path(run_dir) / "pep.toml"
    conf.write_text(f'interfaces = ["{INGRESS}"]\n')
    os.chown(conf, NOBODY, NOBODY)
    pep = PepProcess(topo, "gw", ["--config", str(conf)], prefix=nonroot_prefix(),
                     status_socket=os.path.join(run_dir, "pep.sock"))  # fmt: skip
    only = (1 << CAP_NET_ADMIN) | (1 << CAP_NET_RAW)
    try:
        pep.start()
        assert pep.proc is not None
        pid = pep.proc.pid
        assert caps(pid) == {"CapEff": only, "CapPrm": only, "CapInh": only, "CapBnd": only,
                             "CapAmb": only}  # fmt: skip
        accepted: list[tuple[str, int]] = []
        with trio.fail_after(20):
            async with trio.open_nursery() as n:
                n.start_soon(serve, await listen(topo.ns("server"), SERVER_IP, PORT),
                             echo_upper, accepted)  # fmt: skip
                for i in range(20):
                    payload = b"nonroot %d" % i
                    assert await request(topo, (SERVER_IP, PORT), payload) == payload.upper()
                pep.signal(1)  # SIGHUP: reload
                await trio.sleep(0.3)
                assert await request(topo, (SERVER_IP, PORT), b"after") == b"AFTER"
                n.cancel_scope.cancel()
        assert {a[0] for a in accepted} == {GW_SERVER_IP}  # it did split
        st = proc_status(pid)
        assert caps(pid)["CapEff"] == only and st["NoNewPrivs"] == "1"
        assert st["Uid"].split() == [str(NOBODY)] * 4
        sock_st = os.stat(pep.status_socket)  # type: ignore[arg-type]
        assert (sock_st.st_uid, sock_st.st_mode & 0o777) == (NOBODY, 0o660)
    finally:
        pep.stop()
        shutil.rmtree(run_dir, ignore_errors=True)
