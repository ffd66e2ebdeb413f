"""``pep lab bench`` workloads with the link going away: fades and handovers.

- ``fade``: a 10 MB download with no fade (the reference, same run), then the same download
  with the link faded (pep.lab.fade) for 20 s and for 60 s, starting 2 s into it, while the
  client makes a new 10 KB request every second until the link is back. Per fade, two samples:
  the download's time, and the requests' (the slowest time from the link's return to a held
  request's first byte; every one and the failures in the details).
- ``fade300``: the same with a 5-minute fade (not in the default set: 6 minutes per mode).
- ``handover``: a bulk download of what the link carries in 60 s, without handovers and with
  one 100 ms outage every 15 s (a LEO terminal's satellite handovers), as goodput.

A request that fails (reset, refused, a short body) is counted, not raised: a failure is
what the workload measures. Every byte of every completed transfer is checked (sha256).
"""

from __future__ import annotations

import math
import statistics
import time
from typing import Any

import trio

from pep.lab import objects
from pep.lab.fade import start_fade, stop_fade
from pep.lab.plan import SERVER_IP, SERVER_PORT
from pep.lab.profiles import format_size
from pep.lab.state import Lab
from pep.support.errors import describe

__all__ = ["fade", "fade300", "handover"]

SERVER = (SERVER_IP, SERVER_PORT)
DOWNLOAD = 10_000_000
REQUEST = 10_000
FADE_START = 2.0  # seconds into the download
FADES = (20.0, 60.0)
LONG_FADE = 300.0
HANDOVER = (15.0, 0.1)  # every 15 s, 100 ms down (Starlink reassigns every 15 s)
HANDOVER_SPAN = 60.0  # seconds of bulk transfer


def _sample(workload: str, case: str, mode: str, rep: int, seconds: float, drops: int,
            details: dict[str, Any]):  # type: ignore[no-untyped-def]  # fmt: skip
    from pep.lab.workloads import Sample  # (imports this module)

    return Sample(workload, case, mode, rep, seconds, drops, details)


async def _fetch_or_fail(ns: str, size: int, t_start: list[float]) -> objects.Transfer | str:
    t_start.append(time.monotonic())
    try:
        return await objects.fetch(ns, SERVER, size)
    except (OSError, objects.FetchError) as e:
        return f"{type(e).__name__}: {describe(e)}"


async def _across(lab: Lab, seconds: float) -> tuple[objects.Transfer | str, list[dict[str, Any]]]:
    """The download with a fade of ``seconds`` starting FADE_START into it, and a request a
    second while the link is down; (the download, each request's record)."""
    ns = lab.ns("client")
    download: list[objects.Transfer | str] = []
    records: list[dict[str, Any]] = []

    async def get_download() -> None:
        download.append(await _fetch_or_fail(ns, DOWNLOAD, []))

    async def request(until: float) -> None:
        started: list[float] = []
        got = await _fetch_or_fail(ns, REQUEST, started)
        if isinstance(got, str):
            records.append({"started_s": round(started[0] - until, 3), "failed": got})
            return
        first = started[0] + got.first_byte
        records.append(
            {
                "started_s": round(started[0] - until, 3),  # before the return: negative
                "first_byte_after_return_s": round(first - until, 3),
                "seconds": round(got.seconds, 3),
            }
        )

    try:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(get_download)
            await trio.sleep(FADE_START)
            until = start_fade(lab.prefix, seconds)
            while time.monotonic() < until - 0.5:
                nursery.start_soon(request, until)
                await trio.sleep(1.0)
    finally:
        stop_fade(lab.prefix)  # whatever happened, the link is up for the next case
    return download[0], records


def _requests_summary(records: list[dict[str, Any]]) -> tuple[float, dict[str, Any]]:
    waits = [r["first_byte_after_return_s"] for r in records if "first_byte_after_return_s" in r]
    failed = [r for r in records if "failed" in r]
    slowest = max(waits) if waits else math.inf
    return slowest, {
        "requests": len(records),
        "failed": len(failed),
        "median_s": round(statistics.median(waits), 4) if waits else None,
        "slowest_s": round(slowest, 4) if waits else None,
        "each": records,
    }


async def _fades(lab: Lab, mode: str, rep: int, fades: tuple[float, ...], name: str):  # type: ignore[no-untyped-def]
    out = []
    before = lab.link_drops()
    ref = await objects.fetch(lab.ns("client"), SERVER, DOWNLOAD)
    case = f"{format_size(DOWNLOAD)}, no fade"
    out.append(_sample(name, case, mode, rep, ref.seconds, lab.link_drops() - before, {}))
    await lab.settle()
    for seconds in fades:
        before = lab.link_drops()
        got, records = await _across(lab, seconds)
        drops = lab.link_drops() - before
        fade_text = f"{seconds:g} s fade"
        if isinstance(got, str):
            details: dict[str, Any] = {"failed": got, "fade_s": seconds}
            took = math.inf
        else:
            took = got.seconds
            details = {"fade_s": seconds, "over_no_fade_s": round(took - ref.seconds - seconds, 3)}
        out.append(
            _sample(name, f"{format_size(DOWNLOAD)} across a {fade_text}", mode, rep, took,
                    drops, details)
        )  # fmt: skip
        slowest, summary = _requests_summary(records)
        case = f"{format_size(REQUEST)} requests during a {fade_text}"
        out.append(_sample(name, case, mode, rep, slowest, 0, summary | {"fade_s": seconds}))
        await lab.settle()
    return out


async def fade(lab: Lab, mode: str, rep: int):  # type: ignore[no-untyped-def]
    return await _fades(lab, mode, rep, FADES, "fade")


async def fade300(lab: Lab, mode: str, rep: int):  # type: ignore[no-untyped-def]
    return await _fades(lab, mode, rep, (LONG_FADE,), "fade300")


async def handover(lab: Lab, mode: str, rep: int):  # type: ignore[no-untyped-def]
    """What the link carries in HANDOVER_SPAN seconds, fetched without and with handovers."""
    rate = lab.profile.down_bps or 100_000_000
    size = int(rate / 8 * HANDOVER_SPAN * 0.9)
    period, outage = HANDOVER
    out = []
    for with_handovers in (False, True):
        before = lab.link_drops()
        count = 0

        async def handovers() -> None:
            nonlocal count
            while True:
                await trio.sleep(period - outage)
                start_fade(lab.prefix, outage)
                count += 1
                await trio.sleep(outage)

        async with trio.open_nursery() as nursery:
            if with_handovers:
                nursery.start_soon(handovers)
            got = await objects.fetch(lab.ns("client"), SERVER, size)
            nursery.cancel_scope.cancel()
        stop_fade(lab.prefix)
        details = {
            "size": size,
            "goodput_mbit": round(got.goodput_bps / 1e6, 3),
            "handovers": count,
        }
        case = "bulk, " + (f"a {outage * 1000:g} ms handover every {period:g} s"
                           if with_handovers else "no handovers")  # fmt: skip
        out.append(_sample("handover", case, mode, rep, got.seconds, lab.link_drops() - before,
                           details))  # fmt: skip
        await lab.settle()
    return out
