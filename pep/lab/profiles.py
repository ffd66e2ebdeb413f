"""Link profiles and the parsers for the lab's command-line values (sans-IO, unit-tested).

Units follow what a satellite operator's data sheet says: RTT in milliseconds, rates in Mbit/s
(10^6 bit/s, as tc counts them), loss in percent per direction, object sizes in decimal units
(1 MB = 10^6 bytes; ``MiB`` and ``KiB`` are accepted for binary sizes).
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, replace

from pep.config import units
from pep.support.errors import describe

__all__ = [
    "MSS",
    "PROFILES",
    "LinkProfile",
    "ParseError",
    "format_size",
    "parse_loss",
    "parse_rate",
    "parse_rtt",
    "parse_sizes",
    "profile",
]

# A 1500-byte MTU less 20 bytes of IPv4 header, 20 of TCP header and 12 of timestamps option.
MSS = 1448
WIRE_PACKET = 1514  # what tbf counts for one full-sized segment: the Ethernet frame
MAX_SIZE = 10 * 1000**3


class ParseError(ValueError):
    """A command-line value that does not parse; ``str()`` names the value and what is allowed."""


@dataclass(frozen=True, slots=True)
class LinkProfile:
    """One emulated link. ``None`` rates mean "not limited"; ``loss`` is a fraction, applied
    independently to each direction (uplink = client to server, downlink = server to client)."""

    name: str
    rtt_ms: float
    down_bps: int | None
    up_bps: int | None
    loss: float = 0.0
    # Bottleneck buffer (the tbf queue) in ms at the link rate; None: one RTT, i.e. one BDP.
    queue_ms: float | None = None
    # LEO handovers: every handover[0] seconds the link delivers nothing for handover[1]
    # (pep.lab.outages); None: no handovers.
    handover: tuple[float, float] | None = None

    @property
    def one_way_s(self) -> float:
        return self.rtt_ms / 2000

    @property
    def queue_s(self) -> float:
        return (self.rtt_ms if self.queue_ms is None else self.queue_ms) / 1000

    def rate(self, direction: str) -> int | None:
        return self.down_bps if direction == "down" else self.up_bps

    def bdp_bytes(self, direction: str) -> int | None:
        """Bytes in flight that fill this direction for one RTT; None when the rate is
        unlimited or there is no delay (nothing to size for)."""
        rate = self.rate(direction)
        if rate is None or self.rtt_ms <= 0:
            return None
        return int(rate * self.rtt_ms / 1000 / 8)

    def bdp_packets(self, direction: str) -> int | None:
        bdp = self.bdp_bytes(direction)
        return None if bdp is None else math.ceil(bdp / MSS)

    def tbf(self, direction: str) -> dict[str, int] | None:
        """tbf parameters for this direction's egress, or None when the rate is unlimited.

        The bucket holds 2 ms of data (at least 4000 bytes, what DESIGN.md checked at
        20 Mbit/s): enough for the timer's granularity, small enough that the rate holds over
        any interval a TCP sender notices. The queue holds one bandwidth-delay product by
        default (the classic buffer rule of thumb, and what a satellite modem provides), or
        ``queue_ms`` at the link rate; at least 64 KiB. One BDP lets the one-BDP initial window
        of a PEP through without a drop.
        """
        rate = self.rate(direction)
        if rate is None:
            return None
        rate_bytes = rate // 8
        burst = max(4000, rate_bytes * 2 // 1000)
        queue = max(64 * 1024, int(rate_bytes * self.queue_s))
        return {"rate": rate_bytes, "burst": burst, "limit": queue + burst}

    def with_overrides(
        self,
        rtt_ms: float | None = None,
        down_bps: int | None = None,
        up_bps: int | None = None,
        loss: float | None = None,
        queue_ms: float | None = None,
        handover: tuple[float, float] | None = None,
    ) -> LinkProfile:
        changes: dict[str, object] = {}
        if handover is not None:
            changes["handover"] = handover
        if rtt_ms is not None:
            changes["rtt_ms"] = rtt_ms
        if down_bps is not None:
            changes["down_bps"] = down_bps or None  # 0 = unlimited
        if up_bps is not None:
            changes["up_bps"] = up_bps or None
        if loss is not None:
            changes["loss"] = loss
        if queue_ms is not None:
            changes["queue_ms"] = queue_ms
        return replace(self, **changes) if changes else self  # type: ignore[arg-type]

    def describe(self) -> str:
        def rate(bps: int | None) -> str:
            return "unlimited" if bps is None else f"{bps / 1e6:g} Mbit/s"

        queue = "" if self.queue_ms is None else f", {self.queue_ms:g} ms queue"
        if self.handover is not None:
            period, outage = self.handover
            queue += f", a {outage * 1000:g} ms handover every {period:g} s"
        return (
            f"{self.name.upper()}: {self.rtt_ms:g} ms RTT, {rate(self.down_bps)} down, "
            f"{rate(self.up_bps)} up, {self.loss * 100:g} % loss{queue}"
        )

    def to_json(self) -> dict[str, object]:
        return {
            "name": self.name,
            "rtt_ms": self.rtt_ms,
            "down_bps": self.down_bps,
            "up_bps": self.up_bps,
            "loss": self.loss,
            "queue_ms": self.queue_ms,
            "handover": list(self.handover) if self.handover is not None else None,
        }

    @classmethod
    def from_json(cls, d: dict[str, object]) -> LinkProfile:
        return cls(
            name=str(d["name"]),
            rtt_ms=float(d["rtt_ms"]),  # type: ignore[arg-type]
            down_bps=None if d["down_bps"] is None else int(d["down_bps"]),  # type: ignore[call-overload]
            up_bps=None if d["up_bps"] is None else int(d["up_bps"]),  # type: ignore[call-overload]
            loss=float(d.get("loss", 0.0)),  # type: ignore[arg-type]
            queue_ms=None if d.get("queue_ms") is None else float(d["queue_ms"]),  # type: ignore[arg-type]
            handover=_handover_json(d.get("handover")),
        )


# The profiles: GEO as in DESIGN.md (a consumer Ka-band service), MEO and LEO typical
# of O3b-class and Starlink-class services; LAN is the control with no impairment at all.
PROFILES: dict[str, LinkProfile] = {
    "geo": LinkProfile("geo", 600, 20_000_000, 5_000_000),
    "meo": LinkProfile("meo", 150, 50_000_000, 20_000_000),
    "leo": LinkProfile("leo", 40, 100_000_000, 20_000_000),
    "lan": LinkProfile("lan", 0, None, None),
}


def _handover_json(value: object) -> tuple[float, float] | None:
    if not isinstance(value, list | tuple) or len(value) != 2:
        return None
    return float(value[0]), float(value[1])


def parse_handover(text: str) -> tuple[float, float]:
    """``15s/100ms`` -> (15.0, 0.1): the handover period and outage, in seconds."""
    from pep.lab.outages import parse_handover as parse

    try:
        h = parse(text)
    except ValueError as e:
        raise ParseError(f"handover {text!r}: {describe(e)}") from None
    return h.period, h.outage


def profile(name: str) -> LinkProfile:
    try:
        return PROFILES[name.lower()]
    except KeyError:
        raise ParseError(f"unknown profile {name!r} (choose from {', '.join(PROFILES)})") from None


_NUM = r"(\d+(?:\.\d*)?|\.\d+)"


def parse_rtt(text: str) -> float:
    """``600``, ``600ms``, ``0.6s`` -> milliseconds (a bare number is milliseconds)."""
    try:
        value = units.parse_duration(text, default_unit="ms") * 1000
    except ValueError:
        raise ParseError(
            f"RTT {text!r}: expected milliseconds such as 600, 600ms or 0.6s"
        ) from None
    if value > 60_000:
        raise ParseError(f"RTT {text!r}: at most 60 s")
    return value


def parse_rate(text: str) -> int:
    """``20``, ``20mbit``, ``20M``, ``512kbit``, ``1gbit`` -> bit/s; a bare number is Mbit/s.
    ``0`` (or ``none``/``unlimited``) means not limited and returns 0."""
    if text.strip().lower() in ("none", "unlimited"):
        return 0
    try:
        bps = units.parse_rate(text, default_unit="mbit")
    except ValueError:
        raise ParseError(
            f"rate {text!r}: expected Mbit/s such as 20, 20mbit, 512kbit or 1gbit"
        ) from None
    if bps and not 8_000 <= bps <= 40_000_000_000:
        raise ParseError(f"rate {text!r}: must be 0 (unlimited) or between 8 kbit/s and 40 Gbit/s")
    return bps


def parse_loss(text: str) -> float:
    """``0.5`` or ``0.5%`` -> 0.005: percent of packets dropped in each direction."""
    m = re.fullmatch(_NUM + r"\s*%?", text.strip())
    if not m:
        raise ParseError(f"loss {text!r}: expected a percentage such as 0.5 or 0.5%")
    pct = float(m.group(1))
    if pct >= 100:
        raise ParseError(f"loss {text!r}: must be below 100 %")
    return pct / 100


_SIZE_UNITS = {"": 1, "b": 1, "k": 1000, "kb": 1000, "m": 1000**2, "mb": 1000**2}
_SIZE_UNITS |= {"g": 1000**3, "gb": 1000**3, "kib": 1024, "mib": 1024**2, "gib": 1024**3}


def parse_sizes(text: str) -> list[int]:
    """``100k,1M,10M`` -> [100000, 1000000, 10000000] (decimal; ``KiB``/``MiB`` binary)."""
    out = []
    for item in text.split(","):
        m = re.fullmatch(_NUM + r"\s*([a-z]*)", item.strip().lower())
        if not m or m.group(2) not in _SIZE_UNITS:
            raise ParseError(
                f"size {item.strip()!r}: expected bytes such as 100k, 1M, 10MB or 1MiB"
            )
        n = round(float(m.group(1)) * _SIZE_UNITS[m.group(2)])
        if not 1 <= n <= MAX_SIZE:
            raise ParseError(f"size {item.strip()!r}: must be between 1 byte and 10 GB")
        out.append(n)
    if len(set(out)) != len(out):
        raise ParseError(f"sizes {text!r}: a size is listed twice")
    return out


def format_size(n: int) -> str:
    """The inverse of parse_sizes for table rows: 100000 -> '100 KB', 1048576 -> '1 MiB'."""
    for unit, factor in (("GB", 1000**3), ("MB", 1000**2), ("KB", 1000)):
        if n >= factor and n % (factor // 100) == 0:
            return f"{n / factor:g} {unit}"
    for unit, factor in (("GiB", 1024**3), ("MiB", 1024**2), ("KiB", 1024)):
        if n >= factor and n % factor == 0:
            return f"{n // factor} {unit}"
    return f"{n} B"
