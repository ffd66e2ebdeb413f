"""``pep lab bench --topology star``: the command, and its figures as a table and as JSON.

pep.lab.star_bench runs the workloads and keeps every case; this module reads that record: the
medians per mode (``format_run``), the JSON with every case (``write_json``), and ``command``,
what the ``pep lab`` command line calls.
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

from pep.lab import star_bench
from pep.lab.profiles import LinkProfile, ParseError
from pep.lab.star_bench import MODES, OVERSUBSCRIBED, StarRun

__all__ = ["command", "format_run", "write_json"]


def command(args: argparse.Namespace, profile: LinkProfile, reps: int) -> int:
    """Build the star lab the options describe, measure, print the table (and ``--json``)."""
    from pep.lab.bench import Progress
    from pep.lab.plan import LabError, LabSpec
    from pep.lab.star import spec_fields

    if args.lab_command != "bench":
        raise LabError("--topology star: `pep lab bench` (or `up`) only")
    names = [n.strip() for n in (args.workloads or ",".join(star_bench.WORKLOADS)).split(",")]
    names = [n for n in names if n]
    unknown = [n for n in names if n not in star_bench.WORKLOADS]
    if unknown or not names:
        raise ParseError(
            f"--workloads {args.workloads!r}: choose from {', '.join(star_bench.WORKLOADS)}"
        )
    fields = spec_fields(args, profile, 4)
    spec = LabSpec(profile, "star", True, args.prefix, peer=not args.no_peer, **fields)  # type: ignore[arg-type]
    progress = Progress()
    result = star_bench.run(spec, names, reps, args.timeout, progress)
    print(format_run(result))
    if getattr(args, "json", None):
        write_json(result, args.json)
        print(f"json: {args.json}")
    progress.say(f"done in {result.elapsed:.0f} s")
    return 0


def format_run(r: StarRun) -> str:
    """The figures, medians over the repetitions, without and with pep."""
    lines = [
        f"{r.spec.profile.describe()}, star of {len(r.spec.plans)} terminals (plans "
        + ", ".join(p.text() for p in r.spec.plans)
        + f"), terminal peps {'yes' if r.spec.terminal_pep else 'no'}"
        + (f", median of {r.reps}" if r.reps > 1 else ""),
        f"{'figure':<52}{'without pep':>14}{'with pep':>12}",
    ]

    def row(label: str, workload: str, get: Callable[[dict[str, Any]], float], unit: str) -> None:
        a, b = (r.median(workload, m, get) for m in MODES)
        lines.append(f"{label:<52}{a:>11.2f} {unit:<2}{b:>9.2f} {unit}")

    if "neighbours" in r.workloads:
        row("neighbours: t2's 2 MB", "neighbours", lambda c: c["t2_s"], "s")
        row("neighbours: t1's 6 x 1 MB, makespan", "neighbours", lambda c: c["t1_makespan_s"], "s")
        for t in ("t1", "t2"):
            row(
                f"neighbours: drops at {t}'s plan queue",
                "neighbours",
                lambda c, t=t: c["drops"][t],
                "",
            )
    if any(c["workload"] == "oversubscribed" for c in r.cases):
        names = [f"t{i}" for i in range(1, OVERSUBSCRIBED + 1)]
        share = next(c for c in r.cases if c["workload"] == "oversubscribed")["share_mbit"]
        for t in names:
            row(f"oversubscribed: {t}'s goodput (share {share[t]:.2f} Mbit/s)", "oversubscribed",
                lambda c, t=t: c["goodput_mbit"][t], "Mb")  # fmt: skip
        row(
            "oversubscribed: spread (max - min) / mean, %",
            "oversubscribed",
            lambda c: c["spread"] * 100,
            "",
        )
        row(
            "oversubscribed: drops at the plan queues",
            "oversubscribed",
            lambda c: sum(c["drops"].values()),
            "",
        )
    if "planchange" in r.workloads:
        row(
            "plan change: t1's rate before (Mbit/s)",
            "planchange",
            lambda c: c.get("before_mbit", 0),
            "",
        )
        row(
            "plan change: t1's rate after (from 1 s on)",
            "planchange",
            lambda c: c.get("after_mbit", 0),
            "",
        )
        row("plan change: settled within 10 % after (s)", "planchange", _settled, "s")
        row("plan change: hub's caps at the new plan after (s)", "planchange", _followed, "s")
        row("plan change: drops at t1's plan queue", "planchange", lambda c: c["drops"]["t1"], "")
    return "\n".join(lines)


def _settled(case: dict[str, Any]) -> float:
    """A case's settling time; never settled counts as infinitely long."""
    value = case.get("settled_after_s")
    return float("inf") if value is None else float(value)


def _followed(case: dict[str, Any]) -> float:
    value = case.get("caps_followed_s")
    return float("nan") if value is None else float(value)


def write_json(r: StarRun, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(r.to_json(), indent=1))
