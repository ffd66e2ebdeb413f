"""The systemd integration pep uses, without a dependency on libsystemd.

- ``notify`` and ``reloading``: the sd_notify(3) datagram protocol, so ``Type=notify`` units
  are started only once the rules are in place, and ``systemctl reload``/``stop`` see
  RELOADING/STOPPING.
- ``under_journal``: whether stderr goes to the journal (JOURNAL_STREAM, systemd.exec(5)), in
  which case log lines carry no timestamp of their own: the journal stamps each line.
- ``set_parent_death_signal``: PR_SET_PDEATHSIG, so a worker does not outlive its master.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import os
import signal
import socket
import time

__all__ = ["notify", "reloading", "set_parent_death_signal", "under_journal"]


def notify(*assignments: str) -> bool:
    """Send ``READY=1`` etc. to $NOTIFY_SOCKET; False when not run by systemd (or it failed).

    Never raises: readiness reporting must not be able to take the daemon down.
    """
    address = os.environ.get("NOTIFY_SOCKET")
    if not address or not assignments:
        return False
    if address.startswith("@"):  # abstract namespace
        address = "\0" + address[1:]
    with (
        contextlib.suppress(OSError),
        socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock,
    ):
        sock.connect(address)
        sock.sendall("\n".join(assignments).encode())
        return True
    return False


def reloading() -> bool:
    """RELOADING=1 needs the monotonic time of the request (systemd 253, Type=notify-reload)."""
    return notify(
        "RELOADING=1", f"MONOTONIC_USEC={time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000}"
    )


def under_journal() -> bool:
    """stderr is a journal stream (systemd sets JOURNAL_STREAM for it, systemd.exec(5))."""
    return "JOURNAL_STREAM" in os.environ


PR_SET_PDEATHSIG = 1  # include/uapi/linux/prctl.h


def set_parent_death_signal(sig: int = signal.SIGTERM) -> bool:
    """Ask the kernel to send ``sig`` when the parent dies: a worker whose master was killed
    drains and exits instead of running on unsupervised with nobody to remove the rules."""
    libc_name = ctypes.util.find_library("c") or "libc.so.6"
    try:
        libc = ctypes.CDLL(libc_name, use_errno=True)
        return libc.prctl(PR_SET_PDEATHSIG, int(sig), 0, 0, 0) == 0
    except OSError:
        return False
