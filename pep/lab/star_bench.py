"""What ``pep lab bench --topology star`` measures: a hub's terminals sharing one carrier.

One star lab (pep.lab.star), each workload with pep (the hub's, and the terminals' own unless
``--terminal-pep no``) and without (every pep stopped: routed end to end through the same
modem), alternating per repetition; every object checked byte for byte (pep.lab.objects), the
drops of each terminal's queue at the modem read around each case:

- ``neighbours``: t1 fetches 6 x 1 MB while t2 fetches one 2 MB object, all at once: t2's
  time, t1's makespan (the issue's case: with one max-min share over all flows, t2's one flow
  got a seventh of the carrier and t1's six overfilled its plan);
- ``oversubscribed``: four terminals each fetch 3 x 5 MB at once, their plans together twice
  the carrier: each terminal's goodput (its 15 MB over the time its last flow took), the
  spread between them, against each one's weighted part of the carrier in payload;
- ``planchange``: t1 fetches 20 MB; 8 s in, its downlink plan is halved (at the modem and in
  the hub's plans file, SIGHUP): its rate before and after, and how long after the change the
  rate settles (every 0.5 s window within 10 % of the new plan's payload rate from then on),
  and how soon the hub's pep holds t1's legs to the new plan (its pep status).
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import statistics
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import trio

from pep.lab import objects
from pep.lab.bench import Progress, machine
from pep.lab.plan import SERVER_PORT, LabSpec
from pep.lab.profiles import MSS, WIRE_PACKET
from pep.lab.star import SERVER_IP, Plan
from pep.lab.star_build import change_plan, plans_of, queue_drops
from pep.lab.state import Lab

__all__ = ["MODES", "WORKLOADS", "StarRun", "run"]

SERVER = (SERVER_IP, SERVER_PORT)
MODES = ("without", "with")
NEIGHBOUR_FLOWS, NEIGHBOUR_SIZE, NEIGHBOUR_BIG = 6, 1_000_000, 2_000_000
OVERSUBSCRIBED, OVER_FLOWS, OVER_SIZE = 4, 3, 5_000_000
CHANGE_SIZE, CHANGE_AT = 20_000_000, 8.0
WINDOW, WITHIN = 0.5, 0.10  # planchange: the rate's window, and how close to the plan


def payload(bps: float) -> float:
    """The payload rate a link of ``bps`` carries in full-sized frames (what a download gets)."""
    return bps * MSS / WIRE_PACKET


async def _flows(jobs: list[tuple[str, int]], lab: Lab) -> list[float]:
    """Fetch each (client node, size) at once; each one's time from the common start."""
    done = [0.0] * len(jobs)
    t0 = time.monotonic()

    async def one(i: int, node: str, size: int) -> None:
        await objects.fetch(lab.ns(node), SERVER, size)
        done[i] = time.monotonic() - t0

    async with trio.open_nursery() as n:
        for i, (node, size) in enumerate(jobs):
            n.start_soon(one, i, node, size)
    return done


async def neighbours(lab: Lab) -> dict[str, Any]:
    jobs = [("c1", NEIGHBOUR_SIZE)] * NEIGHBOUR_FLOWS + [("c2", NEIGHBOUR_BIG)]
    times = await _flows(jobs, lab)
    return {"t2_s": round(times[-1], 4), "t1_makespan_s": round(max(times[:-1]), 4),
            "t1_flows_s": [round(t, 4) for t in times[:-1]]}  # fmt: skip


