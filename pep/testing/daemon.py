"""The daemon under test: the real ``pep run`` in a namespace (PepProcess), and what a test
reads back from it: its log, ``pep status``, its /proc entries, the kernel's queue counters.

Tests start it through the ``start_pep`` fixture (tests/conftest.py), which also stops it at
teardown; PepProcess itself is what that fixture, and bench/, build on.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import re
import shutil
import signal
import socket
import stat
import subprocess
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import trio

from pep.capture import nfq_proc
from pep.config import paths
from pep.testing.topology import Topology

# The directory that holds the pep package (the checkout, or site-packages): on the PYTHONPATH
# of the processes the tests start in namespaces.
REPO = Path(__file__).resolve().parents[2]


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
    config: Path | None = None  # given as --config; a reload test rewrites it
    _tmpdir: str | None = None
    _run_dir: str | None = None  # the namespace's runtime directory, made for a non-root daemon

    def start(self, timeout: float = 15) -> PepProcess:
        if self.prefix:
            self._own_runtime_dir()
        fd, name = tempfile.mkstemp(prefix="pep-log-", suffix=".txt")
        self.log_path = Path(name)
        args = list(self.args)
        if self.config is not None:
            args += ["--config", str(self.config)]
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
                    [*self.prefix, sys.executable, "-m", "pep.ops.cli", "run", *args],
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

    @property
    def pid(self) -> int:
        assert self.proc is not None, "not started"
        return self.proc.pid

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

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
        never raises, and a second call does nothing."""
        for sig, wait in ((signal.SIGTERM, 5), (signal.SIGINT, 5), (signal.SIGKILL, None)):
            if not self.running:
                break
            self.signal(sig)
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.wait(wait)
        if self.log_path is not None:
            with contextlib.suppress(OSError):
                self.log_path.unlink()
            self.log_path = None  # log() is empty from now on
        if self._tmpdir is not None:
            shutil.rmtree(self._tmpdir, ignore_errors=True)
        if self._run_dir is not None:
            shutil.rmtree(self._run_dir, ignore_errors=True)
            self._run_dir = None

    def _own_runtime_dir(self) -> None:
        """What RuntimeDirectory=pep does for the installed service (deploy/pep.service): the
        namespace's runtime directory, owned by the daemon's user, for its ownership lock
        (pep.kernel.owner). Removed at stop: the user may not remove it from /run/pep/netns."""
        run_dir = paths.runtime_dir_for(self.topo.ns(self.node))
        if not os.path.isdir(run_dir):
            os.makedirs(run_dir, mode=0o755)
            self._run_dir = run_dir
        os.chown(run_dir, NOBODY, NOBODY)

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

    def stop_log(self) -> str:
        """Stop it with SIGTERM, expecting a clean exit; its whole log, the totals included."""
        self.signal(signal.SIGTERM)
        assert self.wait(10) == 0
        return self.log()


# What the ``start_pep`` fixture (tests/conftest.py) gives a test: start_pep(*args, config=...,
# node=..., interfaces=..., timeout=..., **PepProcess_fields) -> a started PepProcess.
StartPep = Callable[..., PepProcess]


def wait_log(pep: PepProcess, text: str, timeout: float = 10) -> None:
    deadline = time.monotonic() + timeout
    while text not in pep.log():
        if time.monotonic() > deadline:
            raise AssertionError(f"{text!r} not in the log after {timeout}s:\n{pep.log()}")
        time.sleep(0.02)


# --- waiting for a condition ------------------------------------------------------------------

T = TypeVar("T")


async def wait_for(
    check: Callable[[], Awaitable[bool]], timeout: float, what: str, step: float = 0.05
) -> None:
    """Poll ``check()`` until it is true; fail naming ``what`` after ``timeout``."""
    with trio.move_on_after(timeout):
        while not await check():
            await trio.sleep(step)
        return
    raise AssertionError(f"timed out after {timeout}s waiting for {what}")


async def settle(
    probe: Callable[[], T], want: Callable[[T], bool], timeout: float = 5.0, step: float = 0.1
) -> T:
    """Poll ``probe()`` until ``want(value)``; returns the last value either way."""
    value = probe()
    with trio.move_on_after(timeout):
        while not want(value):
            await trio.sleep(step)
            value = probe()
    return value


# --- `pep status`, as an operator runs it --------------------------------------------------


async def pep_cli(topo: Topology, node: str, *args: str) -> subprocess.CompletedProcess[bytes]:
    """``pep ARGS`` in ``node``'s namespace, as an operator runs it: output captured, the exit
    code for the caller to check."""
    argv = ["ip", "netns", "exec", topo.ns(node), sys.executable, "-m", "pep.ops.cli", *args]
    return await trio.run_process(argv, capture_stdout=True, capture_stderr=True, check=False)


