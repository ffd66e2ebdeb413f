"""The SYN reader: owns the NFQUEUE netlink socket(s), decides each SYN, gives the verdict.

Every queued packet gets a verdict, whatever it is: a SYN that parses is decided by the policy
(split or bypass), admission control and, in strict mode, by pep's own upstream connect;
anything else is accepted unmarked and counted, so a packet we do not understand still flows,
unsplit. A packet held in the queue without a verdict would hang its connection, so holding is
bounded in number and time and always ends in a verdict.

Failure behaviour, chosen so that pep fails open:
- FAIL_OPEN: when the queue is full or our receive buffer overflows, the kernel accepts the
  packet itself instead of dropping it (net/netfilter/nfnetlink_queue.c, nfqnl_enqueue_packet);
- ENOBUFS on recv only says the kernel could not deliver some messages (and, with FAIL_OPEN,
  accepted those packets unmarked): it is counted and the reader goes on. A reader that dies
  on it is PEPsal v1's fail-closed bug;
- the iptables rule carries --queue-bypass: with no reader bound, SYNs pass unmarked.

``Decider`` and ``encode`` are the sans-IO core (unit-tested); ``SynQueue`` is the IO shell.
"""

from __future__ import annotations

import errno
import logging
import socket
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import trio

from pep.capture import nfq_codec as nfq
from pep.capture.flows import FlowTable
from pep.capture.nfq_socket import QueueSocket
from pep.capture.preconnect import PreConnector, UpstreamError
from pep.capture.syn import SynInfo, parse_syn
from pep.config import Config
from pep.config.policy import Policy
from pep.support.ratelog import Every

__all__ = ["Decider", "Hold", "SynCounters", "SynQueue", "Verdict", "encode"]

log = logging.getLogger(__name__)

# IPv4 (<= 60 bytes) + TCP (<= 60 bytes) headers; the rest of the IPv6 room is for its
# extension headers. Copying only headers keeps the netlink messages small.
COPY_RANGE = 256
LOG_EVERY = 10.0  # seconds: at most one line about bypassed flows per this long


@dataclass(slots=True)
class SynCounters:
    queued: int = 0  # packets received from the queue
    split: int = 0  # SYNs marked for splitting
    bypassed: int = 0  # SYNs the policy let through unsplit
    admission_bypassed: int = 0  # SYNs let through unsplit because pep was at max_connections
    fd_bypassed: int = 0  # ... because pep was short of file descriptors (RLIMIT_NOFILE)
    unparsable: int = 0  # not a parsable TCP SYN: accepted unmarked
    malformed: int = 0  # netlink messages we could not decode
    enobufs: int = 0  # receive buffer overflows (kernel accepted those packets: FAIL_OPEN)
    held: int = 0  # strict mode: SYNs held while pep connected upstream
    strict_upstream_failed: int = 0  # ... whose upstream refused/failed: released unsplit
    strict_timeout: int = 0  # ... whose upstream did not answer in time: released unsplit
    hold_full: int = 0  # strict mode: too many held already, released unsplit at once
    batch_verdicts: int = 0  # VERDICT_BATCH messages sent (each covering a run of packets)


@dataclass(frozen=True, slots=True)
class Verdict:
    queue: int
    packet_id: int
    verdict: int
    mark: int | None  # None: leave the packet's mark as it is


@dataclass(frozen=True, slots=True)
class Hold:
    """A SYN to hold until pep's upstream connect for it succeeds (strict mode)."""

    syn: SynInfo
    split: Verdict  # the verdict to give on success; failure gives a plain ACCEPT

    @property
    def key(self) -> tuple[str, int]:
        return (self.syn.src, self.syn.sport)


def encode(verdicts: Sequence[Verdict], batch: bool) -> tuple[bytes, int]:
    """The netlink messages for ``verdicts`` (in packet order), ready for one send.

    With ``batch``, a run of two or more consecutive packets of one queue with the same verdict
    and mark becomes one VERDICT_BATCH for the run's last id: the kernel applies it to every
    queued id up to that one, which is exactly the run when nothing earlier is still queued,
    so the caller passes ``batch=False`` while any SYN is held. Returns the messages and how
    many of them are batch verdicts.
    """
    out: list[bytes] = []
    batches = 0
    i, n = 0, len(verdicts)
    while i < n:
        v = verdicts[i]
        j = i + 1
        if batch:
            while j < n and (verdicts[j].queue, verdicts[j].verdict, verdicts[j].mark) == (
                v.queue,
                v.verdict,
                v.mark,
            ):
                j += 1
        last = verdicts[j - 1]
        if j - i > 1:
            out.append(nfq.build_verdict_batch(v.queue, last.packet_id, v.verdict, v.mark))
            batches += 1
        else:
            out.append(nfq.build_verdict(v.queue, v.packet_id, v.verdict, v.mark))
        i = j
    return b"".join(out), batches


