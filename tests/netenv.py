"""Test plumbing for the namespace integration tests: topology, the real daemon, trio peers.

Topology (addresses are private to namespaces the test creates; every link is dual-stack):

    client ns            gateway ns (runs `pep run`)            server ns
    eth0 10.77.1.2 --- cli0 10.77.1.1 | srv0 10.77.2.1 --- eth0 10.77.2.2
         fd77:1::2          fd77:1::1 |      fd77:2::1          fd77:2::2
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import os
import re
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import trio

from pep.topology import Topology, ns_socket

CLIENT_IP, GW_CLIENT_IP = "10.77.1.2", "10.77.1.1"
SERVER_IP, GW_SERVER_IP = "10.77.2.2", "10.77.2.1"
INGRESS = "cli0"


@dataclass(frozen=True)
class Addrs:
    """One family's addresses in the gateway topology."""

    family: int
    client: str
    gw_client: str
    gw_server: str
    server: str


ADDRS = {
    4: Addrs(4, CLIENT_IP, GW_CLIENT_IP, GW_SERVER_IP, SERVER_IP),
    6: Addrs(6, "fd77:1::2", "fd77:1::1", "fd77:2::1", "fd77:2::2"),
}


def unique_prefix(tag: str) -> str:
    """Namespace prefix unique to this process and call, so parallel runs never collide."""
    return f"pep{tag}{os.getpid() % 100000}{secrets.token_hex(2)}"


@contextlib.contextmanager
def gateway_topology(tag: str = "t") -> Iterator[Topology]:
    topo = Topology(unique_prefix(tag))
    try:
        topo.add_node("client")
        topo.add_node("gw", forwarding=True)
        topo.add_node("server")
        v4, v6 = ADDRS[4], ADDRS[6]
        topo.link(
            "client",
            "eth0",
            [f"{v4.client}/24", f"{v6.client}/64"],
            "gw",
            INGRESS,
            [f"{v4.gw_client}/24", f"{v6.gw_client}/64"],
        )
        topo.link(
            "gw",
            "srv0",
            [f"{v4.gw_server}/24", f"{v6.gw_server}/64"],
            "server",
            "eth0",
            [f"{v4.server}/24", f"{v6.server}/64"],
        )
        for node, via in (("client", "gw_client"), ("server", "gw_server")):
            topo.route(node, "default", getattr(v4, via))
            topo.route(node, "::/0", getattr(v6, via), family=socket.AF_INET6)
        yield topo
    finally:
        topo.destroy()


@dataclass
class PepProcess:
    """The real daemon as a subprocess inside a namespace, its log in a file."""

    topo: Topology
    node: str
    args: list[str]
    proc: subprocess.Popen[bytes] | None = None
    log_path: Path | None = None
    # Status socket; by default one in a fresh temporary directory, so parallel daemons
    # never share /run/pep/pep.sock.
    status_socket: str | None = None
    own_status_socket: bool = True  # False: no --status-socket, the daemon's own default
    prefix: Sequence[str] = ()  # command run before python, e.g. setpriv with its options
    _tmpdir: str | None = None

    def start(self, timeout: float = 15) -> PepProcess:
        fd, name = tempfile.mkstemp(prefix="pep-log-", suffix=".txt")
        self.log_path = Path(name)
        args = list(self.args)
        if "--status-socket" not in args and self.own_status_socket:
            if self.status_socket is None:
                self._tmpdir = tempfile.mkdtemp(prefix="pep-run-")
                self.status_socket = os.path.join(self._tmpdir, "pep.sock")
            args += ["--status-socket", self.status_socket]
        # Readiness as systemd sees it (sd_notify READY=1), whatever the log level.
        notify_dir = tempfile.mkdtemp(prefix="pep-notify-")
        os.chmod(notify_dir, 0o755)  # reachable by a daemon started as another user
        notify = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        notify_path = os.path.join(notify_dir, "notify.sock")
        notify.bind(notify_path)
        os.chmod(notify_path, 0o777)
        notify.settimeout(0.05)
        try:
            with os.fdopen(fd, "wb") as logf:
                self.proc = self.topo.popen(
                    self.node,
                    [*self.prefix, sys.executable, "-m", "pep.cli", "run", *args],
                    stdout=logf,
                    stderr=subprocess.STDOUT,
                    env={**os.environ, "NOTIFY_SOCKET": notify_path},
                )
            deadline = time.monotonic() + timeout
            while True:
                try:
                    if b"READY=1" in notify.recv(4096).split(b"\n"):
                        break
                except TimeoutError:
                    pass
                if self.proc.poll() is not None:
                    raise RuntimeError(f"pep exited with {self.proc.returncode}:\n{self.log()}")
                if time.monotonic() > deadline:
                    raise RuntimeError(f"pep not ready after {timeout}s:\n{self.log()}")
        finally:
            notify.close()
            shutil.rmtree(notify_dir, ignore_errors=True)
        return self

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path else ""

    def signal(self, sig: int) -> None:
        assert self.proc is not None
        self.proc.send_signal(sig)

    def wait(self, timeout: float = 10) -> int:
        assert self.proc is not None
        return self.proc.wait(timeout)

    def stop(self) -> None:
        """Cleanup path: SIGTERM (which drains), SIGINT (resets what is left), SIGKILL;
        never raises."""
        for sig, wait in ((signal.SIGTERM, 5), (signal.SIGINT, 5), (signal.SIGKILL, None)):
            if self.proc is None or self.proc.poll() is not None:
                break
            self.proc.send_signal(sig)
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.proc.wait(wait)
        if self.log_path is not None:
            with contextlib.suppress(OSError):
                self.log_path.unlink()
        if self._tmpdir is not None:
            shutil.rmtree(self._tmpdir, ignore_errors=True)

    def closed_lines(self, expect: int = 0, timeout: float = 5) -> list[dict[str, str]]:
        """The daemon's one-line-per-connection records, as key=value dicts.

        The record is written after both sockets are closed, which can be a moment after the
        test's peers saw their EOF: wait up to ``timeout`` for ``expect`` records.
        """
        deadline = time.monotonic() + timeout
        while len(lines := self._closed_lines()) < expect and time.monotonic() < deadline:
            time.sleep(0.02)
        return lines

    def _closed_lines(self) -> list[dict[str, str]]:
        out = []
        for line in self.log().splitlines():
            m = re.search(r"closed (\S+) -> (\S+) (.*)$", line)
            if m:
                rec = dict(kv.split("=", 1) for kv in m.group(3).split() if "=" in kv)
                rec["client"], rec["dst"] = m.group(1), m.group(2)
                out.append(rec)
        return out


