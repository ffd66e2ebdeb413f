"""The sharer's pure cost per tick with terminal plans: 100, 1,000 and 5,000 active link legs
over 1,000 terminals.

    .venv/bin/python -m bench.terminal_share [--legs 100,1000,5000] [--terminals 1000]

One tick of pep.link.pacer.Sharer is, for each active leg, a tcp_info read and
``ShareTable.sample``, then one ``reshare`` (the shares of all of them) and a setsockopt per
changed cap; a leg that joins between ticks takes its share at once (``wake``). This measures
the pure part (``sample`` for every leg, then ``reshare``; and one ``wake``) on a
PlanShareTable with the terminals' plans, legs spread over the terminals at random, half of
them backlogged and half below their share with measured rates that move between ticks (so
caps change and every tick recomputes them); and the same on the flat table without plans, as
the reference measured in the same run. The tcp_info reads and setsockopts are the namespace
run's (bench.terminal_legs). CPU: ``time.process_time``; per second at GEO's tick (50 ms, 20
ticks/s) and LEO's (10 ms).
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import sys
import time
from pathlib import Path

from bench.bulk import machine
from pep.link.fairshare import ShareTable
from pep.link.terminalshare import PlanShareTable

TICKS = {"geo": 0.05, "leo": 0.01}  # pep.config.link.Link.tick: RTT / 12 in [10, 50] ms


def build(legs: int, terminals: int, plans: bool, seed: int = 1) -> tuple[ShareTable, list[int]]:
    """A table with ``legs`` active flows over ``terminals`` plans (1 to 10 Mbit/s of payload,
    a 1 Gbit/s carrier): what a hub's sharer holds."""
    rng = random.Random(seed)
    caps = {f"t{i}": rng.choice((1e6, 2e6, 5e6, 10e6)) / 8 for i in range(terminals)}
    table: ShareTable = (
        PlanShareTable(1e9 / 8, 4827.0, caps) if plans else ShareTable(1e9 / 8, 4827.0)
    )
    names = list(caps)
    for fid in range(legs):
        if isinstance(table, PlanShareTable):
            table.add(fid, rng.choice(names))
        else:
            table.add(fid)
        table.wake(fid)
    table.reshare()
    return table, list(range(legs))


def one_tick(table: ShareTable, fids: list[int], tick: int, rng: random.Random) -> None:
    """Every leg sampled (half backlogged, half sending a varying rate), then one reshare."""
    for fid in fids:
        flow = table.flows[fid]
        waiting = 1 if fid % 2 else 0
        sent = flow.sent + int(rng.uniform(200, 2000))
        table.sample(fid, sent, sent + 1 + waiting, waiting, 0.05)
    table.reshare()


def measure(legs: int, terminals: int, plans: bool, ticks: int = 40) -> dict[str, float]:
    table, fids = build(legs, terminals, plans)
    rng = random.Random(2)
    costs = []
    for tick in range(ticks):
        t0 = time.process_time()
        one_tick(table, fids, tick, rng)
        costs.append(time.process_time() - t0)
    per_tick = statistics.median(costs)
    wakes = []
    for k in range(max(5, ticks)):  # a new leg joins and wakes: its share at once
        fid = legs + k
        if isinstance(table, PlanShareTable):
            table.add(fid, f"t{rng.randrange(terminals)}")
        else:
            table.add(fid)
        t0 = time.process_time()
        table.wake(fid)
        wakes.append(time.process_time() - t0)
        table.remove(fid)
    reshare = []
    for _ in range(max(5, ticks // 4)):
        table.dirty = True
        t0 = time.process_time()
        table.reshare()
        reshare.append(time.process_time() - t0)
    return {
        "legs": legs,
        "plans": plans,
        "tick_ms": round(per_tick * 1000, 3),
        "reshare_ms": round(statistics.median(reshare) * 1000, 3),
        "wake_ms": round(statistics.median(wakes) * 1000, 4),
        **{f"core_share_{k}": round(per_tick / t, 4) for k, t in TICKS.items()},
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--legs", default="100,1000,5000")
    ap.add_argument("--terminals", type=int, default=1000)
    ap.add_argument("--ticks", type=int, default=40)
    ap.add_argument("--json", metavar="FILE")
    args = ap.parse_args(argv)
    rows = []
    for legs in (int(n) for n in args.legs.split(",")):
        for plans in (True, False):
            row = measure(legs, args.terminals, plans, args.ticks)
            rows.append(row)
            what = f"{args.terminals} terminals' plans" if plans else "no plans (flat)"
            print(
                f"{legs:>6} active legs, {what:<24}: {row['tick_ms']:>8.3f} ms per tick "
                f"(reshare {row['reshare_ms']:.3f} ms, a leg waking {row['wake_ms']:.3f} ms); "
                f"{row['core_share_geo']:.1%} of a core "
                f"at GEO's 20 ticks/s, {row['core_share_leo']:.1%} at LEO's 100"
            )
    if args.json:
        Path(args.json).write_text(json.dumps({"rows": rows, "machine": machine()}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
