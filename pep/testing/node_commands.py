"""Commands in a lab's node, for a test: the argv that runs them there, the errors that say
which node and what it printed, and whether something listens on a port in a namespace; and
whether namespaces can be made here at all (``netns_unavailable``, for the plugin and the lab).

The lab handle (pep.testing.satlab) runs them; the formats here are pure and unit-tested.
"""

from __future__ import annotations

import contextlib
import os
import shlex
import shutil
import signal
import subprocess
import tempfile
from collections.abc import Sequence
from typing import IO, Any

__all__ = [
    "NodeCommandError",
    "NodeCommandTimeout",
    "argv_in",
    "arun_grouped",
    "command",
    "listening_ports",
    "netns_unavailable",
    "run_grouped",
    "tail",
]

STDERR_LINES = 20  # of a failed command's stderr, in its error: the end says what went wrong


def netns_unavailable() -> str | None:
    """Why namespace labs cannot be built here, or None when they can."""
    if os.geteuid() != 0:
        return "needs root (network namespaces, iptables, NFQUEUE)"
    for tool, package in (("iptables-legacy", "iptables"), ("ip", "iproute2")):
        if shutil.which(tool) is None:
            return f"`{tool}` is not installed (Debian package {package})"
    return None


def command(cmd: str | Sequence[str]) -> list[str]:
    """A test's command as an argv: a list is one, a string a shell command line (``sh -c``,
    as subprocess's shell=True)."""
    argv = ["sh", "-c", cmd] if isinstance(cmd, str) else list(cmd)
    if not argv or not all(isinstance(a, str | os.PathLike) for a in argv):
        raise ValueError(f"a command is a non-empty list of strings or a string, not {cmd!r}")
    return [os.fspath(a) for a in argv]


def argv_in(ns: str, cmd: str | Sequence[str]) -> list[str]:
    """``cmd`` run in namespace ``ns`` (``ip netns exec`` also gives it the namespace's /sys
    and /etc/netns files)."""
    return ["ip", "netns", "exec", ns, *command(cmd)]


def run_grouped(
    argv: list[str], *, input: bytes | str | None, timeout: float, text: bool
) -> subprocess.CompletedProcess[Any]:
    """Run ``argv`` in a session of its own, its output captured (decoded with errors
    replaced when ``text``); on a timeout (TimeoutExpired with what it wrote until then) or
    an interrupt its whole process group is killed, so what it started does not outlive it."""
    if isinstance(input, str):
        input = input.encode()
    with subprocess.Popen(
        argv,
        stdin=subprocess.PIPE if input is not None else subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        start_new_session=True,
    ) as p:
        try:
            out, err = p.communicate(input, timeout=timeout)
        except subprocess.TimeoutExpired:
            kill_group(p.pid)
            out, err = p.communicate()
            raise subprocess.TimeoutExpired(
                argv, timeout, _decoded(out, text), _decoded(err, text)
            ) from None
        except BaseException:
            kill_group(p.pid)
            raise
    return subprocess.CompletedProcess(argv, p.returncode, _decoded(out, text), _decoded(err, text))


async def arun_grouped(
    argv: list[str], *, input: bytes | str | None, timeout: float, text: bool
) -> subprocess.CompletedProcess[Any]:
    """``run_grouped`` for trio: cancelled or timed out, the group is killed."""
    import trio

    async def deliver_cancel(process: trio.Process) -> None:
        kill_group(process.pid)

    data = input.encode() if isinstance(input, str) else (input or b"")
    # Output goes to files, so what it wrote is still there when the timeout kills it.
    with tempfile.TemporaryFile() as out_f, tempfile.TemporaryFile() as err_f:
        with trio.move_on_after(timeout) as scope:
            r = await trio.run_process(
                argv,
                check=False,
                stdin=data,
                stdout=out_f,
                stderr=err_f,
                start_new_session=True,
                deliver_cancel=deliver_cancel,
            )
        out, err = _read_back(out_f, text), _read_back(err_f, text)
    if scope.cancelled_caught:
        raise subprocess.TimeoutExpired(argv, timeout, out, err)
    return subprocess.CompletedProcess(argv, r.returncode, out, err)


def kill_group(pid: int) -> None:
    """SIGKILL the process group ``pid`` leads (a command run in its own session)."""
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pid, signal.SIGKILL)


def _decoded(data: bytes | None, text: bool) -> str | bytes | None:
    return data.decode(errors="replace") if text and data is not None else data


def _read_back(f: IO[bytes], text: bool) -> str | bytes | None:
    f.seek(0)
    return _decoded(f.read(), text)


def shown(cmd: str | Sequence[str]) -> str:
    return cmd if isinstance(cmd, str) else shlex.join(cmd)


def tail(text: str | bytes | None, lines: int = STDERR_LINES) -> str:
    """The last ``lines`` lines of a command's output, indented, or '' when it printed nothing."""
    if isinstance(text, bytes):
        text = text.decode(errors="replace")
    kept = (text or "").strip().splitlines()[-lines:]
    return "\n".join("    " + line for line in kept)


class NodeCommandError(subprocess.CalledProcessError):
    """A command that failed in a node: a CalledProcessError (``returncode``, ``stdout``,
    ``stderr``, ``cmd`` as the test gave it) whose message names the node and shows the end of
    what the command wrote to stderr."""

    def __init__(
        self, node: str, ns: str, returncode: int, cmd: object, output: object, stderr: object
    ) -> None:
        super().__init__(returncode, cmd, output, stderr)
        self.node, self.ns = node, ns

    def __str__(self) -> str:
        rc = self.returncode
        how = f"was killed by signal {-rc}" if rc < 0 else f"exited with status {rc}"
        err = tail(self.stderr)  # type: ignore[arg-type]
        return f"in node {self.node!r} ({self.ns}): `{shown(self.cmd)}` {how}" + (
            f"; its stderr ends:\n{err}" if err else "; it wrote nothing to stderr"
        )


class NodeCommandTimeout(subprocess.TimeoutExpired):
    """A command that did not finish in time in a node (killed): a TimeoutExpired whose message
    names the node and shows what it wrote to stderr until then."""

    def __init__(
        self, node: str, ns: str, cmd: object, timeout: float, output: object, stderr: object
    ) -> None:
        super().__init__(cmd, timeout, output, stderr)  # type: ignore[arg-type]
        self.node, self.ns = node, ns

    def __str__(self) -> str:
        err = tail(self.stderr)  # type: ignore[arg-type]
        return (
            f"in node {self.node!r} ({self.ns}): `{shown(self.cmd)}` did not finish within "
            f"{self.timeout:g} s (killed)" + (f"; its stderr ends:\n{err}" if err else "")
        )


TCP_LISTEN = "0A"  # include/net/tcp_states.h: TCP_LISTEN = 10, as /proc/net/tcp shows it


def listening_ports(proc_net_tcp: str) -> set[int]:
    """The local ports of the listening sockets in a /proc/net/tcp or tcp6 table (the header
    line, then ``sl local_address rem_address st ...`` with ``ADDR:PORT`` in hex)."""
    ports = set()
    for line in proc_net_tcp.splitlines()[1:]:
        fields = line.split()
        if len(fields) > 3 and fields[3] == TCP_LISTEN:
            ports.add(int(fields[1].rsplit(":", 1)[1], 16))
    return ports
