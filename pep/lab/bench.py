"""The with/without-PEP comparison behind ``pep lab demo`` and ``pep lab bench``.

One lab, one link, one run: every workload (pep.lab.workloads) is measured with pep splitting
(pep running on the PEP nodes) and without (pep stopped with SIGTERM, which removes its rules,
so the same connections are routed end to end through the same link), alternating the two per
repetition so a slow drift of the machine cannot favour one. Every byte is checked (sha256).
A workload that needs loss runs in a second lab built with it. Results: tables, a JSON record
with every measurement, and a PNG chart.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import functools
import json
import os
import platform
import re
import statistics
import sys
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TextIO

import trio

from pep.lab import build as lab_mod
from pep.lab import workloads as wl
from pep.lab.plan import LabSpec
from pep.lab.profiles import format_size
from pep.lab.state import Lab

__all__ = [
    "BenchRun",
    "Progress",
    "Row",
    "chart",
    "format_summary",
    "format_table",
    "parse_table",
    "run",
]

MODES = ("without", "with")
# "without": pep stopped (routed end to end); "direct": pep splitting, but without the
# pre-connected legs ([peer]); "with": pep as the lab runs it (with them, when it has them).
ALL_MODES = ("without", "direct", "with")
LABELS = {"without": "without PEP", "direct": "PEP, direct legs", "with": "with PEP"}


@dataclass
class Row:
    """One single-fetch size: median seconds without and with pep (and ``direct``)."""

    size: int
    without_s: float
    with_s: float
    direct_s: float | None = None

    @property
    def speedup(self) -> float:
        return self.without_s / self.with_s if self.with_s > 0 else 0.0

    def goodput_mbit(self, mode: str) -> float:
        seconds = self.with_s if mode == "with" else self.without_s
        return self.size * 8 / seconds / 1e6


@dataclass
class Summary:
    """One case of one workload: medians over the repetitions, per mode."""

    workload: str
    case: str
    seconds: dict[str, float]
    slowest: dict[str, float]
    drops: dict[str, float]
    details: dict[str, list[dict[str, Any]]]

    @property
    def ratio(self) -> float:
        return self.seconds["without"] / self.seconds["with"] if self.seconds["with"] else 0.0


@dataclass
class BenchRun:
    profile: Any  # LinkProfile
    topology: str
    workloads: list[str]
    reps: int
    samples: list[wl.Sample] = field(default_factory=list)
    modes: tuple[str, ...] = MODES
    congestion: str | None = None
    date: str = ""
    elapsed: float = 0.0

    def cases(self) -> list[tuple[str, str]]:
        """(workload, case) in the order they were measured."""
        seen: dict[tuple[str, str], None] = {}
        for s in self.samples:
            seen.setdefault((s.workload, s.case), None)
        return list(seen)

    def summaries(self) -> list[Summary]:
        """Median of the repetitions per case and mode (robust to one slow outlier)."""
        out = []
        for workload, case in self.cases():
            mine = [s for s in self.samples if (s.workload, s.case) == (workload, case)]
            by_mode = {m: [s for s in mine if s.mode == m] for m in self.modes}
            if not all(by_mode.values()):
                continue

            def med(values: Iterable[float]) -> float:
                return statistics.median(list(values))

            out.append(
                Summary(
                    workload,
                    case,
                    {m: med(s.seconds for s in v) for m, v in by_mode.items()},
                    {
                        m: med(s.details.get("slowest_s", s.seconds) for s in v)
                        for m, v in by_mode.items()
                    },
                    {m: med(s.drops for s in v) for m, v in by_mode.items()},
                    {m: [s.details for s in v] for m, v in by_mode.items()},
                )
            )
        return out

    def rows(self) -> list[Row]:
        """The single-fetch sizes, for the demo's table."""
        out = []
        for s in self.summaries():
            if s.workload == "single":
                size = next(x.details["size"] for x in self.samples if x.case == s.case)
                out.append(
                    Row(size, s.seconds["without"], s.seconds["with"], s.seconds.get("direct"))
                )
        return out

    def trace(self, mode: str) -> list[tuple[float, int]]:
        """Progress samples of the largest single fetch's first repetition."""
        singles = [s for s in self.samples if s.workload == "single" and s.mode == mode]
        if not singles:
            return []
        biggest = max(s.details["size"] for s in singles)
        return next(s.trace for s in singles if s.details["size"] == biggest)

    def to_json(self) -> dict[str, object]:
        return {
            "date": self.date,
            "machine": machine(),
            "profile": self.profile.to_json(),
            "description": self.profile.describe(),
            "topology": self.topology,
            "congestion": self.congestion,
            "workloads": self.workloads,
            "reps": self.reps,
            "elapsed_s": round(self.elapsed, 1),
            "modes": list(self.modes),
            "summary": [
                {
                    "workload": s.workload,
                    "case": s.case,
                    "ratio": round(s.ratio, 3),
                    **{f"{m}_s": round(s.seconds[m], 4) for m in self.modes},
                    **{f"slowest_{m}_s": round(s.slowest[m], 4) for m in self.modes},
                    **{f"drops_{m}": s.drops[m] for m in self.modes},
                }
                for s in self.summaries()
            ],
            "measurements": [
                {
                    "workload": s.workload,
                    "case": s.case,
                    "mode": s.mode,
                    "rep": s.rep,
                    "seconds": round(s.seconds, 4),
                    "drops": s.drops,
                    **s.details,
                }
                for s in self.samples
            ],
            "trace": {mode: self.trace(mode) for mode in self.modes},
        }


