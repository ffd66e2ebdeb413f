"""The lab's link: a userspace delay line on NFQUEUE, plus the link's random-loss rules.

This kernel has no netem (nor fq/etf for timestamp-based delay, see DESIGN.md), so delay is
made here: the link namespace's FORWARD chain queues every packet, one queue per direction
(queues are FIFO, and a VERDICT_BATCH releases every id up to the one it names, so one batch
verdict per wake-up releases exactly the packets that are due). Each packet id is held for the
one-way delay of its direction. Rate (tbf) is applied by the kernel after this, on egress.

Split as elsewhere in pep: :class:`pep.lab.delay_schedule.DelayLine` is the pure scheduling
core (arrivals in, batch verdicts out, no clock of its own), :mod:`pep.lab.link_rules` the
netfilter rules (loss, then the queues), and this module the IO runner: :class:`Direction`
is the trio shell around one :class:`pep.capture.nfq_socket.QueueSocket` with its timerfd, and
:func:`main` the process (the stats file; its timer and SCHED_FIFO are :mod:`pep.lab.timing`).
Run as its own process inside the link namespace::

    ip netns exec LAB-link python -m pep.lab.delayline --up-if cl0 --down-if sv0 \
        --delay-ms 300 --up-rate 5000000 --down-rate 20000000 --loss 0.005 --stats FILE \
        [--handover 15s/100ms] [--control FILE]

Outages (pep.lab.outages): while the link is down, a packet entering it gets a DROP verdict of
its own at once, and the due packets leave with a DROP batch instead of an ACCEPT one. A fade
is asked for through the control file and SIGUSR1 (``pep lab fade``); handovers repeat by
themselves.

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
import os
import signal
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import trio

from pep.capture import nfq_codec as nfq
from pep.capture import nfq_proc
from pep.capture.nfq_socket import QueueError, QueueSocket
from pep.lab.delay_schedule import DelayLine, Lateness, queue_sizing
from pep.lab.link_rules import LinkRules
from pep.lab.outages import Handover, Outages, parse_handover, read_control
from pep.lab.timing import Timer, realtime
from pep.ops.entry import exit_code
from pep.support.errors import describe

__all__ = ["Direction", "main", "read_proc_queues", "serve"]

log = logging.getLogger("pep.lab.delayline")

# Batch widening (DelayLine.slack), seconds. 0: with the timerfd and the learned lead, each
# wake-up releases what is due and no packet leaves early; an experiment may trade accuracy
# for fewer wake-ups with PEP_LAB_SLACK=0.0005 (read when the line starts, not at import).
SLACK_ENV = "PEP_LAB_SLACK"


def slack() -> float:
    return float(os.environ.get(SLACK_ENV, "0"))


def read_proc_queues(path: str = nfq_proc.NFQUEUE_PROC) -> dict[int, dict[str, int]]:
    """This namespace's nfnetlink_queue counters (pep.capture.nfq_proc) by queue number, under the
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
        self,
        name: str,
        ifname: str,
        queue: int,
        delay: float,
        maxlen: int,
        rcvbuf: int,
        outages: Outages | None = None,
    ) -> None:
        self.name, self.ifname, self.queue = name, ifname, queue
        self.outages = outages if outages is not None else Outages()
        self.outage_drops = 0  # packets dropped because the link was down
        self.maxlen, self.rcvbuf = maxlen, rcvbuf
        self.line = DelayLine(delay, slack=slack())
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
            down = self.outages.down(time.monotonic())
            dropped: list[bytes] = []
            for msg in messages:
                if type(msg) is nfq.Packet:
                    if down:  # it enters a link that is not there: lost
                        dropped.append(nfq.build_verdict(self.queue, msg.packet_id, nfq.NF_DROP))
                        continue
                    line.arrive(msg.packet_id, now)
                elif isinstance(msg, nfq.Malformed):
                    self.malformed += 1
                    if msg.packet_id is not None:  # still needs its verdict
                        line.arrive(msg.packet_id, now)
                elif isinstance(msg, nfq.Ack) and msg.errno:
                    self.verdict_errors += 1
                    if self.verdict_errors <= 5:
                        log.warning("%s: verdict refused: %s", self.name, os.strerror(msg.errno))
            if dropped:
                self.outage_drops += len(dropped)
                await self.qs.send(b"".join(dropped))
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
                due = len(line)
                last = line.release(now)
                if last is not None:
                    verdict = nfq.NF_ACCEPT
                    if self.outages.down(time.monotonic()):  # it would leave a faded link
                        verdict = nfq.NF_DROP
                        self.outage_drops += due - len(line)
                    await self.qs.send(nfq.build_verdict_batch(self.queue, last, verdict))
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
            "outage_drops": self.outage_drops,
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
    handover: Handover | None = None
    control: Path | None = None  # where `pep lab fade` asks for a fade (then SIGUSR1)