async def oversubscribed(lab: Lab) -> dict[str, Any]:
    plans = plans_of(lab)[:OVERSUBSCRIBED]
    names = [f"t{i}" for i in range(1, len(plans) + 1)]
    jobs = [(f"c{i}", OVER_SIZE) for i in range(1, len(plans) + 1) for _ in range(OVER_FLOWS)]
    times = await _flows(jobs, lab)
    carrier = lab.profile.down_bps or 0
    total = sum(p.down for p in plans)
    out: dict[str, Any] = {"goodput_mbit": {}, "share_mbit": {}, "done_s": {}}
    for k, name in enumerate(names):
        done = max(times[k * OVER_FLOWS : (k + 1) * OVER_FLOWS])
        out["done_s"][name] = round(done, 4)
        out["goodput_mbit"][name] = round(OVER_FLOWS * OVER_SIZE * 8 / done / 1e6, 3)
        share = min(plans[k].down, carrier * plans[k].down / total)
        out["share_mbit"][name] = round(payload(share) / 1e6, 3)
    goodputs = list(out["goodput_mbit"].values())
    out["spread"] = round((max(goodputs) - min(goodputs)) / statistics.mean(goodputs), 4)
    out["worst_vs_share"] = round(
        max(abs(g / out["share_mbit"][n] - 1) for n, g in out["goodput_mbit"].items()), 4
    )
    return out


def rate_between(samples: list[tuple[float, int]], a: float, b: float) -> float:
    """Bytes/s received between ``a`` and ``b`` seconds (from the progress samples)."""

    def at(t: float) -> int:
        got = 0
        for ts, n in samples:
            if ts > t:
                break
            got = n
        return got

    return (at(b) - at(a)) / (b - a) if b > a else 0.0


def settled_after(
    samples: list[tuple[float, int]], start: float, end: float, target: float
) -> float | None:
    """Seconds after ``start`` from which every WINDOW-long window up to ``end`` carries
    ``target`` bytes/s within WITHIN; None when it never does."""
    step = 0.05
    t = end - WINDOW
    last_bad = None
    while t >= start:
        if abs(rate_between(samples, t, t + WINDOW) / target - 1) > WITHIN:
            last_bad = t
            break
        t -= step
    if last_bad is None:
        return 0.0
    settle = last_bad + step - start
    return round(settle, 3) if last_bad + step + WINDOW <= end else None


