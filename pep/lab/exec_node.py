"""``pep lab exec NODE [--prefix P] -- CMD ...``: which lab and which command, then the command.

argparse hands everything after the node to the command (``nargs=REMAINDER``), options
included: ``pep lab exec client --prefix X -- cmd`` used to run ``--prefix X -- cmd`` in the
default lab. The options before the command are parsed here, any other refused. Light to
import, like pep.lab.cli, which builds its parser from ``EXEC_USAGE`` on every ``pep --help``.
"""

from __future__ import annotations

import os

from pep.support.errors import describe

__all__ = ["EXEC_USAGE", "exec_args", "exec_in", "split_exec"]

EXEC_USAGE = "pep lab exec NODE [--prefix P] -- CMD ..."


def split_exec(rest: list[str]) -> tuple[str | None, list[str]]:
    """What follows the node in ``pep lab exec NODE ...``: the options before the command
    (``--prefix P``; argparse hands them over with the command), then the command, after an
    optional ``--``. Any other option before the command is refused: it would otherwise run as
    the command, in the wrong lab."""
    from pep.lab.plan import LabError, check_prefix
    from pep.lab.profiles import ParseError

    prefix = None
    i = 0
    while i < len(rest):
        token = rest[i]
        if token == "--":
            return prefix, rest[i + 1 :]
        if token == "--prefix" or token.startswith("--prefix="):
            value = token.partition("=")[2] if "=" in token else None
            if value is None:
                if i + 1 == len(rest):
                    raise ParseError(f"exec: --prefix needs a value ({EXEC_USAGE})")
                value = rest[i + 1]
                i += 1
            try:
                check_prefix(value)
            except LabError as e:
                raise ParseError(f"exec: --prefix: {describe(e)}") from None
            prefix = value
            i += 1
            continue
        if token.startswith("-"):
            raise ParseError(
                f"exec: unknown option {token!r} before the command; put the command "
                f"after -- ({EXEC_USAGE})"
            )
        break
    return prefix, rest[i:]


def exec_args(rest: list[str], given: str, default: str) -> tuple[str, list[str]]:
    """The lab and the command of ``pep lab exec``, from what follows the node and the
    ``--prefix`` given before it (``default`` when it was not); ParseError (exit 2) when they
    are unclear."""
    from pep.lab.profiles import ParseError

    prefix, cmd = split_exec(list(rest))
    if prefix is not None and given not in (default, prefix):
        raise ParseError(f"exec: two prefixes, {given!r} and {prefix!r}")
    if not cmd:
        raise ParseError(f"exec: no command (usage: {EXEC_USAGE})")
    return prefix or given, cmd


def exec_in(prefix: str, node: str, cmd: list[str]) -> int:
    """Replace this process with ``cmd`` in the node's namespace; LabError (exit 1) when the
    lab is not up or has no such node."""
    from pep.lab.plan import LabError
    from pep.lab.state import lab_namespaces, not_up

    ns = f"{prefix}-{node}"
    namespaces = lab_namespaces(prefix)
    if not namespaces:
        raise not_up(prefix)
    if ns not in namespaces or not os.path.exists(f"/run/netns/{ns}"):
        names = [n.removeprefix(f"{prefix}-") for n in namespaces]
        raise LabError(f"no node {node!r} in lab {prefix!r} (nodes: {', '.join(names)})")
    os.execvp("ip", ["ip", "netns", "exec", ns, *cmd])
    return 1  # not reached
