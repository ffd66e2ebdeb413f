"""The with/without-PEP comparison behind ``pep lab demo`` and ``pep lab bench``.

One lab, one link, one run: every size is fetched with pep splitting (pep running on the PEP
nodes) and without (pep stopped with SIGTERM, which removes its rules, so the same
connections are routed end to end through the same link). Each fetch is a fresh connection,
checked byte for byte (sha256). Results: a table, a JSON record and a PNG chart.
"""

from __future__ import annotations

import datetime as dt
import json
import os
import platform
import re
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TextIO

import trio

from pep.lab import lab as lab_mod
from pep.lab import objects
from pep.lab.profiles import LinkProfile, format_size

__all__ = ["BenchRun", "Measurement", "Progress", "chart", "format_table", "parse_table", "run"]

MODES = ("without", "with")


@dataclass
class Measurement:
    size: int
    mode: str  # "with" | "without" (PEP)
    rep: int
    seconds: float
    first_byte: float
    samples: list[tuple[float, int]] = field(default_factory=list)

    @property
    def goodput_bps(self) -> float:
        return self.size * 8 / self.seconds


@dataclass
class Row:
    size: int
    without_s: float
    with_s: float

    @property
    def speedup(self) -> float:
        return self.without_s / self.with_s if self.with_s > 0 else 0.0

    def goodput_mbit(self, mode: str) -> float:
        seconds = self.with_s if mode == "with" else self.without_s
        return self.size * 8 / seconds / 1e6


@dataclass
class BenchRun:
    profile: LinkProfile
    topology: str
    sizes: list[int]
    reps: int
    measurements: list[Measurement] = field(default_factory=list)
    congestion: str | None = None
    date: str = ""
    elapsed: float = 0.0

    def rows(self) -> list[Row]:
        """Median of the repetitions per size and mode (robust to one slow outlier)."""
        out = []
        for size in self.sizes:
            t = {
                mode: statistics.median(
                    m.seconds for m in self.measurements if m.size == size and m.mode == mode
                )
                for mode in MODES
            }
            out.append(Row(size, t["without"], t["with"]))
        return out

    def trace(self, mode: str) -> list[tuple[float, int]]:
        """Progress samples of the largest size's first repetition."""
        size = max(self.sizes)
        for m in self.measurements:
            if m.size == size and m.mode == mode:
                return m.samples
        return []

    def to_json(self) -> dict[str, object]:
        return {
            "date": self.date,
            "machine": machine(),
            "profile": self.profile.to_json(),
            "description": self.profile.describe(),
            "topology": self.topology,
            "congestion": self.congestion,
            "sizes": self.sizes,
            "reps": self.reps,
            "elapsed_s": round(self.elapsed, 1),
            "summary": [
                {
                    "size": r.size,
                    "without_s": round(r.without_s, 4),
                    "with_s": round(r.with_s, 4),
                    "speedup": round(r.speedup, 3),
                    "goodput_without_mbit": round(r.goodput_mbit("without"), 3),
                    "goodput_with_mbit": round(r.goodput_mbit("with"), 3),
                }
                for r in self.rows()
            ],
            "measurements": [
                {
                    "size": m.size,
                    "mode": m.mode,
                    "rep": m.rep,
                    "seconds": round(m.seconds, 4),
                    "first_byte_s": round(m.first_byte, 4),
                }
                for m in self.measurements
            ],
            "trace": {mode: self.trace(mode) for mode in MODES},
        }


def machine() -> dict[str, object]:
    return {"nproc": os.cpu_count(), "kernel": platform.release(), "arch": platform.machine()}


class Progress:
    """Progress on stderr: one line per step, and a live byte counter when it is a terminal."""

    def __init__(self, stream: TextIO | None = None) -> None:
        self.stream = stream if stream is not None else sys.stderr
        self.live = self.stream.isatty()
        self.t0 = time.monotonic()
        self._last = 0.0

    def say(self, msg: str) -> None:
        self._clear()
        print(f"[{time.monotonic() - self.t0:5.1f}s] {msg}", file=self.stream, flush=True)

    def bytes_cb(self, label: str, size: int) -> Callable[[int, float], None] | None:
        if not self.live:
            return None

        def update(got: int, elapsed: float) -> None:
            now = time.monotonic()
            if now - self._last < 0.1 and got < size:
                return
            self._last = now
            pct = 100 * got / size
            text = f"        {label}: {got / 1e6:7.2f} MB {pct:5.1f} %  {elapsed:6.2f} s"
            print("\r" + text, end="", file=self.stream, flush=True)

        return update

    def _clear(self) -> None:
        if self.live:
            print("\r\033[K", end="", file=self.stream, flush=True)


