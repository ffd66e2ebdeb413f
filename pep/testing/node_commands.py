"""Commands in a lab's node, for a test: the argv that runs them there, the errors that say
which node and what it printed, and whether something listens on a port in a namespace.

The lab handle (pep.testing.satlab) runs them; the formats here are pure and unit-tested.
"""

from __future__ import annotations

import os
import shlex
import subprocess
from collections.abc import Sequence

__all__ = [
    "NodeCommandError",
    "NodeCommandTimeout",
    "argv_in",
    "command",
    "listening_ports",
    "tail",
]

STDERR_LINES = 20  # of a failed command's stderr, in its error: the end says what went wrong


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