async def pep_status(
    pep: PepProcess, *extra: str, in_ns: bool = False
) -> subprocess.CompletedProcess[bytes]:
    """`pep status` as an operator runs it: a separate process, by default in the test's own
    namespace (a unix socket is reachable from any); ``in_ns`` runs it in the daemon's, where
    it can fill in the kernel queue counters the daemon could not read."""
    assert pep.status_socket is not None
    args = ["status", "--socket", pep.status_socket, *extra]
    if in_ns:
        return await pep_cli(pep.topo, pep.node, *args)
    cmd = [sys.executable, "-m", "pep.ops.cli", *args]
    return await trio.run_process(cmd, capture_stdout=True, capture_stderr=True, check=False)


async def status_json(pep: PepProcess, in_ns: bool = False) -> dict[str, Any]:
    r = await pep_status(pep, "--json", in_ns=in_ns)
    assert r.returncode == 0, r.stderr.decode()
    return json.loads(r.stdout)


# --- the kernel's queue counters --------------------------------------------------------------


@dataclass(frozen=True)
class KernelQueue:
    queue: int
    portid: int
    waiting: int
    queue_dropped: int
    user_dropped: int
    last_id: int


def kernel_queue(topo: Topology, node: str = "gw", queue: int = 0) -> KernelQueue | None:
    """Row ``queue`` of the node's nfnetlink_queue table, or None when nothing is bound."""
    text = topo.run(node, ["cat", nfq_proc.NFQUEUE_PROC]).stdout
    rows = nfq_proc.parse(text, (queue, queue))
    if not rows:
        return None
    return KernelQueue(**{f.name: rows[0][f.name] for f in dataclasses.fields(KernelQueue)})


# --- running the daemon as a non-root user with two capabilities -------------------------------

NOBODY = 65534
CAPS = "-all,+net_admin,+net_raw"
CAP_NET_ADMIN, CAP_NET_RAW = 12, 13  # include/uapi/linux/capability.h
ONLY_THOSE = (1 << CAP_NET_ADMIN) | (1 << CAP_NET_RAW)


def proc_status(pid: int) -> dict[str, str]:
    with open(f"/proc/{pid}/status") as f:
        return dict(line.split(":\t", 1) for line in f.read().splitlines() if ":\t" in line)


def _blocked(path: Path) -> tuple[Path, Path] | None:
    """(directory others cannot traverse, its child on the way to ``path``), or None."""
    parts = path.resolve().parts
    for i in range(1, len(parts) - 1):
        d = Path(*parts[: i + 1])
        if not os.stat(d).st_mode & stat.S_IXOTH:
            return d, d / parts[i + 1]
    return None


def nonroot_prefix() -> list[str]:
    """A command prefix that runs the daemon as uid/gid 65534 with only CAP_NET_ADMIN and
    CAP_NET_RAW (ambient, bounding set and all), and no way to gain more (no_new_privs).

    Test plumbing, not part of what is tested: the interpreter may live in a directory that
    only root can enter (pyenv under /root, mode 0700), where a non-root user cannot even start
    Python. ``ip netns exec`` gives the command a mount namespace of its own, so such a
    directory is covered with an empty tmpfs and just the subdirectories Python and pep need
    are bind-mounted back, at the same paths, inside that namespace only. An installed service
    (deploy/pep.service) has pep in a readable place and needs none of this.
    """
    needed = {Path(sys.prefix), Path(sys.base_prefix), REPO, Path(sys.executable)}
    needed |= {Path(p) for p in sys.path if p and os.path.exists(p)}
    blocked: dict[Path, set[Path]] = {}
    for p in needed:
        hit = _blocked(p)
        if hit is not None:
            blocked.setdefault(hit[0], set()).add(hit[1])
    lines = ["set -e", 'stash="$(mktemp -d)"']
    n = 0
    for parent, children in sorted(blocked.items()):
        moves = []
        for child in sorted(children):
            lines.append(f'mkdir "$stash/{n}" && mount --bind "{child}" "$stash/{n}"')
            moves.append((n, child))
            n += 1
        lines.append(f'mount -t tmpfs -o mode=0755 pep-nonroot "{parent}"')
        for i, child in moves:
            lines.append(f'mkdir -p "{child}" && mount --bind "$stash/{i}" "{child}"')
    lines.append(
        f"exec setpriv --reuid={NOBODY} --regid={NOBODY} --clear-groups --inh-caps={CAPS} "
        f'--ambient-caps={CAPS} --bounding-set={CAPS} --no-new-privs "$@"'
    )
    return ["sh", "-c", "\n".join(lines), "pep-nonroot"]