def run(
    spec: lab_mod.LabSpec,
    sizes: list[int],
    reps: int = 1,
    timeout: float = 300.0,
    progress: Progress | None = None,
) -> BenchRun:
    """Build the lab, measure, tear down (also on failure or Ctrl-C)."""
    p = progress or Progress()
    t0 = time.monotonic()
    result = BenchRun(
        spec.profile,
        spec.topology,
        list(sizes),
        reps,
        date=dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
    )
    lab = lab_mod.up(spec, p.say)
    try:
        result.congestion = lab.congestion
        pause = 0.3 + spec.profile.rtt_ms / 1000  # let the last FIN/ACKs cross the link
        for rep in range(reps):
            for mode in ("with", "without"):
                p.say(
                    f"pep {'on' if mode == 'with' else 'off'}"
                    + (f" (rep {rep + 1}/{reps})" if reps > 1 else "")
                )
                lab.set_split(mode == "with")
                for size in sizes:
                    label = f"{format_size(size)} {mode} PEP"
                    t = trio.run(_fetch, lab, size, timeout, p.bytes_cb(label, size))
                    m = Measurement(size, mode, rep, t.seconds, t.first_byte, t.samples)
                    result.measurements.append(m)
                    p.say(
                        f"{label}: {t.seconds:.2f} s ({m.goodput_bps / 1e6:.2f} Mbit/s), sha256 ok"
                    )
                    time.sleep(pause)
    finally:
        p.say("tearing down the lab")
        lab_mod.down(spec.prefix, lab)
    result.elapsed = time.monotonic() - t0
    return result


async def _fetch(
    lab: lab_mod.Lab, size: int, timeout: float, cb: Callable[[int, float], None] | None
) -> objects.Transfer:
    with trio.fail_after(timeout):
        return await objects.fetch(
            lab.ns("client"), (lab_mod.SERVER_IP, lab_mod.SERVER_PORT), size, cb
        )


# --------------------------------------------------------------------------------------------
# table


_HEADER = (
    f"{'size':<10}{'without PEP':>13}{'with PEP':>11}{'speedup':>9}"
    f"{'goodput without':>18}{'goodput with':>15}"
)
_ROW = re.compile(
    r"^(?P<size>\S+ [KMG]?i?B)\s+(?P<without>[\d.]+) s\s+(?P<with>[\d.]+) s\s+"
    r"(?P<speedup>[\d.]+)x\s+(?P<gw>[\d.]+) Mbit/s\s+(?P<gp>[\d.]+) Mbit/s$"
)


def format_table(rows: list[Row]) -> str:
    lines = [_HEADER]
    for r in rows:
        lines.append(
            f"{format_size(r.size):<10}{r.without_s:>11.2f} s{r.with_s:>9.2f} s"
            f"{r.speedup:>8.1f}x{r.goodput_mbit('without'):>11.2f} Mbit/s"
            f"{r.goodput_mbit('with'):>8.2f} Mbit/s"
        )
    return "\n".join(lines)


def parse_table(text: str) -> list[dict[str, object]]:
    """Rows of a printed table (for tests and scripts): size text, seconds, speedup."""
    out: list[dict[str, object]] = []
    for line in text.splitlines():
        m = _ROW.match(line.strip())
        if m:
            out.append(
                {
                    "size": m["size"],
                    "without_s": float(m["without"]),
                    "with_s": float(m["with"]),
                    "speedup": float(m["speedup"]),
                    "goodput_without_mbit": float(m["gw"]),
                    "goodput_with_mbit": float(m["gp"]),
                }
            )
    return out


# --------------------------------------------------------------------------------------------
# chart


def chart(result: BenchRun, path: Path) -> None:
    """Completion time per size (bars) and bytes over time for the largest size (lines)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = result.rows()
    colors = {"without": "#9a9a9a", "with": "#1f77b4"}
    labels = {"without": "without PEP", "with": "with PEP"}
    fig, (bars, lines) = plt.subplots(1, 2, figsize=(12, 4.8))
    width = 0.38
    xs = range(len(rows))
    for k, mode in enumerate(MODES):
        values = [r.without_s if mode == "without" else r.with_s for r in rows]
        pos = [x + (k - 0.5) * width for x in xs]
        drawn = bars.bar(pos, values, width, color=colors[mode], label=labels[mode])
        bars.bar_label(drawn, labels=[f"{v:.2f} s" for v in values], fontsize=8, padding=2)
    top = max(max(r.without_s, r.with_s) for r in rows)
    bars.set_ylim(0, top * 1.3)  # room for the legend above the bars
    bars.set_xticks(list(xs), [f"{format_size(r.size)}\n{r.speedup:.1f}x faster" for r in rows])
    bars.set_ylabel("completion time (s), lower is better")
    bars.set_title("Fetch completion time per object size")
    bars.legend(loc="upper center", ncol=2)
    size = max(result.sizes)
    for mode in MODES:
        trace = result.trace(mode)
        if trace:
            t, b = zip(*trace, strict=True)
            lines.plot(t, [x / 1e6 for x in b], color=colors[mode], label=labels[mode], lw=2)
    lines.set_xlabel("time since connect() (s)")
    lines.set_ylabel("MB received")
    lines.set_title(f"Bytes received over time, {format_size(size)} fetch")
    lines.grid(alpha=0.3)
    lines.legend(loc="lower right")
    cc = f", link leg {result.congestion}" if result.congestion else ""
    fig.suptitle(
        f"pep lab, {result.topology} — {result.profile.describe()}{cc}\n"
        f"{result.date[:10]}, {machine()['nproc']} CPUs, Linux {machine()['kernel']}",
        fontsize=10,
    )
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write_json(result: BenchRun, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result.to_json(), indent=1))
