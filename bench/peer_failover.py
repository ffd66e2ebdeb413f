"""The far PEP killed mid-run: do new fetches still succeed, and how long do they take?

    sudo .venv/bin/python -m bench.peer_failover [--profile geo] [--fetches 3] [--json FILE]

Builds the symmetric lab with pre-connected legs ([peer]) and fetches 1 MB (a fresh connection
each, sha256-checked) in four phases, printing every time and writing them as JSON:

1. ``pooled``: both peps up, the pool full: the flow takes a pooled connection;
2. ``killed``: pepb's pep killed with SIGKILL just before: its pooled connections are reset
   by its kernel, pepa's pool finds them dead, and flows go direct (fallback) through pepb,
   which no longer splits (its rules fail open);
3. ``reference``: the same path with pepb's pep stopped cleanly and pepa's pool empty for a
   while: what a flow costs when there simply is no far PEP (the fallback's normal time);
4. ``back``: pepb's pep started again; the time until pepa's pool is full again, then fetches
   through it.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import time
from pathlib import Path

import trio

from bench.bulk import machine
from pep.lab import build as lab_mod
from pep.lab import objects
from pep.lab.plan import SERVER_IP, SERVER_PORT, LabSpec
from pep.lab.profiles import profile
from pep.lab.state import Lab
from pep.ops.status.socket import fetch as fetch_status

SIZE = 1_000_000


def fetches(lab: Lab, n: int) -> list[float]:
    async def one() -> float:
        t = await objects.fetch(lab.ns("client"), (SERVER_IP, SERVER_PORT), SIZE)
        return t.seconds

    out = []
    for _ in range(n):
        out.append(round(trio.run(one), 4))
        time.sleep(0.3 + lab.profile.rtt_ms / 1000)
    return out


def pool(lab: Lab) -> dict[str, object]:
    doc = fetch_status(str(lab.dir / "pepa.sock"))
    return doc["peer"]["pool"]  # type: ignore[no-any-return,index]


def wait_pool_full(lab: Lab, timeout: float = 60) -> float:
    t0 = time.monotonic()
    while True:
        p = pool(lab)
        if p["ready"] >= p["target"]:  # type: ignore[operator]
            return time.monotonic() - t0
        if time.monotonic() - t0 > timeout:
            raise RuntimeError(f"pool not full after {timeout} s: {p}")
        time.sleep(0.05)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--profile", default="geo")
    ap.add_argument("--fetches", type=int, default=3)
    ap.add_argument("--prefix", default="pepfail")
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()
    spec = LabSpec(profile(args.profile), prefix=args.prefix)
    lab = lab_mod.up(spec, print)
    out: dict[str, object] = {"machine": machine(), "profile": spec.profile.to_json()}
    try:
        wait_pool_full(lab)
        out["pooled"] = fetches(lab, args.fetches)
        wait_pool_full(lab)
        os.kill(int(lab.procs["pepb"]["pid"]), signal.SIGKILL)  # type: ignore[call-overload]
        lab.stop("pepb")  # reaps it
        out["killed"] = fetches(lab, args.fetches)
        out["pool_after_kill"] = pool(lab)
        time.sleep(2)
        out["reference"] = fetches(lab, args.fetches)
        t0 = time.monotonic()
        lab.launch("pepb", "pepb", lab.pep_argv("pepb"))
        lab.wait_ready("pepb", "ready:")
        out["refill_s"] = round(time.monotonic() - t0 + wait_pool_full(lab), 3)
        out["back"] = fetches(lab, args.fetches)
        out["pool_at_end"] = pool(lab)
    finally:
        lab_mod.down(spec.prefix, lab)
    for phase in ("pooled", "killed", "reference", "back"):
        print(f"{phase:>10}: {out[phase]}")
    print(f"pool full again {out['refill_s']} s after pepb's pep was started again")
    if args.json:
        args.json.write_text(json.dumps(out, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
