"""What a ``pep lab bench`` run shows: the tables it prints, its JSON record and its chart.

Drawn from the results pep.lab.bench collects (``BenchRun``); ``parse_table`` reads a printed
single-fetch table back, for the tests and scripts that check what the demo printed.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

from pep.lab.bench import LABELS, BenchRun, Row, Summary, machine
from pep.lab.profiles import format_size

__all__ = ["chart", "format_summary", "format_table", "parse_table", "write_json"]


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
