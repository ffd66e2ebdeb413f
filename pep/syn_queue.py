"""The SYN reader: owns the NFQUEUE netlink socket, records each SYN, gives the verdict.

Every queued packet gets a verdict, whatever it is: a SYN that parses is recorded in the flow
table and accepted with the split mark (the nat rule REDIRECTs only marked flows); anything
else is accepted unmarked and counted, so a packet we do not understand still flows, unsplit.
A packet held in the queue without a verdict would hang its connection.

Failure behaviour, chosen so that pep fails open:
- FAIL_OPEN: when the queue is full or our receive buffer overflows, the kernel accepts the
  packet itself instead of dropping it (net/netfilter/nfnetlink_queue.c, nfqnl_enqueue_packet);
- ENOBUFS on recv only says the kernel could not deliver some messages (and, with FAIL_OPEN,
  accepted those packets unmarked): it is counted and the reader goes on. A reader that dies
  on it is PEPsal v1's fail-closed bug;
- the iptables rule carries --queue-bypass: with no reader bound, SYNs pass unmarked.
"""

from __future__ import annotations

import errno
import logging
import socket
from dataclasses import dataclass

import trio

from pep import nfq_codec as nfq
from pep.config import Config
from pep.flows import FlowTable
from pep.syn import SynInfo, parse_syn

__all__ = ["QueueError", "SynCounters", "SynQueue"]

log = logging.getLogger(__name__)

SO_RCVBUFFORCE = getattr(socket, "SO_RCVBUFFORCE", 33)
# IPv4 (<= 60 bytes) + TCP (<= 60 bytes) headers; the rest of the IPv6 room is for its
# extension headers. Copying only headers keeps the netlink messages small.
COPY_RANGE = 256
_RECV_SIZE = 256 * 1024  # many PACKET messages per recv: the kernel batches them


class QueueError(RuntimeError):
    """Binding or configuring the queue failed; the message says which step and why."""


@dataclass(slots=True)
class SynCounters:
    queued: int = 0  # packets received from the queue
    split: int = 0  # SYNs recorded and marked for splitting
    unparsable: int = 0  # not a parsable TCP SYN: accepted unmarked
    malformed: int = 0  # netlink messages we could not decode
    enobufs: int = 0  # receive buffer overflows (kernel accepted those packets: FAIL_OPEN)


class SynQueue:
    def __init__(self, cfg: Config, queue: int, flows: FlowTable) -> None:
        self.cfg = cfg
        self.queue = queue
        self.flows = flows
        self.counters = SynCounters()
        self._seq = 0
        self.sock = socket.socket(
            socket.AF_NETLINK, socket.SOCK_RAW | socket.SOCK_CLOEXEC, nfq.NETLINK_NETFILTER
        )
        self.sock.bind((0, 0))
        try:
            self.sock.setsockopt(socket.SOL_SOCKET, SO_RCVBUFFORCE, cfg.queue_rcvbuf)
        except PermissionError:  # without CAP_NET_ADMIN fall back to the rmem_max-capped one
            self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, cfg.queue_rcvbuf)

    def open(self) -> None:
        """Bind the queue and configure it, each step acknowledged by the kernel (blocking)."""
        self.sock.settimeout(5)
        q = self.queue
        self._config("bind", cmd=nfq.NFQNL_CFG_CMD_BIND, pf=socket.AF_INET)
        self._config("copy parameters", copy_mode=nfq.NFQNL_COPY_PACKET, copy_range=COPY_RANGE)
        self._config("queue maxlen", maxlen=self.cfg.queue_maxlen)
        self._config("flags", flags=nfq.NFQA_CFG_F_FAIL_OPEN, mask=nfq.NFQA_CFG_F_FAIL_OPEN)
        self.sock.setblocking(False)
        log.debug("queue %d bound (copy %d bytes, maxlen %d)", q, COPY_RANGE, self.cfg.queue_maxlen)

    def _config(self, what: str, **attrs: int) -> None:
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
            hint = ""
            if e.errno == errno.EBUSY:
                hint = " (another process is bound to this queue: is pep already running?)"
            elif e.errno == errno.EPERM:
                hint = " (needs CAP_NET_ADMIN)"
            raise QueueError(
                f"NFQUEUE {self.queue}: {what} failed: {e.strerror or e}{hint}"
            ) from None

    def close(self) -> None:
        try:
            self.sock.setblocking(True)
            self.sock.settimeout(1)
            self._config("unbind", cmd=nfq.NFQNL_CFG_CMD_UNBIND, pf=socket.AF_INET)
        except QueueError as e:
            log.debug("%s", e)  # closing the socket unbinds too
        finally:
            self.sock.close()

    async def run(self) -> None:
        sock, buf = self.sock, bytearray(_RECV_SIZE)
        view = memoryview(buf)
        while True:
            await trio.lowlevel.wait_readable(sock)
            while True:
                try:
                    n = sock.recv_into(buf)
                except BlockingIOError:
                    break
                except OSError as e:
                    if e.errno != errno.ENOBUFS:
                        raise
                    self.counters.enobufs += 1
                    log.warning(
                        "queue %d: receive buffer overflow (ENOBUFS #%d); the kernel "
                        "accepted the lost SYNs unsplit",
                        self.queue,
                        self.counters.enobufs,
                    )
                    continue
                verdicts = self.verdicts(nfq.parse_messages(view[:n]))
                if verdicts:
                    await self._send(verdicts)

    def verdicts(self, messages: list[nfq.Packet | nfq.Ack | nfq.Malformed]) -> bytes:
        """Decide every packet in one receive buffer; all verdicts go out in one send."""
        c, out = self.counters, []
        split_mark, mask = self.cfg.split_mark, self.cfg.mark_mask
        for msg in messages:
            if isinstance(msg, nfq.Packet):
                c.queued += 1
                syn = parse_syn(msg.payload)
                if isinstance(syn, SynInfo):
                    self.flows.record(syn)
                    c.split += 1
                    mark = (msg.mark & ~mask) | split_mark
                    out.append(nfq.build_verdict(msg.queue, msg.packet_id, nfq.NF_ACCEPT, mark))
                else:
                    c.unparsable += 1
                    log.debug(
                        "queue %d: packet %d accepted unsplit: %s",
                        self.queue,
                        msg.packet_id,
                        syn.reason,
                    )
                    out.append(nfq.build_verdict(msg.queue, msg.packet_id, nfq.NF_ACCEPT))
            elif isinstance(msg, nfq.Malformed):
                c.malformed += 1
                log.warning("queue %d: malformed netlink message: %s", self.queue, msg.reason)
                if msg.packet_id is not None:
                    out.append(nfq.build_verdict(self.queue, msg.packet_id, nfq.NF_ACCEPT))
            elif msg.errno:
                log.warning(
                    "queue %d: kernel rejected a verdict: %s",
                    self.queue,
                    errno.errorcode.get(msg.errno, msg.errno),
                )
        return b"".join(out)

    async def _send(self, data: bytes) -> None:
        while True:
            try:
                self.sock.send(data)
                return
            except BlockingIOError:
                await trio.lowlevel.wait_writable(self.sock)
