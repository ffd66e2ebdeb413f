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

from pep.testing.daemon import (
    NOBODY,
    ONLY_THOSE,
    StartPep,
    kernel_queue,
    nonroot_prefix,
    proc_status,
    status_json,
)
from pep.testing.netenv import (
    CLIENT_IP,
    GW_CLIENT_IP,
    GW_SERVER_IP,
    INGRESS,
    PORT,
    SERVER_IP,
    series,
)
from pep.testing.topology import Topology
from pep.testing.traffic import connect, request, send_all, serving

pytestmark = pytest.mark.netns

LOCAL_PORT, LISTEN = 7000, 5000


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
    topo: Topology, start_pep: StartPep
) -> None:
    pep = start_pep()
    proxy_request = f"CONNECT {SERVER_IP}:{PORT} HTTP/1.1\r\n\r\n".encode()
    tries = [
        ("client", (GW_CLIENT_IP, LISTEN)),  # from the ingress side, both gateway addresses
        ("client", (GW_SERVER_IP, LISTEN)),
        ("server", (GW_SERVER_IP, LISTEN)),  # from the other side
        ("gw", ("127.0.0.1", LISTEN)),  # from the gateway itself
        ("client", ("fd77:1::1", LISTEN)),  # and over IPv6
    ]
    with trio.fail_after(20):
        async with serving(topo, (SERVER_IP, PORT)) as accepted:
            for node, dst in tries:
                for _ in range(4):
                    assert await refused(topo.ns(node), dst, proxy_request), (node, dst)
            await trio.sleep(0.2)
    assert accepted == []  # no upstream connection was ever made
    doc = await status_json(pep)
    assert doc["listener"]["not_redirected"] == 4 * len(tries)
    assert doc["listener"]["split"] == 0 and doc["syn"]["queued"] == 0


async def test_the_gateways_own_addresses_are_never_split_nor_relayed_to(
    topo: Topology, start_pep: StartPep
) -> None:
    pep = start_pep()
    gw_seen: list[tuple[str, int]] = []
    with trio.fail_after(20):
        async with (  # a service on the gateway itself
            serving(topo, (GW_CLIENT_IP, LOCAL_PORT), accepted=gw_seen, node="gw"),
            serving(topo, (GW_SERVER_IP, LOCAL_PORT), accepted=gw_seen, node="gw"),
        ):
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
    assert gw_seen == []  # pep never connected to the gateway's own service
    doc = await status_json(pep)
    assert doc["listener"]["refused_local"] == 6
    assert doc["listener"]["split"] == 0
    assert "the destination is this gateway (loop guard)" in pep.log()


@pytest.mark.parametrize("topo_layout", [series], ids=["series"])
async def test_two_peps_in_series_split_once_each_and_never_loop(
    topo: Topology, start_pep: StartPep
) -> None:
    # The worst case: each pep takes new connections from both of its interfaces.
    peps = [
        start_pep(config='family = "ipv4"\n', node=node, interfaces=("in0", "out0"))
        for node in ("gw1", "gw2")
    ]
    server = ("10.78.3.2", PORT)
    count = 20
    with trio.fail_after(30):
        async with serving(topo, server) as accepted:
            for i in range(count):
                payload = b"through two peps %d " % i + os.urandom(50_000)
                assert await request(topo, server, payload) == payload.upper()
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


@pytest.fixture
def open_dir() -> Iterator[Path]:
    """A directory anyone may enter (root's, 0755); asked for before ``start_pep``, so the
    daemon using it is stopped before it is removed."""
    d = tempfile.mkdtemp(prefix="pep-status-")
    os.chmod(d, 0o755)
    try:
        yield Path(d)
    finally:
        shutil.rmtree(d, ignore_errors=True)


async def test_status_socket_is_not_world_writable(
    open_dir: Path, topo: Topology, start_pep: StartPep
) -> None:
    # In a directory anyone may enter, so that the socket's own mode is what keeps others out.
    sock = f"{open_dir}/pep.sock"
    config = f'interfaces = ["{INGRESS}"]\nstatus_socket = "{sock}"\n'
    pep = start_pep(config=config, interfaces=(), status_socket=sock)
    assert pep.status_socket is not None
    st = os.stat(pep.status_socket)
    assert stat.S_ISSOCK(st.st_mode)
    assert st.st_mode & 0o777 == 0o660 and st.st_uid == 0  # owner and group only
    parent = os.stat(os.path.dirname(pep.status_socket))
    assert not parent.st_mode & stat.S_IWOTH
    # Root's daemon: another user cannot even connect (it would learn who talks to whom).
    assert can_connect_as(NOBODY, pep.status_socket) == "PermissionError"
    assert (await status_json(pep))["state"] == "running"  # root can


async def test_daemon_deployed_as_a_user_keeps_only_net_admin_and_net_raw_under_load(
    nobody_dir: Path, topo: Topology, start_pep: StartPep
) -> None:
    """pep does not drop privileges itself: as root it keeps them all. Deployed as
    deploy/pep.service runs it (a user with ambient CAP_NET_ADMIN + CAP_NET_RAW, started here
    with setpriv), it holds exactly those two, also after serving traffic and a reload."""
    conf = nobody_dir / "pep.toml"
    conf.write_text(f'interfaces = ["{INGRESS}"]\n')
    os.chown(conf, NOBODY, NOBODY)
    pep = start_pep(config=conf, interfaces=(), prefix=nonroot_prefix(),
                    status_socket=str(nobody_dir / "pep.sock"))  # fmt: skip
    only = ONLY_THOSE
    pid = pep.pid
    assert caps(pid) == {"CapEff": only, "CapPrm": only, "CapInh": only, "CapBnd": only,
                         "CapAmb": only}  # fmt: skip
    with trio.fail_after(20):
        async with serving(topo, (SERVER_IP, PORT)) as accepted:
            for i in range(20):
                payload = b"nonroot %d" % i
                assert await request(topo, (SERVER_IP, PORT), payload) == payload.upper()
            pep.signal(1)  # SIGHUP: reload
            await trio.sleep(0.3)
            assert await request(topo, (SERVER_IP, PORT), b"after") == b"AFTER"
    assert {a[0] for a in accepted} == {GW_SERVER_IP}  # it did split
    st = proc_status(pid)
    assert caps(pid)["CapEff"] == only and st["NoNewPrivs"] == "1"
    assert st["Uid"].split() == [str(NOBODY)] * 4
    sock_st = os.stat(pep.status_socket)  # type: ignore[arg-type]
    assert (sock_st.st_uid, sock_st.st_mode & 0o777) == (NOBODY, 0o660)
