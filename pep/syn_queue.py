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
from dataclasses import dataclass

from pep import nfq_codec as nfq
from pep.config import Config
from pep.flows import FlowTable
from pep.nfq_socket import QueueSocket
from pep.syn import SynInfo, parse_syn

__all__ = ["SynCounters", "SynQueue", "decide"]

log = logging.getLogger(__name__)

# IPv4 (<= 60 bytes) + TCP (<= 60 bytes) headers; the rest of the IPv6 room is for its
# extension headers. Copying only headers keeps the netlink messages small.
COPY_RANGE = 256


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
        self.nfq = QueueSocket(queue, cfg.queue_rcvbuf)
        # TPROXY lives in the same mangle chain as the queue rule, and ACCEPT would leave that
        # chain: a split SYN is REPEATed instead, re-entering the chain where the TPROXY rule
        # (first in pep's chain) now sees its mark. See iptables_setup._plan.
        self.split_verdict = nfq.NF_REPEAT if cfg.mode == "tproxy" else nfq.NF_ACCEPT

    def open(self) -> None:
        self.nfq.open(
            copy_mode=nfq.NFQNL_COPY_PACKET,
            copy_range=COPY_RANGE,
            maxlen=self.cfg.queue_maxlen,
            flags=nfq.NFQA_CFG_F_FAIL_OPEN,
        )

    def close(self) -> None:
        self.nfq.close()

    async def run(self) -> None:
        async for messages in self.nfq.batches():
            if self.nfq.enobufs != self.counters.enobufs:
                self.counters.enobufs = self.nfq.enobufs
                log.warning(
                    "queue %d: receive buffer overflow (ENOBUFS #%d); the kernel accepted the "
                    "lost SYNs unsplit",
                    self.queue,
                    self.counters.enobufs,
                )
            verdicts = decide(
                messages,
                self.flows,
                self.counters,
                self.cfg.split_mark,
                self.cfg.mark_mask,
                self.split_verdict,
            )
            if verdicts:
                await self.nfq.send(verdicts)


def decide(
    messages: list[nfq.Packet | nfq.Ack | nfq.Malformed],
    flows: FlowTable,
    counters: SynCounters,
    split_mark: int,
    mask: int,
    split_verdict: int = nfq.NF_ACCEPT,
) -> bytes:
    """Verdicts for every packet of one receive buffer, concatenated for one send.

    The sans-IO core of the reader: every Packet, and every Malformed message whose packet id
    could be read, gets exactly one ACCEPT; only a parsed SYN gets the split mark. The mark is
    merged into the packet's existing mark under ``mask`` (a VERDICT's NFQA_MARK replaces
    skb->mark whole), so other tools' mark bits survive.
    """
    out = []
    for msg in messages:
        if isinstance(msg, nfq.Packet):
            counters.queued += 1
            syn = parse_syn(msg.payload)
            if isinstance(syn, SynInfo):
                flows.record(syn)
                counters.split += 1
                mark = (msg.mark & ~mask) | split_mark
                out.append(nfq.build_verdict(msg.queue, msg.packet_id, split_verdict, mark))
            else:
                counters.unparsable += 1
                log.debug(
                    "queue %d: packet %d accepted unsplit: %s", msg.queue, msg.packet_id, syn.reason
                )
                out.append(nfq.build_verdict(msg.queue, msg.packet_id, nfq.NF_ACCEPT))
        elif isinstance(msg, nfq.Malformed):
            counters.malformed += 1
            log.warning("malformed netlink message from the queue: %s", msg.reason)
            if msg.packet_id is not None and msg.queue is not None:
                out.append(nfq.build_verdict(msg.queue, msg.packet_id, nfq.NF_ACCEPT))
        elif msg.errno:
            log.warning(
                "the kernel rejected a verdict: %s", errno.errorcode.get(msg.errno, msg.errno)
            )
    return b"".join(out)
