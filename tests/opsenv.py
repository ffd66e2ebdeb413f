"""Helpers for the operations integration tests (tests/test_ops_*_netns.py)."""

from __future__ import annotations

import json
import os
import stat
import subprocess
import sys
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import trio

from pep.topology import Topology, ns_socket
from tests.netenv import PepProcess, recv_to_eof, send_all

REPO = Path(__file__).resolve().parent.parent


async def pep_status(
    pep: PepProcess, *extra: str, in_ns: bool = False
) -> subprocess.CompletedProcess[bytes]:
    """`pep status` as an operator runs it: a separate process, by default in the test's own
    namespace (a unix socket is reachable from any); ``in_ns`` runs it in the daemon's, where
    it can fill in the kernel queue counters the daemon could not read."""
    assert pep.status_socket is not None
    cmd = [sys.executable, "-m", "pep.cli", "status", "--socket", pep.status_socket, *extra]
    if in_ns:
        cmd = ["ip", "netns", "exec", pep.topo.ns(pep.node), *cmd]
    return await trio.run_process(cmd, capture_stdout=True, capture_stderr=True, check=False)


async def status_json(pep: PepProcess, in_ns: bool = False) -> dict[str, Any]:
    r = await pep_status(pep, "--json", in_ns=in_ns)
    assert r.returncode == 0, r.stderr.decode()
    return json.loads(r.stdout)


async def wait_for(
    check: Callable[[], Awaitable[bool]], timeout: float, what: str, step: float = 0.05
) -> None:
    with trio.move_on_after(timeout):
        while not await check():
            await trio.sleep(step)
        return
    raise AssertionError(f"timed out after {timeout}s waiting for {what}")


def wait_log(pep: PepProcess, text: str, timeout: float = 10) -> None:
    deadline = time.monotonic() + timeout
    while text not in pep.log():
        if time.monotonic() > deadline:
            raise AssertionError(f"{text!r} not in the log after {timeout}s:\n{pep.log()}")
        time.sleep(0.02)


async def http_get(
    topo: Topology, node: str, addr: tuple[str, int], path: str, method: str = "GET"
) -> tuple[int, dict[str, str], bytes]:
    """A minimal HTTP/1.1 GET from inside ``node`` (the metrics endpoint lives in the gw ns)."""
    sock = trio.socket.from_stdlib_socket(ns_socket(topo.ns(node)))
    with sock:
        await sock.connect(addr)
        await send_all(sock, f"{method} {path} HTTP/1.1\r\nHost: pep\r\n\r\n".encode())
        raw = await recv_to_eof(sock)
    head, _, body = raw.partition(b"\r\n\r\n")
    lines = head.decode().split("\r\n")
    headers = dict(line.split(": ", 1) for line in lines[1:])
    return int(lines[0].split()[1]), headers, body


# --- running the daemon as a non-root user with two capabilities -------------------------------

NOBODY = 65534
CAPS = "-all,+net_admin,+net_raw"


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


def proc_status(pid: int) -> dict[str, str]:
    with open(f"/proc/{pid}/status") as f:
        return dict(line.split(":\t", 1) for line in f.read().splitlines() if ":\t" in line)