class Decider:
    """Turns one receive buffer into verdicts and holds; no IO.

    ``load`` returns the number of live split connections (admission control counts them
    plus the SYNs already let through but not yet accepted); ``ifname`` maps an ingress
    ifindex to its name for policy rules that match on the interface.
    """

    def __init__(
        self,
        cfg: Config,
        flows: FlowTable,
        counters: SynCounters,
        load: Callable[[], int] = lambda: 0,
        ifname: Callable[[int | None], str | None] = lambda _: None,
        room: Callable[[], bool] = lambda: True,
    ) -> None:
        self.flows = flows
        self.counters = counters
        self.load = load
        # False when another split connection would not fit in pep's file descriptors
        # (pep.capture.fdbudget): the flow is let through unsplit rather than left to hang.
        self.room = room
        self.ifname = ifname
        self.held = 0  # maintained by the shell: SYNs currently held
        self.configure(cfg)

    def configure(self, cfg: Config) -> None:
        """Take new policy and limits (SIGHUP reload); counters and flows carry on."""
        self.cfg = cfg
        self.policy = Policy(cfg.policy, cfg.default_action)
        # TPROXY lives in the same mangle chain as the queue rule, and ACCEPT would leave that
        # chain: a split SYN is REPEATed instead, re-entering the chain where the TPROXY rule
        # (first in pep's chain) now sees its mark. See pep.kernel.rule_plan.plan.
        self.split_verdict = nfq.NF_REPEAT if cfg.mode == "tproxy" else nfq.NF_ACCEPT
        self.strict = cfg.syn_verdict == "after-upstream"

    def decide(
        self, messages: Sequence[nfq.Packet | nfq.Ack | nfq.Malformed]
    ) -> tuple[list[Verdict], list[Hold]]:
        c, cfg = self.counters, self.cfg
        verdicts: list[Verdict] = []
        holds: list[Hold] = []
        for msg in messages:
            if isinstance(msg, nfq.Packet):
                c.queued += 1
                syn = parse_syn(msg.payload)
                accept = Verdict(msg.queue, msg.packet_id, nfq.NF_ACCEPT, None)
                if not isinstance(syn, SynInfo):
                    c.unparsable += 1
                    log.debug("packet %d accepted unsplit: %s", msg.packet_id, syn.reason)
                    verdicts.append(accept)
                    continue
                action, _rule = self.policy.decide(syn, self.ifname(msg.indev))
                if action == "bypass":
                    c.bypassed += 1
                    verdicts.append(accept)
                    continue
                if cfg.max_connections and (
                    self.load() + len(self.flows) + self.held >= cfg.max_connections
                ):
                    c.admission_bypassed += 1
                    verdicts.append(accept)
                    continue
                if not self.room():
                    c.fd_bypassed += 1
                    verdicts.append(accept)
                    continue
                # The mark is merged under the mask: a VERDICT's NFQA_MARK replaces skb->mark
                # whole, and other tools' mark bits must survive.
                mark = (msg.mark & ~cfg.mark_mask) | cfg.split_mark
                split = Verdict(msg.queue, msg.packet_id, self.split_verdict, mark)
                if self.strict:
                    holds.append(Hold(syn, split))
                    continue
                self.flows.record(syn)
                c.split += 1
                verdicts.append(split)
            elif isinstance(msg, nfq.Malformed):
                c.malformed += 1
                log.warning("malformed netlink message from the queue: %s", msg.reason)
                if msg.packet_id is not None and msg.queue is not None:
                    verdicts.append(Verdict(msg.queue, msg.packet_id, nfq.NF_ACCEPT, None))
            elif msg.errno:
                log.warning(
                    "the kernel rejected a verdict: %s", errno.errorcode.get(msg.errno, msg.errno)
                )
        return verdicts, holds