async def planchange(lab: Lab) -> dict[str, Any]:
    original = plans_of(lab)[0]
    halved = Plan(original.down // 2, original.up)
    changed: list[float] = []
    followed: list[float | None] = []
    t0 = time.monotonic()

    async def change() -> None:
        await trio.sleep(CHANGE_AT)
        changed.append(time.monotonic() - t0)
        await trio.to_thread.run_sync(change_plan, lab, 1, halved)
        if lab.running("hub"):
            followed.append(await caps_follow(lab, "t1", halved.down, changed[0] + t0))

    try:
        async with trio.open_nursery() as n:
            n.start_soon(change)
            transfer = await objects.fetch(lab.ns("c1"), SERVER, CHANGE_SIZE)
            n.cancel_scope.cancel()
    finally:
        change_plan(lab, 1, original)
    if not changed:
        return {"seconds": round(transfer.seconds, 4), "changed_at_s": None}
    tc, end = changed[0], transfer.seconds
    target = payload(halved.down) / 8
    return {
        "seconds": round(transfer.seconds, 4),
        "changed_at_s": round(tc, 3),
        "before_mbit": round(rate_between(transfer.samples, tc - 3, tc) * 8 / 1e6, 3),
        "after_mbit": round(rate_between(transfer.samples, tc + 1, end) * 8 / 1e6, 3),
        "plan_before_mbit": round(payload(original.down) / 1e6, 3),
        "plan_after_mbit": round(payload(halved.down) / 1e6, 3),
        "settled_after_s": settled_after(transfer.samples, tc, end, target),
        "caps_followed_s": followed[0] if followed else None,
    }


async def caps_follow(lab: Lab, terminal: str, plan: int, since: float) -> float | None:
    """Seconds from ``since`` until the hub's pep holds ``terminal``'s legs to the new plan:
    their caps together within 2 % of its payload rate (pep status, every 20 ms, up to 3 s)."""
    from pep.ops.status.socket import StatusError, fetch

    want = payload(plan)
    deadline = since + 3.0
    while time.monotonic() < deadline:
        try:
            doc = await trio.to_thread.run_sync(fetch, str(lab.dir / "hub.sock"))
        except StatusError:
            doc = {}
        for row in (doc.get("link") or {}).get("terminals", []):
            if row["name"] == terminal and row["legs_active"] and row["share_bps"] <= want * 1.02:
                return round(time.monotonic() - since, 3)
        await trio.sleep(0.02)
    return None


WORKLOADS: dict[str, Callable[[Lab], Awaitable[dict[str, Any]]]] = {
    "neighbours": neighbours,
    "oversubscribed": oversubscribed,
    "planchange": planchange,
}


@dataclass
class StarRun:
    spec: LabSpec
    workloads: list[str]
    reps: int
    cases: list[dict[str, Any]] = field(default_factory=list)  # one per workload, mode, rep
    date: str = ""
    elapsed: float = 0.0

    def median(self, workload: str, mode: str, get: Callable[[dict[str, Any]], float]) -> float:
        values = [get(c) for c in self.cases if c["workload"] == workload and c["mode"] == mode]
        return statistics.median(values) if values else float("nan")

    def to_json(self) -> dict[str, Any]:
        return {
            "date": self.date,
            "machine": machine(),
            "profile": self.spec.profile.to_json(),
            "description": self.spec.profile.describe(),
            "topology": "star",
            "plans": [[p.down, p.up] for p in self.spec.plans],
            "terminal_pep": self.spec.terminal_pep,
            "workloads": self.workloads,
            "reps": self.reps,
            "elapsed_s": round(self.elapsed, 1),
            "cases": self.cases,
        }


def run(
    spec: LabSpec,
    workloads: list[str],
    reps: int = 3,
    timeout: float = 300.0,
    progress: Progress | None = None,
) -> StarRun:
    """Build the star lab, measure every workload in both modes ``reps`` times, tear down."""
    from pep.lab import build as lab_mod

    p = progress or Progress()
    t0 = time.monotonic()
    result = StarRun(
        spec, workloads, reps, date=dt.datetime.now(dt.UTC).isoformat(timespec="seconds")
    )
    lab = lab_mod.up(spec, p.say)
    try:
        result.spec = dataclasses.replace(spec, plans=plans_of(lab))
        for rep in range(reps):
            for mode in MODES[:: -1 if rep % 2 else 1]:
                lab.set_split(mode == "with")
                for name in workloads:
                    if name == "oversubscribed" and len(plans_of(lab)) < OVERSUBSCRIBED:
                        continue
                    before = queue_drops(lab)
                    figures = trio.run(_timed, WORKLOADS[name], lab, timeout)
                    after = queue_drops(lab)
                    drops = {t: after[t] - before[t] for t in after}
                    case = {"workload": name, "mode": mode, "rep": rep, **figures, "drops": drops}
                    result.cases.append(case)
                    p.say(f"{name}, {mode} pep (rep {rep + 1}/{reps}): {_short(case)}")
                    trio.run(lab.settle)
    finally:
        p.say("tearing down the lab")
        lab_mod.down(spec.prefix, lab)
    result.elapsed = time.monotonic() - t0
    return result


async def _timed(
    body: Callable[[Lab], Awaitable[dict[str, Any]]], lab: Lab, timeout: float
) -> dict[str, Any]:
    with trio.fail_after(timeout):
        return await body(lab)


def _short(case: dict[str, Any]) -> str:
    drops = "/".join(str(v) for v in case["drops"].values())
    if case["workload"] == "neighbours":
        text = f"t2 {case['t2_s']:.2f} s, t1 makespan {case['t1_makespan_s']:.2f} s"
    elif case["workload"] == "oversubscribed":
        text = ", ".join(f"{t} {g:.2f}" for t, g in case["goodput_mbit"].items()) + " Mbit/s"
        text += f", spread {case['spread']:.1%}"
    else:
        text = (
            f"{case.get('before_mbit', 0):.2f} -> {case.get('after_mbit', 0):.2f} Mbit/s, "
            f"settled after {case.get('settled_after_s')} s"
        )
    return f"{text}; queue drops {drops}"
