"""The lab's link: a userspace delay line on NFQUEUE, plus the link's random-loss rules.

This kernel has no netem (nor fq/etf for timestamp-based delay, see DESIGN.md), so delay is
made here: the link namespace's FORWARD chain queues every packet, one queue per direction
(queues are FIFO, and a VERDICT_BATCH releases every id up to the one it names, so one batch
verdict per wake-up releases exactly the packets that are due). Each packet id is held for the
one-way delay of its direction. Rate (tbf) is applied by the kernel after this, on egress.

Split as elsewhere in pep: :class:`DelayLine` is the pure scheduling core (arrivals in,
batch verdicts out, no clock of its own), :class:`Direction` the trio shell around one
:class:`pep.nfq_socket.QueueSocket`. Run as its own process inside the link namespace::

    ip netns exec LAB-link python -m pep.lab.delayline --up-if cl0 --down-if sv0 \
        --delay-ms 300 --up-rate 5000000 --down-rate 20000000 --loss 0.005 --stats FILE

Copy mode META and the GSO flag keep the per-packet cost to one small message per (possibly
64 KB) GSO packet; without GSO the kernel segments and Python would see every 1500-byte frame.
No FAIL_OPEN and no --queue-bypass on purpose: a packet that cannot be delayed is dropped (and
counted in "queue dropped"), because letting it skip the delay would reorder the link and
silently turn the emulated satellite into a LAN.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import math
import os
import signal
import sys
from collections import deque
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import trio

from pep import nfq_codec as nfq
from pep import nfq_proc
from pep.nfq_socket import QueueError, QueueSocket
from pep.nfrule import NfRule, comment, ext
from pep.rule_show import fresh_table

__all__ = [
    "DelayLine",
    "Direction",
    "LinkRules",
    "main",
    "queue_sizing",
    "simulate",
]

log = logging.getLogger("pep.lab.delayline")

FILTER = "filter"
CHAIN = "LAB_LINK"
COMMENT = "pep-lab"
# Per queued packet, the netlink message (META copy: headers and attributes, ~100 bytes) is
# charged to the socket at its skb truesize, about 1 KiB; that is what rcvbuf must hold.
MSG_TRUESIZE = 1024
# Default for an unlimited rate (nothing to size from): DESIGN.md's checked "large" value.
UNSIZED_MAXLEN = 65536
# Batch widening (DelayLine.slack), seconds. 0: with the timerfd and the learned lead, each
# wake-up releases what is due and no packet leaves early; an experiment may trade accuracy
# for fewer wake-ups with PEP_LAB_SLACK=0.0005.
SLACK = float(os.environ.get("PEP_LAB_SLACK", "0"))


@dataclass(slots=True)
class DelayLine:
    """Which batch verdicts to send when, for one FIFO queue with a constant delay.

    Arrival order is queue order (ids increase), and every packet waits the same ``delay``, so
    release order is arrival order and the packets due at any moment are a prefix of the held
    ones: releasing them is one VERDICT_BATCH naming the last id of that prefix.

    A timer never fires exactly on time: on this project's VMs a wake-up from idle came
    0.2-0.8 ms late, which is 4 % of a 40 ms LEO round trip. So the line learns how late its
    timer fires (``woke``: a moving average, the ``lead``) and aims that much early; the
    packet then leaves on time on average instead of always late. ``slack`` widens each
    batch to packets due that much later (fewer wake-ups, at most ``slack`` early).
    """

    delay: float
    slack: float = 0.0
    lead: float = 0.0
    held: deque[tuple[float, int]] = field(default_factory=deque)
    arrived: int = 0
    released: int = 0
    batches: int = 0
    max_held: int = 0

    LEAD_GAIN: ClassVar[float] = 1 / 16  # moving-average weight of one observed wake-up
    LEAD_MAX: ClassVar[float] = 0.005  # a wake-up later than this is an outlier, not the norm

    def arrive(self, packet_id: int, now: float) -> None:
        self.held.append((now + self.delay, packet_id))
        self.arrived += 1
        if len(self.held) > self.max_held:
            self.max_held = len(self.held)

    def deadline(self) -> float | None:
        """When to wake next (None: nothing held, wait for an arrival)."""
        return self.held[0][0] - self.slack - self.lead if self.held else None

    def woke(self, target: float, now: float) -> None:
        """The timer set for ``target`` fired at ``now``: learn its lateness."""
        late = min(max(now - target, 0.0), self.LEAD_MAX)
        self.lead += (late - self.lead) * self.LEAD_GAIN

    def release(self, now: float) -> int | None:
        """Forget every packet due by ``now``; the id for one batch verdict, or None."""
        held = self.held
        early = self.slack + self.lead
        last = None
        n = 0
        # Same arithmetic as deadline(): waking at the deadline always releases something.
        while held and held[0][0] - early <= now:
            last = held.popleft()[1]
            n += 1
        if last is not None:
            self.released += n
            self.batches += 1
        return last

    def release_all(self) -> int | None:
        """Shutting down: everything goes now (a held packet with no verdict would be lost)."""
        return self.release(math.inf)

    def __len__(self) -> int:
        return len(self.held)


@dataclass(slots=True)
class Lateness:
    """How late (negative: early) the first packet of each batch left, against its due time:
    the delay line's own accuracy, reported in its stats."""

    count: int = 0
    total: float = 0.0
    worst: float = 0.0

    def add(self, seconds: float) -> None:
        self.count += 1
        self.total += seconds
        self.worst = max(self.worst, seconds)

    def as_ms(self) -> dict[str, float]:
        mean = self.total / self.count if self.count else 0.0
        return {"mean_ms": round(mean * 1000, 3), "max_ms": round(self.worst * 1000, 3)}


