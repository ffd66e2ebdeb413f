"""Where pep keeps its runtime files, per network namespace.

In the initial namespace (and in any unnamed one, e.g. a container's own) that is /run/pep, the
systemd unit's RuntimeDirectory. In a named namespace (``ip netns add NAME``) it is
/run/pep/netns/NAME: /run is shared by every namespace of the host, so two peps in two
namespaces (the symmetric lab, the integration tests) would otherwise collide on one status
socket. Both the daemon and ``pep status`` compute the default from here, in their own
namespace, so each finds its own.
"""

from __future__ import annotations

import hashlib
import os

__all__ = ["RUN_DIR", "default_status_socket", "netns_name", "runtime_dir", "runtime_dir_for"]

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