def _write_stats(path: Path, payload: dict[str, object]) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(payload, indent=1))
    tmp.replace(path)


async def serve(opts: Options) -> None:
    """Bind the queues, install the rules, delay until SIGTERM/SIGINT, then undo both."""
    dirs: list[Direction] = []
    outages = Outages(opts.handover, origin=time.monotonic())
    for name, ifname, queue, delay, rate, reverse in (
        ("up", opts.up_if, opts.up_queue, opts.up_delay, opts.up_rate, opts.down_rate),
        ("down", opts.down_if, opts.down_queue, opts.down_delay, opts.down_rate, opts.up_rate),
    ):
        if delay > 0:
            maxlen, rcvbuf = queue_sizing(rate, reverse, delay, opts.buffer)
            dirs.append(Direction(name, ifname, queue, delay, maxlen, rcvbuf, outages))
    rules = LinkRules(
        (
            (opts.up_if, opts.up_queue, opts.up_delay > 0),
            (opts.down_if, opts.down_queue, opts.down_delay > 0),
        ),
        opts.loss,
    )
    installed = False
    try:
        stop = (signal.SIGTERM, signal.SIGINT)
        with trio.open_signal_receiver(*stop, signal.SIGUSR1) as signals:
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
            if opts.handover is not None:
                log.info("handovers: every %s", opts.handover.text())
            log.info("ready: delay line running")
            async with trio.open_nursery() as nursery:
                for d in dirs:
                    nursery.start_soon(d.run)
                if opts.stats is not None:
                    nursery.start_soon(_stats_loop, opts.stats, dirs, opts)
                async for signum in signals:
                    if signum == signal.SIGUSR1:
                        _fade(outages, opts.control)
                        continue
                    log.info("%s: stopping", signal.Signals(signum).name)
                    break
                nursery.cancel_scope.cancel()
    finally:
        if installed:
            try:
                LinkRules.remove()
            except Exception as e:  # on the way out: report, keep closing
                log.error("removing the link rules failed: %s", describe(e))
        for d in dirs:
            d.flush()
            d.qs.close()
        if opts.stats is not None and dirs:
            _write_stats(opts.stats, _stats_payload(dirs, opts, running=False))


def _fade(outages: Outages, control: Path | None) -> None:
    """SIGUSR1: take the fade the control file asks for (none: the link is back at once)."""
    asked = read_control(control) if control is not None else None
    start, until = asked if asked is not None else (0.0, 0.0)
    outages.fade(start, until)
    left = until - time.monotonic()
    if left > 0:
        log.info("fade: the link delivers nothing for %.3f s", left)
    else:
        log.info("fade: none (the link is up)")


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
        "--handover",
        type=parse_handover,
        metavar="PERIOD/OUTAGE",
        help="every PERIOD the link delivers nothing for OUTAGE, e.g. 15s/100ms",
    )
    p.add_argument(
        "--control", type=Path, help="the fade control file, read on SIGUSR1 (pep lab fade)"
    )
    p.add_argument(
        "--no-realtime",
        dest="realtime",
        action="store_false",
        help="stay a normal task (default: SCHED_FIFO, see pep.lab.timing.realtime)",
    )
    return p


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
        handover=args.handover,
        control=args.control,
    )
    return exit_code(lambda: trio.run(serve, opts), (QueueError,), lambda e: log.error("%s", e))


if __name__ == "__main__":
    sys.exit(main())