def simulate(
    arrivals: Iterable[tuple[int, float]], delay: float, slack: float = 0.0
) -> list[tuple[float, int]]:
    """The shell's schedule on an ideal clock: ``(time, batch id)`` for each verdict sent.

    ``arrivals`` are ``(packet id, time)`` in queue order. The shell wakes at each deadline
    and releases what is due; an arrival at the same instant as a wake-up is received first
    (the shell reads the socket before its timer fires when both are ready).
    """
    line = DelayLine(delay, slack)
    out: list[tuple[float, int]] = []
    pending = deque(arrivals)
    while pending or len(line):
        wake = line.deadline()
        if pending and (wake is None or pending[0][1] <= wake):
            packet_id, t = pending.popleft()
            line.arrive(packet_id, t)
            continue
        assert wake is not None
        last = line.release(wake)
        if last is not None:
            out.append((wake, last))
    return out


def queue_sizing(
    rate_bps: int | None,
    reverse_rate_bps: int | None,
    delay_s: float,
    buffer_s: float,
    margin: float = 4.0,
) -> tuple[int, int]:
    """Kernel queue length and netlink receive buffer for one direction's queue.

    What the queue holds at once is bounded by what the senders keep in flight on this
    direction's hop: the data of this direction (rate x (delay + the tbf buffer behind it))
    in packets of one MSS, plus at most one ACK per data packet of the reverse direction.
    ``margin`` covers senders' bursts (an initial window leaves all at once) and small packets.
    With an unlimited rate there is nothing to size from: DESIGN.md's 65536.
    """
    if rate_bps is None or reverse_rate_bps is None:
        maxlen = UNSIZED_MAXLEN
    else:
        span = delay_s + buffer_s
        packets = (rate_bps + reverse_rate_bps) / 8 * span / 1448
        maxlen = min(1 << 20, max(1024, math.ceil(packets * margin)))
    rcvbuf = min(1 << 30, max(4 << 20, maxlen * MSG_TRUESIZE))
    return maxlen, rcvbuf


# --------------------------------------------------------------------------------------------
# the link's netfilter rules (python-iptables; this process is alone in the link namespace)


@dataclass(frozen=True, slots=True)
class LinkRules:
    """``FORWARD -j LAB_LINK``; in LAB_LINK per direction: random DROP (loss), then NFQUEUE.

    Dropping before queueing keeps lost packets out of the delay line. Only this process
    writes the link namespace's rules, so the chain is ours; still, removal touches only it.
    The rules are described once (:meth:`rules`); the log's lines and the python-iptables
    objects are both rendered from that.
    """

    directions: tuple[tuple[str, int, bool], ...]  # (ingress interface, queue, delayed?)
    loss: float

    def rules(self) -> list[NfRule]:
        """The jump from FORWARD, then LAB_LINK's content in order."""
        out = [NfRule(FILTER, "FORWARD", ext(CHAIN), (comment(COMMENT),))]
        for ifname, queue, delayed in self.directions:
            if self.loss > 0:
                random = ext("statistic", mode="random", probability=_probability(self.loss))
                out.append(NfRule(FILTER, CHAIN, ext("DROP"), (random,), in_interface=ifname))
            if delayed:
                queued = ext("NFQUEUE", queue_num=str(queue))
                out.append(NfRule(FILTER, CHAIN, queued, in_interface=ifname))
        return out

    def lines(self) -> list[str]:
        """The rules as ``iptables-legacy -S`` prints them once installed (for the log)."""
        return [rule.save_line() for rule in self.rules()]

    def install(self) -> None:
        import iptc

        jump, *content = self.rules()
        with fresh_table(FILTER) as table:
            if not table.is_chain(CHAIN):
                table.create_chain(CHAIN)
            table.flush_entries(CHAIN)
            chain = iptc.Chain(table, CHAIN)
            for rule in content:
                chain.append_rule(rule.build(iptc))
            _drop_jumps(iptc.Chain(table, "FORWARD"))
            iptc.Chain(table, "FORWARD").insert_rule(jump.build(iptc))  # CHAIN exists by now
            table.commit()

    @staticmethod
    def remove() -> None:
        import iptc

        with fresh_table(FILTER) as table:
            _drop_jumps(iptc.Chain(table, "FORWARD"))
            if table.is_chain(CHAIN):
                table.flush_entries(CHAIN)
                table.delete_chain(CHAIN)
            table.commit()