def rules_in(topo: Topology, node: str) -> str:
    """Every legacy-backend rule of both families (python-iptables writes the legacy backend)
    and every policy rule and route in a node: what pep may install."""
    cmds = [
        [tool, "-t", t, "-S"]
        for tool in ("iptables-legacy", "ip6tables-legacy")
        for t in ("mangle", "nat")
    ]
    cmds += [["ip", f"-{f}", "rule"] for f in (4, 6)]
    cmds += [["ip", f"-{f}", "route", "show", "table", "all"] for f in (4, 6)]
    return "".join(topo.run(node, cmd).stdout for cmd in cmds)


# --- trio peers -----------------------------------------------------------------------------

Handler = Callable[[trio.socket.SocketType], Awaitable[None]]


def _family(ip: str) -> int:
    return socket.AF_INET6 if ":" in ip else socket.AF_INET


async def listen(ns: str, ip: str, port: int = 0) -> trio.socket.SocketType:
    sock = trio.socket.from_stdlib_socket(ns_socket(ns, _family(ip)))
    sock.setsockopt(trio.socket.SOL_SOCKET, trio.socket.SO_REUSEADDR, 1)
    await sock.bind((ip, port))
    sock.listen(1024)
    return sock


async def serve(
    listener: trio.socket.SocketType, handler: Handler, accepted: list[tuple[str, int]]
) -> None:
    """Accept forever, one task per connection, recording each peer address."""
    async with trio.open_nursery() as nursery:
        while True:
            conn, peer = await listener.accept()
            accepted.append(peer)
            nursery.start_soon(_run_closing, handler, conn)


async def _run_closing(handler: Handler, conn: trio.socket.SocketType) -> None:
    with conn:
        await handler(conn)


async def connect(ns: str, dst: tuple[str, int]) -> trio.socket.SocketType:
    sock = trio.socket.from_stdlib_socket(ns_socket(ns, _family(dst[0])))
    try:
        await sock.connect(dst)
    except BaseException:
        sock.close()
        raise
    return sock


async def send_all(
    sock: trio.socket.SocketType, data: bytes | memoryview, chunk: int = 1 << 20
) -> None:
    view = memoryview(data)
    while view:
        n = await sock.send(view[:chunk])
        view = view[n:]


async def recv_to_eof(sock: trio.socket.SocketType) -> bytes:
    parts = []
    while True:
        b = await sock.recv(1 << 20)
        if not b:
            return b"".join(parts)
        parts.append(b)


async def hash_to_eof(sock: trio.socket.SocketType) -> tuple[str, int]:
    h, total = hashlib.sha256(), 0
    while True:
        b = await sock.recv(1 << 20)
        if not b:
            return h.hexdigest(), total
        h.update(b)
        total += len(b)


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


Sender = Callable[[trio.socket.SocketType], Awaitable[None]]


@dataclass
class Duplex:
    """What one full-duplex transfer through the gateway produced."""

    server_got: tuple[str, int]  # (sha256 hex, bytes) the server read to EOF
    client_got: tuple[str, int]  # (sha256 hex, bytes) the client read to EOF
    accepted: list[tuple[str, int]]  # the peer address(es) the server saw
    client_port: int


async def duplex(
    topo: Topology, server: str, port: int, send_up: Sender, send_down: Sender, timeout: float
) -> Duplex:
    """One connection client -> server; both ends send (then FIN) and hash what they read,
    at the same time, so both directions of the split connection carry data at once."""
    got: dict[str, tuple[str, int]] = {}
    accepted: list[tuple[str, int]] = []

    async def side(sock: trio.socket.SocketType, key: str, send: Sender) -> None:
        async with trio.open_nursery() as n:

            async def rx() -> None:
                got[key] = await hash_to_eof(sock)

            n.start_soon(rx)
            await send(sock)
            sock.shutdown(socket.SHUT_WR)

    with trio.fail_after(timeout):
        async with trio.open_nursery() as n:
            server_side = functools.partial(side, key="server", send=send_down)
            n.start_soon(
                serve, await listen(topo.ns("server"), server, port), server_side, accepted
            )
            sock = await connect(topo.ns("client"), (server, port))
            client_port = sock.getsockname()[1]
            with sock:
                await side(sock, "client", send_up)
            while "server" not in got:
                await trio.sleep(0.01)
            n.cancel_scope.cancel()
    return Duplex(got["server"], got["client"], accepted, client_port)


def sending(data: bytes) -> Sender:
    return functools.partial(_send_data, data=data)


async def _send_data(sock: trio.socket.SocketType, data: bytes) -> None:
    await send_all(sock, data)
