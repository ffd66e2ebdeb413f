"""``pep lab fade SECONDS``: the running lab's link delivers nothing for that long, both ways.

The delay line on the link node does the dropping (pep.lab.outages); this command writes the
fade into its control file and signals it (SIGUSR1), then waits for the fade to end. Nothing in
the kernel changes (no rule, no qdisc), so nothing can be left behind: the fade ends by itself
in the delay line, and an interrupted command ends it at once (``link restored``).
"""

from __future__ import annotations

import contextlib
import os
import signal
import sys
import time

from pep.lab.build import fade_control
from pep.lab.outages import write_control
from pep.lab.plan import LabError
from pep.lab.state import Lab, not_up

__all__ = ["fade", "start_fade", "stop_fade"]

MAX_FADE = 3600.0  # seconds: a fade longer than an hour is a typo, not an experiment


def _line(prefix: str) -> tuple[Lab, int]:
    lab = Lab.load(prefix)
    if lab is None:
        raise not_up(prefix)
    info = lab.procs.get("delayline")
    if info is None or not lab.running("delayline"):
        raise LabError(
            f"lab {prefix!r} has no delay line running on its link node: no link to fade"
        )
    return lab, int(info["pid"])  # type: ignore[call-overload]


def start_fade(prefix: str, seconds: float) -> float:
    """Start a fade of ``seconds`` on lab ``prefix``; returns when it ends (monotonic)."""
    if not 0 < seconds <= MAX_FADE:
        raise LabError(f"fade of {seconds:g} s: must be more than 0 and at most {MAX_FADE:g} s")
    lab, pid = _line(prefix)
    now = time.monotonic()
    write_control(fade_control(lab), now, now + seconds)
    os.kill(pid, signal.SIGUSR1)
    return now + seconds


def stop_fade(prefix: str) -> None:
    """End a fade now (the link is up from here on)."""
    lab, pid = _line(prefix)
    now = time.monotonic()
    write_control(fade_control(lab), now, now)
    os.kill(pid, signal.SIGUSR1)


def fade(prefix: str, seconds: float, wait: bool = True) -> int:
    until = start_fade(prefix, seconds)
    print(f"lab {prefix}: link down for {seconds:g} s", file=sys.stderr, flush=True)
    if not wait:
        return 0
    try:
        while (left := until - time.monotonic()) > 0:
            time.sleep(min(left, 0.5))
    except KeyboardInterrupt:
        with contextlib.suppress(LabError, OSError):
            stop_fade(prefix)
        print(f"lab {prefix}: interrupted: link restored", file=sys.stderr)
        return 1
    print(f"lab {prefix}: link up", file=sys.stderr)
    return 0
