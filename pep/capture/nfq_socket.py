"""The IO shell around the NFQUEUE codec: one netlink socket bound to one queue.

Shared by the SYN reader and the lab's delay line, so binding, configuring (each step
acknowledged by the kernel, with an error that names the step) and the non-blocking
receive/send loop exist once.
"""

from __future__ import annotations

import errno
import socket
from collections.abc import AsyncIterator

import trio

from pep.capture import nfq_codec as nfq
from pep.capture import nfq_proc

__all__ = ["QueueError", "QueueSocket"]

SO_RCVBUFFORCE = getattr(socket, "SO_RCVBUFFORCE", 33)  # include/uapi/asm-generic/socket.h


class QueueError(RuntimeError):
    """Binding or configuring the queue failed; the message says which step and why."""


def holder(queue: int) -> int | None:
    """The netlink port id bound to ``queue`` in this namespace, None when it is free (or the
    kernel's table cannot be read)."""
    try:
        rows = nfq_proc.read((queue, queue))
    except OSError:
        return None
    return rows[0]["portid"] if rows else None


def _process(portid: int) -> str:
    """Who has the socket bound to ``portid``: the process that holds it open (pep.capture.
    nfq_proc.socket_pids), else, where its fds cannot be read, the likely one (a netlink port
    id is its process's pid for the process's first socket of the protocol)."""
    try:
        with open(nfq_proc.NETLINK_PROC) as f:
            inode = nfq_proc.netlink_inode(f.read(), nfq.NETLINK_NETFILTER, portid)
        pids = nfq_proc.socket_pids(inode) if inode is not None else []
    except OSError:
        pids = []
    for pid, how in [(p, "pid") for p in pids] + [(portid, "likely pid")]:
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                cmd = f.read().replace(b"\0", b" ").decode(errors="replace").strip()
        except OSError:
            continue
        if cmd:
            return f", {how} {pid}: {cmd[:80]}"
    return ""


class QueueSocket:
    # Datagrams taken per wake-up: a burst of SYNs is decided and answered together, and the
    # first of a long burst need not wait for the last before their verdicts go out.
    BATCH = 64

    def __init__(self, queue: int, rcvbuf: int, recv_size: int = 256 * 1024) -> None:
        self.queue = queue
        self.enobufs = 0  # receive buffer overflows survived
        self._seq = 0
        self._buf = bytearray(recv_size)
        self.sock = socket.socket(
            socket.AF_NETLINK, socket.SOCK_RAW | socket.SOCK_CLOEXEC, nfq.NETLINK_NETFILTER
        )
        self.sock.bind((0, 0))
        try:
            self.sock.setsockopt(socket.SOL_SOCKET, SO_RCVBUFFORCE, rcvbuf)
        except PermissionError:  # without CAP_NET_ADMIN: capped by net.core.rmem_max
            self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)

    def open(self, *, copy_mode: int, copy_range: int, maxlen: int, flags: int) -> None:
        """Bind the queue and configure it (blocking, before the trio loop needs the socket)."""
        self.sock.settimeout(5)
        self.config("bind", cmd=nfq.NFQNL_CFG_CMD_BIND, pf=socket.AF_INET)
        self.config("copy parameters", copy_mode=copy_mode, copy_range=copy_range)
        self.config("queue maxlen", maxlen=maxlen)
        self.config("flags", flags=flags, mask=flags)
        self.sock.setblocking(False)

    def config(self, what: str, **attrs: int) -> None:
        self._seq += 1
        seq = self._seq
        try:
            self.sock.send(nfq.build_config(self.queue, seq, **attrs))
            while True:
                for msg in nfq.parse_messages(self.sock.recv(65536)):
                    if isinstance(msg, nfq.Ack) and msg.seq == seq:
                        if msg.errno:
                            raise OSError(msg.errno, errno.errorcode.get(msg.errno, "?"))
                        return
        except OSError as e:
            raise QueueError(self._failure(what, e)) from None

    def _failure(self, what: str, e: OSError) -> str:
        """What went wrong, in words: the kernel answers EPERM both to a process without
        CAP_NET_ADMIN and to a bind of a queue another socket holds (nfqnl_recv_config:
        ``queue->peer_portid != portid``); the kernel's own table tells which."""
        text = f"NFQUEUE {self.queue}: {what} failed"
        if e.errno in (errno.EPERM, errno.EBUSY):
            held = holder(self.queue)
            if held is not None:
                return (
                    f"{text}: the queue is held by another process (netlink port id {held}"
                    f"{_process(held)}; /proc/net/netfilter/nfnetlink_queue): is pep "
                    "already running, or another NFQUEUE reader?"
                )
            if e.errno == errno.EPERM:
                return f"{text}: {e.strerror} (needs CAP_NET_ADMIN)"
        return f"{text}: {e.strerror or e}"

    def close(self) -> None:
        """Unbind (best effort: closing the socket unbinds too) and close."""
        try:
            self.sock.setblocking(True)
            self.sock.settimeout(1)
            self.config("unbind", cmd=nfq.NFQNL_CFG_CMD_UNBIND, pf=socket.AF_INET)
        except QueueError:
            pass
        finally:
            self.sock.close()

    async def batches(self) -> AsyncIterator[list[nfq.Packet | nfq.Ack | nfq.Malformed]]:
        """Yield the decoded messages of every datagram waiting (up to ``BATCH``) at once.

        The kernel queues each packet as its own datagram; taking all that wait in one go lets
        a burst of SYNs be decided together and answered with one send. ENOBUFS means the
        kernel could not deliver some messages (with FAIL_OPEN it accepted those packets
        itself): counted in ``enobufs`` and survived, never fatal.
        """
        sock, buf = self.sock, self._buf
        view = memoryview(buf)
        drained = False
        while True:
            if drained:
                await trio.lowlevel.wait_readable(sock)
            messages: list[nfq.Packet | nfq.Ack | nfq.Malformed] = []
            drained = False
            for _ in range(self.BATCH):
                try:
                    n = sock.recv_into(buf)
                except BlockingIOError:
                    drained = True
                    break
                except OSError as e:
                    if e.errno != errno.ENOBUFS:
                        raise
                    self.enobufs += 1
                    continue
                messages += nfq.parse_messages(view[:n])
            if messages:
                yield messages

    async def send(self, data: bytes) -> None:
        """Send verdicts (several netlink messages may be concatenated in one send)."""
        while True:
            try:
                self.sock.send(data)
                return
            except BlockingIOError:
                await trio.lowlevel.wait_writable(self.sock)