def machine() -> dict[str, object]:
    return {"nproc": os.cpu_count(), "kernel": platform.release(), "arch": platform.machine()}


class Progress:
    """Progress on stderr: one line per step."""

    def __init__(self, stream: TextIO | None = None) -> None:
        self.stream = stream if stream is not None else sys.stderr
        self.t0 = time.monotonic()

    def say(self, msg: str) -> None:
        print(f"[{time.monotonic() - self.t0:5.1f}s] {msg}", file=self.stream, flush=True)


def selected(
    names: list[str], sizes: list[int] | None = None, parallel: tuple[int, ...] | None = None
) -> list[wl.Workload]:
    """The named workloads; ``sizes`` replaces the single fetches' sizes, ``parallel`` the
    numbers of parallel downloads."""
    out = []
    for name in names:
        w = wl.WORKLOADS[name]
        if name == "single" and sizes:
            w = dataclasses.replace(w, run=functools.partial(wl.single, sizes=sizes))
        if name == "parallel" and parallel:
            w = dataclasses.replace(w, run=functools.partial(wl.parallel, counts=parallel))
        out.append(w)
    return out


def run(
    spec: LabSpec,
    workloads: list[wl.Workload],
    reps: int = 1,
    timeout: float = 300.0,
    progress: Progress | None = None,
    modes: tuple[str, ...] = MODES,
) -> BenchRun:
    """Build the lab(s), measure, tear down (also on failure or Ctrl-C). The modes' order
    turns round every repetition, so a slow drift of the machine cannot favour one."""
    p = progress or Progress()
    t0 = time.monotonic()
    result = BenchRun(
        spec.profile,
        spec.topology,
        [w.name for w in workloads],
        reps,
        modes=modes,
        date=dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
    )
    variants: dict[float, list[wl.Workload]] = {}
    for w in workloads:
        variants.setdefault(w.loss or spec.profile.loss, []).append(w)
    for loss, group in variants.items():
        variant = dataclasses.replace(spec, profile=spec.profile.with_overrides(loss=loss))
        lab = lab_mod.up(variant, p.say)
        try:
            result.congestion = lab.congestion
            for rep in range(reps):
                for mode in modes[:: -1 if rep % 2 else 1]:
                    p.say(f"{LABELS[mode]} (rep {rep + 1}/{reps})")
                    lab.set_split(mode != "without", direct=mode == "direct")
                    for w in group:
                        samples = trio.run(_timed, w, lab, mode, rep, timeout)
                        for s in samples:
                            result.samples.append(s)
                            p.say(f"{s.workload} {s.case}, {LABELS[mode]}: {_describe(s)}")
        finally:
            p.say("tearing down the lab")
            lab_mod.down(variant.prefix, lab)
    result.elapsed = time.monotonic() - t0
    return result


async def _timed(w: wl.Workload, lab: Lab, mode: str, rep: int, timeout: float) -> list[wl.Sample]:
    with trio.fail_after(timeout):
        return await w.run(lab, mode, rep)


def _describe(s: wl.Sample) -> str:
    text = f"{s.seconds:.2f} s"
    if "slowest_s" in s.details:
        text += f" (median {s.details['median_s']:.2f}, slowest {s.details['slowest_s']:.2f})"
    if "download_s" in s.details:
        text += f", download {s.details['download_s']:.1f} s"
    return text + f", {s.drops} link drops, sha256 ok"


# --------------------------------------------------------------------------------------------
# tables


_ROW = re.compile(
    r"^(?P<size>\S+ [KMG]?i?B)\s+(?P<without>[\d.]+) s\s+(?:(?P<direct>[\d.]+) s\s+)?"
    r"(?P<with>[\d.]+) s\s+(?P<speedup>[\d.]+)x\s+(?P<gw>[\d.]+) Mbit/s\s+(?P<gp>[\d.]+) Mbit/s$"
)


