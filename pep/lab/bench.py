"""The with/without-PEP comparison behind ``pep lab demo`` and ``pep lab bench``.

One lab, one link, one run: every workload (pep.lab.workloads) is measured with pep splitting
(pep running on the PEP nodes) and without (pep stopped with SIGTERM, which removes its rules,
so the same connections are routed end to end through the same link), alternating the two per
repetition so a slow drift of the machine cannot favour one. Every byte is checked (sha256).
A workload that needs loss runs in a second lab built with it. The results (``BenchRun``: every
measurement, their medians) are drawn as tables, a JSON record and a PNG chart by
pep.lab.report.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import functools
import os
import platform
import statistics
import sys
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any, TextIO

import trio

from pep.lab import build as lab_mod
from pep.lab import workloads as wl
from pep.lab.plan import LabSpec
from pep.lab.state import Lab

__all__ = ["BenchRun", "Progress", "Row", "Summary", "run", "selected"]

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
