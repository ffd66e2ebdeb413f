"""What ``pep lab bench`` measures: the traffic of a satellite terminal, not one fetch alone.

Each workload runs against a built lab in one mode (pep on or off) and returns one ``Sample``
per case: the figure a user feels (``seconds``) and the details behind it. Every object is
checked byte for byte (pep.lab.objects raises on a short or wrong body), so no workload times
corrupt data. The link's drop counters are read around each case: drops are the symptom of
flows overfilling the modem queue.

- ``single``: one object per size on a fresh connection (today's demo);
- ``parallel``: N downloads of 1 MB started at once (a household, a download manager);
- ``upload``: 6 uploads of 1 MB at once over the uplink;
- ``page``: a web page: one HTML document, then 40 objects of 5-200 KB over 6 persistent
  HTTP/1.1 connections, as a browser fetches it;
- ``interactive``: 10 small requests (10 KB, one after another, a new connection each) on the
  idle link, then again while a 50 MB download runs;
- ``loss``: a 10 MB fetch over the link with 0.5 % random loss each way (its own lab);
- ``https``: TLS 1.3 fetches of 100 KB and 1 MB on fresh connections (the certificate checked);
- ``idle``: 1 MB after the lab sat idle for two minutes (the pre-connected legs idle that
  long: their first flight must still be a whole initial window). Not in the default set.
- ``fade``, ``fade300``, ``handover``: the link going away (pep.lab.outage_workloads). Not in
  the default set.
"""

from __future__ import annotations

import random
import statistics
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import trio

from pep.lab import objects
from pep.lab import outage_workloads as outages
from pep.lab.plan import SERVER_IP, SERVER_PORT, TLS_CERT, TLS_PORT
from pep.lab.profiles import format_size
from pep.lab.state import Lab

__all__ = ["WORKLOADS", "Sample", "Workload", "page_objects"]

SERVER = (SERVER_IP, SERVER_PORT)
PARALLEL = (1, 3, 6, 20)
PARALLEL_SIZE = 1_000_000
UPLOADS, UPLOAD_SIZE = 6, 1_000_000
PAGE_HTML, PAGE_OBJECTS, PAGE_CONNECTIONS = 30_000, 40, 6  # a browser's six per host
SMALL, SMALLS, BIG = 10_000, 10, 50_000_000
LOSS = 0.005


@dataclass
class Sample:
    """One case of one workload in one mode."""

    workload: str
    case: str
    mode: str
    rep: int
    seconds: float  # the figure the comparison uses
    drops: int = 0  # link tbf drops during the case (both directions)
    details: dict[str, Any] = field(default_factory=dict)
    trace: list[tuple[float, int]] = field(default_factory=list)


@dataclass(frozen=True)
class Workload:
    name: str
    title: str
    run: Callable[[Lab, str, int], Awaitable[list[Sample]]]
    loss: float = 0.0  # run in a lab with this much loss (the profile's otherwise)


def page_objects() -> list[int]:
    """The page's 40 object sizes: log-uniform in 5-200 KB, the same every run."""
    rng = random.Random(40)
    return [round(5_000 * (40 ** rng.random())) for _ in range(PAGE_OBJECTS)]


async def _measured(
    lab: Lab,
    workload: str,
    case: str,
    mode: str,
    rep: int,
    body: Callable[[], Awaitable[tuple[float, dict[str, Any], list[tuple[float, int]]]]],
) -> Sample:
    before = lab.link_drops()
    seconds, details, trace = await body()
    return Sample(workload, case, mode, rep, seconds, lab.link_drops() - before, details, trace)


async def _together(n: int, one: Callable[[], Awaitable[objects.Transfer]]) -> list[float]:
    """Start ``n`` transfers at once; each one's completion time from the common start."""
    done = [0.0] * n
    t0 = time.monotonic()

    async def run(i: int) -> None:
        await one()
        done[i] = time.monotonic() - t0

    async with trio.open_nursery() as nursery:
        for i in range(n):
            nursery.start_soon(run, i)
    return done


