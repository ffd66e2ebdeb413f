"""Where pep keeps its runtime files, per network namespace.

In the initial namespace (and in any unnamed one, e.g. a container's own) that is /run/pep, the
systemd unit's RuntimeDirectory. In a named namespace (``ip netns add NAME``) it is
/run/pep/netns/NAME: /run is shared by every namespace of the host, so two peps in two
namespaces (the symmetric lab, the integration tests) would otherwise collide on one status
socket. Both the daemon and ``pep status`` compute the default from here, in their own
namespace, so each finds its own.
"""

from __future__ import annotations

import contextlib
import hashlib
import os

__all__ = [
    "RUN_DIR",
    "default_status_socket",
    "ensure_dir",
    "netns_name",
    "remove_created_dirs",
    "runtime_dir",
    "runtime_dir_for",
]

RUN_DIR = "/run/pep"  # RuntimeDirectory=pep in deploy/pep.service
NETNS_DIR = "/run/netns"  # where `ip netns add` pins named namespaces (iproute2 NETNS_RUN_DIR)
# Longest namespace name used as it is. sun_path holds 107 bytes and workers append ".N" (up to
# ".127"), so a socket path may have 103: "/run/pep/netns/" + 64 + "/pep.sock" is 88 bytes.
_NAME_MAX = 64


def netns_name(self_ns: str = "/proc/self/ns/net", netns_dir: str = NETNS_DIR) -> str | None:
    """The name of this process's network namespace, as `ip netns identify` finds it: the entry
    of /run/netns that is the same file (device and inode) as /proc/self/ns/net; None when
    there is none (the initial namespace, an unnamed one, or nothing readable)."""
    try:
        me = os.stat(self_ns)
        names = sorted(os.listdir(netns_dir))
    except OSError:
        return None
    for name in names:
        try:
            st = os.stat(os.path.join(netns_dir, name))
        except OSError:
            continue  # removed meanwhile, or a stale mount point
        if (st.st_dev, st.st_ino) == (me.st_dev, me.st_ino):
            return name
    return None


def runtime_dir_for(netns: str | None) -> str:
    """The runtime directory for a namespace of this name (None: not a named one)."""
    if netns is None:
        return RUN_DIR
    if len(netns.encode()) > _NAME_MAX:  # long names keep a readable start and stay distinct
        digest = hashlib.sha256(netns.encode()).hexdigest()[:16]
        netns = netns.encode()[: _NAME_MAX - 17].decode(errors="ignore") + "-" + digest
    return os.path.join(RUN_DIR, "netns", netns)


def runtime_dir() -> str:
    """This process's runtime directory: /run/pep, or /run/pep/netns/NAME in a named netns."""
    return runtime_dir_for(netns_name())


def default_status_socket() -> str:
    """The ``status_socket`` default, for the daemon and ``pep status`` alike."""
    return os.path.join(runtime_dir(), "pep.sock")


# The directories this process created (ensure_dir), deepest last: removed again, when empty,
# on the way out (remove_created_dirs). pep creates only its own runtime directories.
_created: list[str] = []


def ensure_dir(directory: str, mode: int = 0o755) -> None:
    """Make sure ``directory`` exists. Below RUN_DIR (pep's own: /run/pep, the systemd unit's
    RuntimeDirectory, and its netns/NAME) missing levels are created and remembered; anywhere
    else pep creates nothing: FileNotFoundError names the directory that is missing (a typo
    in status_socket must not leave a tree of directories behind)."""
    directory = os.path.abspath(directory)
    if os.path.isdir(directory):
        return
    if os.path.commonpath([directory, RUN_DIR]) != RUN_DIR:
        raise FileNotFoundError(
            f"directory {directory} does not exist (pep creates only its runtime directory, "
            f"{RUN_DIR})"
        )
    missing = []
    level = directory
    while not os.path.isdir(level):
        missing.append(level)
        level = os.path.dirname(level)
    for path in reversed(missing):
        try:
            os.mkdir(path, mode)
        except FileExistsError:
            continue  # made meanwhile by another pep: not ours to remove
        _created.append(path)


def remove_created_dirs() -> None:
    """Remove the directories ensure_dir created, deepest first, those that are empty."""
    while _created:
        path = _created.pop()
        # Not empty (another pep's files, a recovery file kept on purpose) or gone: left.
        with contextlib.suppress(OSError):
            os.rmdir(path)