# xt_statistic keeps a random probability as a fraction of 2**31 (libxt_statistic.c parses it
# with lround(p * 0x80000000) and saves it with "%.11f").
STATISTIC_SCALE = 0x80000000


def _probability(loss: float) -> str:
    """``--probability`` as iptables-save prints it (0.005 is saved as 0.00499999989)."""
    return f"{math.floor(loss * STATISTIC_SCALE + 0.5) / STATISTIC_SCALE:.11f}"


def _drop_jumps(forward: Any) -> None:
    for rule in [r for r in forward.rules if r.target and r.target.name == CHAIN]:
        forward.delete_rule(rule)


# --------------------------------------------------------------------------------------------
# the trio shell


class Timer:
    """A one-shot trio timer with microsecond resolution, on a timerfd.

    trio sleeps in epoll_wait, whose timeout Python rounds up to whole milliseconds: measured
    here, ``trio.sleep_until`` woke 0.8 ms late in the median, which on a 40 ms LEO link
    made the RTT 7 % long. A timerfd fires on the kernel's hrtimer instead.
    """

    _CLOCK_MONOTONIC = 1
    _TFD_NONBLOCK = os.O_NONBLOCK
    _TFD_CLOEXEC = os.O_CLOEXEC

    def __init__(self) -> None:
        import ctypes

        self._libc = ctypes.CDLL(None, use_errno=True)
        self._spec = (ctypes.c_long * 4)()  # struct itimerspec: interval, value (sec, nsec)
        self.fd = self._libc.timerfd_create(
            self._CLOCK_MONOTONIC, self._TFD_NONBLOCK | self._TFD_CLOEXEC
        )
        if self.fd < 0:
            raise OSError(ctypes.get_errno(), "timerfd_create failed")

    async def sleep_until(self, deadline: float) -> None:
        delay = deadline - trio.current_time()  # trio's clock has an offset: relative timer
        if delay <= 0:
            await trio.lowlevel.checkpoint()
            return
        ns = max(1000, int(delay * 1e9))
        self._spec[0] = self._spec[1] = 0
        self._spec[2], self._spec[3] = divmod(ns, 1_000_000_000)
        self._libc.timerfd_settime(self.fd, 0, self._spec, None)  # re-arming clears old ticks
        while True:
            try:
                os.read(self.fd, 8)
                return
            except BlockingIOError:
                await trio.lowlevel.wait_readable(self.fd)

    def close(self) -> None:
        os.close(self.fd)


def read_proc_queues(path: str = nfq_proc.NFQUEUE_PROC) -> dict[int, dict[str, int]]:
    """This namespace's nfnetlink_queue counters (pep.nfq_proc) by queue number, under the
    names the stats file has always used; empty when the file cannot be read."""
    try:
        rows = nfq_proc.read(path=path)
    except OSError:
        return {}
    return {
        r["queue"]: {
            "queued_now": r["waiting"],
            "queue_dropped": r["queue_dropped"],
            "user_dropped": r["user_dropped"],
            "last_id": r["last_id"],
        }
        for r in rows
    }