def _spread(times: list[float]) -> dict[str, Any]:
    return {
        "median_s": round(statistics.median(times), 4),
        "slowest_s": round(max(times), 4),
        "flows_s": [round(t, 4) for t in times],
    }


async def single(lab: Lab, mode: str, rep: int, sizes: list[int]) -> list[Sample]:
    out = []
    for size in sizes:

        async def body(size: int = size) -> tuple[float, dict[str, Any], list[tuple[float, int]]]:
            t = await objects.fetch(lab.ns("client"), SERVER, size)
            return t.seconds, {"size": size, "first_byte_s": round(t.first_byte, 4)}, t.samples

        out.append(await _measured(lab, "single", format_size(size), mode, rep, body))
        await lab.settle()
    return out


async def parallel(lab: Lab, mode: str, rep: int, counts: tuple[int, ...] = PARALLEL):
    out = []
    for n in counts:

        async def body(n: int = n) -> tuple[float, dict[str, Any], list[tuple[float, int]]]:
            times = await _together(
                n, lambda: objects.fetch(lab.ns("client"), SERVER, PARALLEL_SIZE)
            )
            return max(times), _spread(times), []

        case = f"{n} x {format_size(PARALLEL_SIZE)}"
        out.append(await _measured(lab, "parallel", case, mode, rep, body))
        await lab.settle()
    return out


async def upload(lab: Lab, mode: str, rep: int) -> list[Sample]:
    async def body() -> tuple[float, dict[str, Any], list[tuple[float, int]]]:
        times = await _together(
            UPLOADS, lambda: objects.upload(lab.ns("client"), SERVER, UPLOAD_SIZE)
        )
        return max(times), _spread(times), []

    case = f"{UPLOADS} x {format_size(UPLOAD_SIZE)} up"
    sample = await _measured(lab, "upload", case, mode, rep, body)
    await lab.settle()
    return [sample]


async def page(lab: Lab, mode: str, rep: int) -> list[Sample]:
    """The HTML on the first connection; once it is in, the objects over six connections
    (the first one reused), each taking the next object as soon as its last one is in."""

    async def body() -> tuple[float, dict[str, Any], list[tuple[float, int]]]:
        t0 = time.monotonic()
        sessions = [await objects.Session.open(lab.ns("client"), SERVER)]
        try:
            await sessions[0].get(PAGE_HTML)
            html = time.monotonic() - t0
            queue = list(reversed(page_objects()))

            async def worker(session: objects.Session | None) -> None:
                if session is None:
                    session = await objects.Session.open(lab.ns("client"), SERVER)
                    sessions.append(session)
                while queue:
                    await session.get(queue.pop())

            async with trio.open_nursery() as nursery:
                nursery.start_soon(worker, sessions[0])
                for _ in range(PAGE_CONNECTIONS - 1):
                    nursery.start_soon(worker, None)
            seconds = time.monotonic() - t0
        finally:
            for s in sessions:
                s.close()
        total = PAGE_HTML + sum(page_objects())
        return seconds, {"html_s": round(html, 4), "bytes": total}, []

    case = f"page: {PAGE_OBJECTS} objects, {PAGE_CONNECTIONS} connections"
    sample = await _measured(lab, "page", case, mode, rep, body)
    await lab.settle()
    return [sample]


