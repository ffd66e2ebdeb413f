"""What keeps the delay line's delays exact: a timer finer than trio's, and a CPU when it fires.

Both were measured on this 2-CPU machine, where the line's lateness adds to the emulated link's
delay: trio's own sleep woke 0.8 ms late in the median (``Timer``), and under load a normal task
waited milliseconds for a CPU (``realtime``).
"""

from __future__ import annotations

import logging
import os

import trio

from pep.support.errors import describe

__all__ = ["Timer", "realtime"]

log = logging.getLogger("pep.lab.delayline")


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


def realtime(priority: int = 10) -> None:
    """Run as a SCHED_FIFO task: the delay line's scheduling latency adds to the link's delay,
    and on a loaded 2-CPU machine a normal task waited milliseconds for a CPU (LEO RTTs came
    out 5 % long). The line sleeps between packets and never spins; the kernel's RT throttle
    (sched_rt_runtime_us) still leaves other tasks 5 % of each CPU whatever happens."""
    try:
        os.sched_setscheduler(0, os.SCHED_FIFO, os.sched_param(priority))
    except (OSError, AttributeError) as e:
        log.warning("no real-time scheduling (%s): delays may run long under CPU load", describe(e))
    else:
        log.info("scheduling: SCHED_FIFO priority %d", priority)