class SynQueue:
    """One reader task per queue number, sharing one Decider, flow table and counters.

    ``load`` and ``room`` are the Decider's (admission control, the descriptor budget);
    ``preconnect`` opens strict mode's upstream connections (pep.capture.preconnect).
    """

    def __init__(
        self,
        cfg: Config,
        queue: int | Sequence[int],
        flows: FlowTable,
        *,
        load: Callable[[], int],
        room: Callable[[], bool],
        preconnect: PreConnector,
    ) -> None:
        self.queues = [queue] if isinstance(queue, int) else list(queue)
        self.flows = flows
        self.preconnect = preconnect
        self.counters = SynCounters()
        self._ifnames: dict[int, str | None] = {}
        self.decider = Decider(cfg, flows, self.counters, load=load, ifname=self._ifname, room=room)
        self.sockets: list[QueueSocket] = []  # by open(): constructing binds nothing
        self._held: dict[tuple[str, int], list[Verdict]] = {}
        self._log_admission_every = Every(LOG_EVERY)

    @property
    def cfg(self) -> Config:
        return self.decider.cfg

    @cfg.setter
    def cfg(self, cfg: Config) -> None:
        """SIGHUP reload: new policy and limits apply to the next SYN."""
        self.decider.configure(cfg)

    def _ifname(self, index: int | None) -> str | None:
        if index is None:
            return None
        if index not in self._ifnames:
            try:
                self._ifnames[index] = socket.if_indextoname(index)
            except OSError:
                return None  # gone meanwhile: a rule on interface names does not match
        return self._ifnames[index]

    def open(self) -> None:
        for q in self.queues:
            s = QueueSocket(q, self.cfg.queue_rcvbuf)
            self.sockets.append(s)  # close() closes it, whatever happens next
            s.open(
                copy_mode=nfq.NFQNL_COPY_PACKET,
                copy_range=COPY_RANGE,
                maxlen=self.cfg.queue_maxlen,
                flags=nfq.NFQA_CFG_F_FAIL_OPEN,
            )

    def close(self) -> None:
        for s in self.sockets:
            s.close()

    async def run(self) -> None:
        async with trio.open_nursery() as nursery:
            for s in self.sockets:
                nursery.start_soon(self._read, s, nursery)

    async def _read(self, qs: QueueSocket, nursery: trio.Nursery) -> None:
        async for messages in qs.batches():
            enobufs = sum(s.enobufs for s in self.sockets)
            if enobufs != self.counters.enobufs:
                self.counters.enobufs = enobufs
                log.warning(
                    "queue %d: receive buffer overflow (ENOBUFS #%d); the kernel accepted the "
                    "lost SYNs unsplit",
                    qs.queue,
                    enobufs,
                )
            before = self.counters.admission_bypassed, self.counters.fd_bypassed
            verdicts, holds = self.decider.decide(messages)
            for hold in holds:
                self._hold(hold, verdicts, nursery)
            if (self.counters.admission_bypassed, self.counters.fd_bypassed) != before:
                self._log_admission()
            if verdicts:
                await self._send(qs, verdicts)

    async def _send(self, qs: QueueSocket, verdicts: list[Verdict]) -> None:
        data, batches = encode(verdicts, batch=not self._held)
        self.counters.batch_verdicts += batches
        await qs.send(data)

    def _log_admission(self) -> None:
        if self._log_admission_every():  # under a flood: counted, and told now and then
            c = self.counters
            if c.fd_bypassed:
                log.warning(
                    "short of file descriptors (RLIMIT_NOFILE): new flows bypass pep (%d so far)",
                    c.fd_bypassed,
                )
            if c.admission_bypassed:
                log.warning(
                    "at max_connections=%d: new flows bypass pep (%d so far)",
                    self.cfg.max_connections,
                    c.admission_bypassed,
                )

    def _hold(self, hold: Hold, verdicts: list[Verdict], nursery: trio.Nursery) -> None:
        held = self._held.get(hold.key)
        if held is not None:  # a retransmitted SYN of a flow being connected: same outcome
            held.append(hold.split)
            self.counters.held += 1
            return
        if len(self._held) >= self.cfg.syn_hold_max:
            self.counters.hold_full += 1
            verdicts.append(Verdict(hold.split.queue, hold.split.packet_id, nfq.NF_ACCEPT, None))
            return
        self._held[hold.key] = [hold.split]
        self.decider.held = len(self._held)
        self.counters.held += 1
        nursery.start_soon(self._connect_then_release, hold)

    async def _connect_then_release(self, hold: Hold) -> None:
        """Strict mode: let the SYN through split only once the server accepted pep."""
        try:
            await self._connect(hold)
        finally:
            if hold.key in self._held:  # cancelled (stopping): never leave a SYN queued
                self._release_now(self._held.pop(hold.key))

    async def _connect(self, hold: Hold) -> None:
        syn, cfg = hold.syn, self.cfg
        upstream = None
        with trio.move_on_after(cfg.syn_hold_timeout) as scope:
            try:
                upstream = await self.preconnect.connect(cfg, syn)
            except UpstreamError as e:
                self.counters.strict_upstream_failed += 1
                log.info(
                    "strict: upstream %s:%d for %s:%d: %s; letting the SYN through unsplit",
                    syn.dst,
                    syn.dport,
                    syn.src,
                    syn.sport,
                    e.reason,
                )
        if scope.cancelled_caught:
            self.counters.strict_timeout += 1
            log.info(
                "strict: upstream %s:%d for %s:%d: no answer in %.1fs; SYN through unsplit",
                syn.dst,
                syn.dport,
                syn.src,
                syn.sport,
                cfg.syn_hold_timeout,
            )
        waiting = self._held.pop(hold.key)
        self.decider.held = len(self._held)
        if upstream is not None:
            self.flows.record(syn, upstream)
            self.counters.split += 1
            release = waiting
        else:
            release = [Verdict(v.queue, v.packet_id, nfq.NF_ACCEPT, None) for v in waiting]
        by_queue = {s.queue: s for s in self.sockets}
        for q in {v.queue for v in release}:
            data, _ = encode([v for v in release if v.queue == q], batch=False)
            await by_queue[q].send(data)

    def _release_now(self, waiting: list[Verdict]) -> None:
        """Best effort, without waiting: unsplit ACCEPTs for SYNs still held at shutdown (the
        kernel would drop them when the queue is unbound)."""
        self.decider.held = len(self._held)
        by_queue = {s.queue: s for s in self.sockets}
        for v in waiting:
            data, _ = encode([Verdict(v.queue, v.packet_id, nfq.NF_ACCEPT, None)], batch=False)
            try:
                by_queue[v.queue].sock.send(data)
            except OSError:
                return