class Direction:
    """One direction of the link: its queue socket, its DelayLine, and the two tasks."""

    def __init__(
        self, name: str, ifname: str, queue: int, delay: float, maxlen: int, rcvbuf: int
    ) -> None:
        self.name, self.ifname, self.queue = name, ifname, queue
        self.maxlen, self.rcvbuf = maxlen, rcvbuf
        self.line = DelayLine(delay, slack=SLACK)
        self.qs = QueueSocket(queue, rcvbuf)
        self.malformed = 0
        self.verdict_errors = 0
        self.late = Lateness()
        self._wake = trio.Event()

    def open(self) -> None:
        self.qs.open(
            copy_mode=nfq.NFQNL_COPY_META,
            copy_range=0,
            maxlen=self.maxlen,
            flags=nfq.NFQA_CFG_F_GSO,
        )

    async def run(self) -> None:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(self._receive)
            nursery.start_soon(self._release)

    async def _receive(self) -> None:
        line = self.line
        async for messages in self.qs.batches():
            now = trio.current_time()
            for msg in messages:
                if type(msg) is nfq.Packet:
                    line.arrive(msg.packet_id, now)
                elif isinstance(msg, nfq.Malformed):
                    self.malformed += 1
                    if msg.packet_id is not None:  # still needs its verdict
                        line.arrive(msg.packet_id, now)
                elif isinstance(msg, nfq.Ack) and msg.errno:
                    self.verdict_errors += 1
                    if self.verdict_errors <= 5:
                        log.warning("%s: verdict refused: %s", self.name, os.strerror(msg.errno))
            self._wake.set()

    async def _release(self) -> None:
        line = self.line
        timer = Timer()
        try:
            while True:
                deadline = line.deadline()
                if deadline is None:
                    self._wake = trio.Event()
                    await self._wake.wait()
                    continue
                await timer.sleep_until(deadline)
                now = trio.current_time()
                line.woke(deadline, now)
                if len(line):
                    self.late.add(now - line.held[0][0])
                last = line.release(now)
                if last is not None:
                    await self.qs.send(nfq.build_verdict_batch(self.queue, last, nfq.NF_ACCEPT))
        finally:
            timer.close()

    def flush(self) -> None:
        """Release everything still held (blocking send; used on the way out)."""
        last = self.line.release_all()
        if last is not None:
            with contextlib.suppress(OSError):
                self.qs.sock.setblocking(True)
                self.qs.sock.send(nfq.build_verdict_batch(self.queue, last, nfq.NF_ACCEPT))

    def stats(self, proc: dict[int, dict[str, int]]) -> dict[str, object]:
        line = self.line
        return {
            "interface": self.ifname,
            "queue": self.queue,
            "delay_ms": round(line.delay * 1000, 3),
            "maxlen": self.maxlen,
            "rcvbuf": self.rcvbuf,
            "arrived": line.arrived,
            "released": line.released,
            "batches": line.batches,
            "held": len(line),
            "max_held": line.max_held,
            "enobufs": self.qs.enobufs,
            "malformed": self.malformed,
            "verdict_errors": self.verdict_errors,
            "release_lateness": self.late.as_ms(),
            "timer_lead_ms": round(self.line.lead * 1000, 3),
            **proc.get(self.queue, {}),
        }


@dataclass
class Options:
    up_if: str
    down_if: str
    up_delay: float
    down_delay: float
    up_rate: int | None
    down_rate: int | None
    loss: float
    buffer: float
    up_queue: int
    down_queue: int
    stats: Path | None


def _write_stats(path: Path, payload: dict[str, object]) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(payload, indent=1))
    tmp.replace(path)


async def serve(opts: Options) -> None:
    """Bind the queues, install the rules, delay until SIGTERM/SIGINT, then undo both."""
    dirs: list[Direction] = []
    for name, ifname, queue, delay, rate, reverse in (
        ("up", opts.up_if, opts.up_queue, opts.up_delay, opts.up_rate, opts.down_rate),
        ("down", opts.down_if, opts.down_queue, opts.down_delay, opts.down_rate, opts.up_rate),
    ):
        if delay > 0:
            maxlen, rcvbuf = queue_sizing(rate, reverse, delay, opts.buffer)
            dirs.append(Direction(name, ifname, queue, delay, maxlen, rcvbuf))
    rules = LinkRules(
        (
            (opts.up_if, opts.up_queue, opts.up_delay > 0),
            (opts.down_if, opts.down_queue, opts.down_delay > 0),
        ),
        opts.loss,
    )
    installed = False
    try:
        with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
            for d in dirs:
                d.open()  # bound before the rules exist: no packet meets an unbound queue
            rules.install()
            installed = True
            for line in rules.lines():
                log.info("rule: %s", line)
            for d in dirs:
                log.info(
                    "%s: %s -> queue %d, delay %.1f ms, maxlen %d, rcvbuf %d",
                    d.name,
                    d.ifname,
                    d.queue,
                    d.line.delay * 1000,
                    d.maxlen,
                    d.rcvbuf,
                )
            log.info("ready: delay line running")
            async with trio.open_nursery() as nursery:
                for d in dirs:
                    nursery.start_soon(d.run)
                if opts.stats is not None:
                    nursery.start_soon(_stats_loop, opts.stats, dirs, opts)
                async for signum in signals:
                    log.info("%s: stopping", signal.Signals(signum).name)
                    break
                nursery.cancel_scope.cancel()
    finally:
        if installed:
            try:
                LinkRules.remove()
            except Exception as e:  # on the way out: report, keep closing
                log.error("removing the link rules failed: %s", e)
        for d in dirs:
            d.flush()
            d.qs.close()
        if opts.stats is not None and dirs:
            _write_stats(opts.stats, _stats_payload(dirs, opts, running=False))


