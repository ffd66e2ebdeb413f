"""The kernel's own counters of each bound NFQUEUE: /proc/net/netfilter/nfnetlink_queue.

One line per bound queue, nine numbers (net/netfilter/nfnetlink_queue.c, seq_show): queue
number, the bound netlink socket's portid, packets waiting, copy mode, copy range, queue
dropped, user dropped, last packet id, and a constant 1. The file is per network namespace (the
namespace of the process that opens it) and 0440 root:root.

``pep status`` (pep.ops.status.document), the lab's delay line (pep.lab.delayline) and the tests
(pep/testing/daemon.py) all read it: ``parse`` is the one place that knows its layout.

Who holds a queue, when a bind is refused: the row's portid, found in /proc/net/netlink (one
line per netlink socket of the namespace: protocol, portid, ..., inode; af_netlink.c,
netlink_seq_show), gives the socket's inode, and the process with ``socket:[INODE]`` among its
/proc/PID/fd links is the holder (``socket_pids``; other users' fds are readable by root only).
"""

from __future__ import annotations

import os

__all__ = [
    "COLUMNS",
    "NETLINK_PROC",
    "NFQUEUE_PROC",
    "Row",
    "netlink_inode",
    "parse",
    "read",
    "socket_pids",
]

NFQUEUE_PROC = "/proc/net/netfilter/nfnetlink_queue"
NETLINK_PROC = "/proc/net/netlink"
# The named columns, in order (seq_show's format); the constant last one is left out.
COLUMNS = (
    "queue",
    "portid",
    "waiting",
    "copy_mode",
    "copy_range",
    "queue_dropped",
    "user_dropped",
    "last_id",
)
Row = dict[str, int]


def parse(text: str, queues: tuple[int, int] | None = None) -> list[Row]:
    """The rows of the file's ``text``, in its order; with ``queues``, only queues first..last.

    A line that is not all numbers, or too short, is skipped: the file has no header today,
    and a reader of counters must not fail on a line it does not know.
    """
    rows = []
    for line in text.splitlines():
        fields = line.split()
        if len(fields) < len(COLUMNS) or not all(f.isdigit() for f in fields):
            continue
        row = dict(zip(COLUMNS, map(int, fields), strict=False))
        if queues is None or queues[0] <= row["queue"] <= queues[1]:
            rows.append(row)
    return rows


def read(queues: tuple[int, int] | None = None, path: str = NFQUEUE_PROC) -> list[Row]:
    """``parse`` of this process's namespace's file; OSError when it cannot be read (EACCES
    for a daemon running without root, ENOENT without the nfnetlink_queue module)."""
    with open(path) as f:
        return parse(f.read(), queues)


def netlink_inode(text: str, protocol: int, portid: int) -> int | None:
    """The inode of the netlink socket of ``protocol`` bound to ``portid``, from the text of
    /proc/net/netlink (header: sk Eth Pid Groups Rmem Wmem Dump Locks Drops Inode)."""
    for line in text.splitlines()[1:]:
        fields = line.split()
        if len(fields) < 10 or not all(f.isdigit() for f in (fields[1], fields[2], fields[-1])):
            continue
        if int(fields[1]) == protocol and int(fields[2]) == portid:
            return int(fields[-1])
    return None


def socket_pids(inode: int, proc: str = "/proc") -> list[int]:
    """The processes that have socket ``inode`` open (those whose fds this process may read)."""
    target = f"socket:[{inode}]"
    pids = []
    for name in os.listdir(proc):
        if not name.isdigit():
            continue
        fds = os.path.join(proc, name, "fd")
        try:
            links = [os.readlink(os.path.join(fds, fd)) for fd in os.listdir(fds)]
        except OSError:
            continue  # gone meanwhile, or not ours to read
        if target in links:
            pids.append(int(name))
    return pids