async def interactive(lab: Lab, mode: str, rep: int) -> list[Sample]:
    """Ten small requests on the idle link, then ten during a 50 MB download: how long a
    click waits while someone else downloads."""

    async def smalls() -> list[float]:
        out = []
        for _ in range(SMALLS):
            t = await objects.fetch(lab.ns("client"), SERVER, SMALL)
            out.append(t.seconds)
            await trio.sleep(0.2)  # a user's pause between clicks
        return out

    async def idle() -> tuple[float, dict[str, Any], list[tuple[float, int]]]:
        times = await smalls()
        return statistics.median(times), _spread(times), []

    async def loaded() -> tuple[float, dict[str, Any], list[tuple[float, int]]]:
        big: list[objects.Transfer] = []
        times: list[float] = []

        async def download() -> None:
            big.append(await objects.fetch(lab.ns("client"), SERVER, BIG))

        async with trio.open_nursery() as nursery:
            nursery.start_soon(download)
            await trio.sleep(2.0)  # the download is past its start-up
            times = await smalls()
        details = _spread(times) | {"download_s": round(big[0].seconds, 4)}
        return statistics.median(times), details, []

    out = [await _measured(lab, "interactive", f"{format_size(SMALL)} idle", mode, rep, idle)]
    await lab.settle()
    case = f"{format_size(SMALL)} during {format_size(BIG)}"
    out.append(await _measured(lab, "interactive", case, mode, rep, loaded))
    await lab.settle()
    return out


async def https(lab: Lab, mode: str, rep: int) -> list[Sample]:
    out = []
    ca = str(lab.dir / TLS_CERT)
    # One fetch first, not measured: the object server's first TLS handshake costs it
    # ~0.1 s of CPU that a real, warm server does not spend.
    await objects.fetch_tls(lab.ns("client"), (SERVER[0], TLS_PORT), 1000, ca)
    await lab.settle()
    for size in (100_000, 1_000_000):

        async def body(size: int = size) -> tuple[float, dict[str, Any], list[tuple[float, int]]]:
            t = await objects.fetch_tls(lab.ns("client"), (SERVER[0], TLS_PORT), size, ca)
            return t.seconds, {"size": size, "handshake_s": round(t.connect, 4)}, []

        out.append(await _measured(lab, "https", f"HTTPS {format_size(size)}", mode, rep, body))
        await lab.settle()
    return out


IDLE = 120.0  # seconds the `idle` workload waits before its fetch


async def idle(lab: Lab, mode: str, rep: int) -> list[Sample]:
    await trio.sleep(IDLE)

    async def body() -> tuple[float, dict[str, Any], list[tuple[float, int]]]:
        t = await objects.fetch(lab.ns("client"), SERVER, 1_000_000)
        return t.seconds, {"idle_s": IDLE, "first_byte_s": round(t.first_byte, 4)}, []

    sample = await _measured(lab, "idle", f"1 MB after {IDLE:g} s idle", mode, rep, body)
    await lab.settle()
    return [sample]


async def loss(lab: Lab, mode: str, rep: int) -> list[Sample]:
    samples = await single(lab, mode, rep, [10_000_000])
    for s in samples:
        s.workload, s.case = "loss", f"10 MB, {lab.profile.loss * 100:g} % loss"
    return samples


def _single_default(lab: Lab, mode: str, rep: int) -> Awaitable[list[Sample]]:
    return single(lab, mode, rep, [100_000, 1_000_000, 10_000_000])


WORKLOADS: dict[str, Workload] = {
    w.name: w
    for w in (
        Workload("single", "single fetches", _single_default),
        Workload("parallel", "parallel 1 MB downloads", parallel),
        Workload("upload", "parallel 1 MB uploads", upload),
        Workload("page", "web page over 6 keep-alive connections", page),
        Workload("interactive", "small requests, idle and during a download", interactive),
        Workload("loss", "10 MB at 0.5 % loss", loss, loss=LOSS),
        Workload("https", "TLS 1.3 fetches", https),
        Workload("idle", "1 MB after two idle minutes", idle),
        Workload("fade", "10 MB and requests across 20 s and 60 s fades", outages.fade),
        Workload("fade300", "10 MB and requests across a 5-minute fade", outages.fade300),
        Workload("handover", "60 s bulk, with and without LEO handovers", outages.handover),
    )
}