def format_table(rows: list[Row]) -> str:
    """The single fetches (the demo's table); with a "PEP direct" column when measured."""
    direct = any(r.direct_s is not None for r in rows)
    lines = [
        f"{'size':<10}{'without PEP':>13}"
        + (f"{'PEP direct':>12}" if direct else "")
        + f"{'with PEP':>11}{'speedup':>9}{'goodput without':>18}{'goodput with':>15}"
    ]
    for r in rows:
        lines.append(
            f"{format_size(r.size):<10}{r.without_s:>11.2f} s"
            + (f"{r.direct_s or 0:>10.2f} s" if direct else "")
            + f"{r.with_s:>9.2f} s{r.speedup:>8.1f}x{r.goodput_mbit('without'):>11.2f} Mbit/s"
            f"{r.goodput_mbit('with'):>8.2f} Mbit/s"
        )
    return "\n".join(lines)


def parse_table(text: str) -> list[dict[str, object]]:
    """Rows of a printed single-fetch table (for tests and scripts)."""
    out: list[dict[str, object]] = []
    for line in text.splitlines():
        m = _ROW.match(line.strip())
        if m:
            out.append(
                {
                    "size": m["size"],
                    "without_s": float(m["without"]),
                    "direct_s": float(m["direct"]) if m["direct"] else None,
                    "with_s": float(m["with"]),
                    "speedup": float(m["speedup"]),
                    "goodput_without_mbit": float(m["gw"]),
                    "goodput_with_mbit": float(m["gp"]),
                }
            )
    return out


_SHORT = {"without": "w/o", "direct": "direct", "with": "with"}


def format_summary(summaries: list[Summary]) -> str:
    """Every case: medians per mode, the ratio without/with, the slowest flow and the link's
    drops per mode."""
    if not summaries:
        return ""
    modes = list(summaries[0].seconds)
    head = f"{'case':<40}" + "".join(f"{_SHORT[m]:>9}" for m in modes) + f"{'ratio':>7}"
    head += "".join(f"{'slowest ' + _SHORT[m]:>15}" for m in modes)
    head += "".join(f"{'drops ' + _SHORT[m]:>13}" for m in modes)
    lines = [head]
    for s in summaries:
        line = f"{s.case:<40}" + "".join(f"{s.seconds[m]:>7.2f} s" for m in modes)
        line += f"{s.ratio:>6.2f}x" + "".join(f"{s.slowest[m]:>13.2f} s" for m in modes)
        line += "".join(f"{s.drops[m]:>13g}" for m in modes)
        lines.append(line)
    return "\n".join(lines)


# --------------------------------------------------------------------------------------------
# chart


def chart(result: BenchRun, path: Path) -> None:
    """Seconds per case, with and without pep (bars); bytes over time for the largest single
    fetch (lines)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    summaries = result.summaries()
    colors = {"without": "#9a9a9a", "direct": "#9ecae1", "with": "#1f77b4"}
    labels = LABELS
    modes = result.modes
    traces = {mode: result.trace(mode) for mode in modes}
    wide = max(6.0, 1.1 * len(summaries))
    if any(traces.values()):
        fig, (bars, lines) = plt.subplots(
            1, 2, figsize=(wide + 6, 4.8), gridspec_kw={"width_ratios": [wide, 6]}
        )
    else:
        fig, bars = plt.subplots(1, 1, figsize=(wide, 4.8))
        lines = None
    width = 0.76 / len(modes)
    xs = range(len(summaries))
    for k, mode in enumerate(modes):
        values = [s.seconds[mode] for s in summaries]
        pos = [x + (k - (len(modes) - 1) / 2) * width for x in xs]
        drawn = bars.bar(pos, values, width, color=colors[mode], label=labels[mode])
        bars.bar_label(drawn, labels=[f"{v:.2f}" for v in values], fontsize=7, padding=2)
    top = max((max(s.seconds.values()) for s in summaries), default=1.0)
    bars.set_ylim(0, top * 1.3)
    bars.set_xticks(list(xs), [f"{_short(s.case)}\n{s.ratio:.1f}x" for s in summaries], fontsize=7)
    bars.set_ylabel("seconds (median), lower is better")
    bars.set_title("Completion time per workload (x: how much faster with pep)")
    bars.legend(loc="upper left", ncol=2)
    if lines is not None:
        for mode, trace in traces.items():
            if trace:
                t, b = zip(*trace, strict=True)
                lines.plot(t, [x / 1e6 for x in b], color=colors[mode], label=labels[mode], lw=2)
        size = format_size(max(r.size for r in result.rows()))
        lines.set_xlabel("time since connect() (s)")
        lines.set_ylabel("MB received")
        lines.set_title(f"Bytes received over time, {size} fetch")
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


def _short(case: str) -> str:
    return case.replace(" objects, ", " obj/\n").replace(" during ", "\nduring ")


def write_json(result: BenchRun, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result.to_json(), indent=1))