def _stats_payload(dirs: list[Direction], opts: Options, running: bool) -> dict[str, object]:
    proc = read_proc_queues()
    return {
        "pid": os.getpid(),
        "running": running,
        "loss": opts.loss,
        "directions": {d.name: d.stats(proc) for d in dirs},
    }


async def _stats_loop(path: Path, dirs: list[Direction], opts: Options) -> None:
    while True:
        _write_stats(path, _stats_payload(dirs, opts, running=True))
        await trio.sleep(1)


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m pep.lab.delayline",
        description="Delay (NFQUEUE) and random loss (-m statistic) for the lab's link node.",
    )
    p.add_argument("--up-if", required=True, help="interface uplink packets arrive on")
    p.add_argument("--down-if", required=True, help="interface downlink packets arrive on")
    p.add_argument("--delay-ms", type=float, default=0.0, help="one-way delay, both directions")
    p.add_argument("--up-delay-ms", type=float, help="uplink one-way delay (default --delay-ms)")
    p.add_argument("--down-delay-ms", type=float, help="downlink one-way delay")
    p.add_argument("--up-rate", type=int, default=0, help="uplink bit/s (0 = unlimited)")
    p.add_argument("--down-rate", type=int, default=0, help="downlink bit/s (0 = unlimited)")
    p.add_argument("--buffer-ms", type=float, default=0.0, help="tbf queue behind, in ms")
    p.add_argument("--loss", type=float, default=0.0, help="drop probability per direction")
    p.add_argument("--up-queue", type=int, default=1)
    p.add_argument("--down-queue", type=int, default=2)
    p.add_argument("--stats", type=Path, help="write counters here as JSON every second")
    p.add_argument(
        "--no-realtime",
        dest="realtime",
        action="store_false",
        help="stay a normal task (default: SCHED_FIFO, see realtime())",
    )
    return p


def realtime(priority: int = 10) -> None:
    """Run as a SCHED_FIFO task: the delay line's scheduling latency adds to the link's delay,
    and on a loaded 2-CPU machine a normal task waited milliseconds for a CPU (LEO RTTs came
    out 5 % long). The line sleeps between packets and never spins; the kernel's RT throttle
    (sched_rt_runtime_us) still leaves other tasks 5 % of each CPU whatever happens."""
    try:
        os.sched_setscheduler(0, os.SCHED_FIFO, os.sched_param(priority))
    except (OSError, AttributeError) as e:
        log.warning("no real-time scheduling (%s): delays may run long under CPU load", e)
    else:
        log.info("scheduling: SCHED_FIFO priority %d", priority)


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    if args.realtime:
        realtime()
    if not 0 <= args.loss < 1:
        print("delayline: --loss must be a probability in [0, 1)", file=sys.stderr)
        return 2
    opts = Options(
        up_if=args.up_if,
        down_if=args.down_if,
        up_delay=(args.delay_ms if args.up_delay_ms is None else args.up_delay_ms) / 1000,
        down_delay=(args.delay_ms if args.down_delay_ms is None else args.down_delay_ms) / 1000,
        up_rate=args.up_rate or None,
        down_rate=args.down_rate or None,
        loss=args.loss,
        buffer=args.buffer_ms / 1000,
        up_queue=args.up_queue,
        down_queue=args.down_queue,
        stats=args.stats,
    )
    try:
        trio.run(serve, opts)
    except QueueError as e:
        log.error("%s", e)
        return 1
    except KeyboardInterrupt:
        pass
    return 0


if __name__ == "__main__":
    sys.exit(main())
