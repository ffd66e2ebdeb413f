"""When the lab's link delivers nothing: fades and handovers, as a pure schedule.

A satellite link goes away: a Ka-band rain fade for seconds to minutes, a LEO terminal for tens
to hundreds of milliseconds at every handover (Starlink reassigns every 15 s). The delay line
(pep.lab.delayline) asks ``Outages.down(now)`` for every packet it takes in and every batch it
releases: a packet that enters the link, or would leave it, while the link is down is dropped,
both directions, as a faded carrier loses what is in the air.

- a *fade* (``pep lab fade SECONDS``): one window, set on the running line through its control
  file (``read_control``/``write_control``: a JSON object with the monotonic time it ends;
  CLOCK_MONOTONIC is one clock for every process of a boot). A new fade replaces the old one,
  and one ending at 0 ends it at once (an interrupted ``pep lab fade`` restores the link).
- *handovers* (``--handover 15s/100ms``): every ``period`` seconds the link is down for
  ``outage`` seconds, counted from when the line started.
"""

from __future__ import annotations

import json
import math
import os
import re
from dataclasses import dataclass
from pathlib import Path

from pep.config import units
from pep.support.errors import describe

__all__ = ["Handover", "Outages", "parse_handover", "read_control", "write_control"]


@dataclass(frozen=True, slots=True)
class Handover:
    """Every ``period`` seconds, ``outage`` seconds with nothing delivered."""

    period: float
    outage: float

    def text(self) -> str:
        return f"{units.format_duration(self.period)}/{units.format_duration(self.outage)}"


def parse_handover(text: str) -> Handover:
    """``15s/100ms`` -> Handover(15.0, 0.1); a bare number is seconds for the period and
    milliseconds for the outage, as an operator says it ("every 15, for 100")."""
    m = re.fullmatch(r"\s*([^/\s]+)\s*/\s*([^/\s]+)\s*", text or "")
    if not m:
        raise ValueError("must be PERIOD/OUTAGE, e.g. 15s/100ms")
    try:
        period = units.parse_duration(m.group(1), "s")
        outage = units.parse_duration(m.group(2), "ms")
    except ValueError as e:
        raise ValueError(f"must be PERIOD/OUTAGE, e.g. 15s/100ms ({describe(e)})") from None
    if not (0 < outage < period):
        raise ValueError("the outage must be longer than 0 and shorter than the period")
    return Handover(period, outage)


@dataclass(slots=True)
class Outages:
    """The link's outages: the current fade (until ``fade_until``) and the handovers (from
    ``origin``). Pure: the caller gives the time."""

    handover: Handover | None = None
    origin: float = 0.0
    fade_until: float = -math.inf
    fade_from: float = -math.inf

    def fade(self, start: float, until: float) -> None:
        self.fade_from, self.fade_until = start, until

    def down(self, now: float) -> bool:
        if self.fade_from <= now < self.fade_until:
            return True
        h = self.handover
        if h is None or now < self.origin:
            return False
        return (now - self.origin) % h.period >= h.period - h.outage


def write_control(path: Path, start: float, until: float) -> None:
    """Tell the line about a fade (``until`` <= ``start``: none), atomically."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps({"start": start, "until": until}))
    os.replace(tmp, path)


def read_control(path: Path) -> tuple[float, float] | None:
    """(start, until) of the fade the control file asks for; None when there is none or it
    cannot be read (the line keeps what it has)."""
    try:
        data = json.loads(path.read_text())
        return float(data["start"]), float(data["until"])
    except (OSError, ValueError, KeyError, TypeError):
        return None
