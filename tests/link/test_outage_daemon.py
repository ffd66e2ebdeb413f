"""A link outage with the real daemons: connections across it are held and resume, byte-exact.

    client 10.78.1.2 — in0 gw1 out0 10.78.2.1 ~~ link ~~ 10.78.2.2 in0 gw2 out0 — 10.78.3.2 server

gw1 and gw2 both run pep with ``[link]`` on the interfaces that face each other (and ``[peer]``
where a test says so). The link fades when gw2 drops everything it sends or receives on in0
(filter-table DROP rules, taken out after). The test link's RTT is a fraction of a
millisecond, so [link]'s outage numbers are at their floors: a heartbeat (the pooled
connections' keepalive) every second and a 1 s RTO cap. Without the link legs'
TCP_USER_TIMEOUT a pooled connection would be given up after four unanswered heartbeats
(1 s idle + 3 x 1 s): the fades here are longer (FADE), and the times are scaled down from a
satellite's: the benchmark (`pep lab bench --workloads fade`) measures real fades.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import trio

from pep.config.peer import keygen
from pep.testing.daemon import PepProcess, StartPep, status_json
from pep.testing.netenv import PORT, series
from pep.testing.topology import Topology, ns_socket
from pep.testing.traffic import connect, hash_to_eof, send_all, serving

pytestmark = [
    pytest.mark.netns,
    pytest.mark.parametrize("topo_layout", [series], ids=["series"]),
]

SERVER = ("10.78.3.2", PORT)
PEER = "10.78.2.2:5001"
METRICS = ("127.0.0.1", 9560)
FADE = 8.0  # seconds: longer than the heartbeat keepalive's 4 s without the user timeout
CHUNK = 4 << 20  # sent before the fade, and again during it
LINK = """
[link]
interface = "{iface}"
rtt = "20ms"
egress_rate = "100mbit"
ingress_rate = "100mbit"
outage_timeout = "60s"
"""


def _key(tmp_path: Path) -> Path:
    path = tmp_path / "peer.key"
    path.write_text(keygen() + "\n")
    os.chmod(path, 0o600)
    return path


def start_pair(start_pep: StartPep, tmp_path: Path, peer: bool) -> PepProcess:
    """gw2 (far end) and gw1 (near end) with [link] (and [peer]); returns gw1."""
    key = _key(tmp_path)
    far = 'family = "ipv4"\n'
    near = f'family = "ipv4"\nmetrics_listen = "{METRICS[0]}:{METRICS[1]}"\n'
    if peer:
        far += f'[peer]\nkey_file = "{key}"\nlisten = "{PEER}"\nallow = ["10.78.2.0/24"]\n'
        near += f'[peer]\nkey_file = "{key}"\nconnect = "{PEER}"\npool = 2\n'
    start_pep(config=far + LINK.format(iface="in0"), node="gw2", interfaces=("in0",))
    return start_pep(config=near + LINK.format(iface="out0"), node="gw1", interfaces=("in0",))


_DROPS = (("INPUT", "-i"), ("OUTPUT", "-o"), ("FORWARD", "-i"), ("FORWARD", "-o"))


@contextlib.contextmanager
def faded(topo: Topology) -> Iterator[None]:
    """The link between gw1 and gw2 delivers nothing, both ways, until the block ends."""
    rules = [[chain, flag, "in0", "-j", "DROP"] for chain, flag in _DROPS]
    for rule in rules:
        topo.run("gw2", ["iptables-legacy", "-I", *rule])
    try:
        yield
    finally:
        for rule in rules:
            topo.run("gw2", ["iptables-legacy", "-D", *rule])


async def link_state(pep: PepProcess) -> dict[str, object]:
    doc = await status_json(pep)
    return doc["link"]["state"]


async def wait_state(pep: PepProcess, up: bool, timeout: float = 20) -> dict[str, object]:
    deadline = time.monotonic() + timeout
    while (state := await link_state(pep))["up"] is not up:
        assert time.monotonic() < deadline, (state, pep.log())
        await trio.sleep(0.1)
    return state


def metric(topo: Topology, name: str) -> float:
    sock = ns_socket(topo.ns("gw1"))
    with sock:
        sock.settimeout(5)
        sock.connect(METRICS)
        sock.sendall(b"GET /metrics HTTP/1.0\r\n\r\n")
        text = b"".join(iter(lambda: sock.recv(65536), b"")).decode()
    for line in text.splitlines():
        if line.startswith(name + "{") or line.startswith(name + " "):
            return float(line.rsplit(" ", 1)[1])
    raise AssertionError(f"no {name} in the metrics:\n{text}")


async def stream_across_a_fade(topo: Topology, fade: float) -> None:
    """A download (CHUNK before the fade, CHUNK during it), and a request made during the
    fade; both complete after it, byte-exact."""
    body = os.urandom(CHUNK)
    sent_first = trio.Event()
    fade_over = trio.Event()
    got: dict[str, tuple[str, int]] = {}

    async def server(conn: trio.socket.SocketType) -> None:
        request = await conn.recv(16)
        if request == b"big":
            await send_all(conn, body)
            sent_first.set()
            await send_all(conn, body)  # into a link that is down: held, resent after
        else:
            await send_all(conn, request * 1000)

    async def download() -> None:
        sock = await connect(topo.ns("client"), SERVER)
        with sock:
            await send_all(sock, b"big")
            got["download"] = await hash_to_eof_after(sock, fade_over)

    async def small_request() -> None:
        await trio.sleep(2.0)  # the link is down by now
        sock = await connect(topo.ns("client"), SERVER)  # answered by gw1 at once
        with sock:
            await send_all(sock, b"during")
            got["request"] = await hash_to_eof(sock)

    async with serving(topo, SERVER, server), trio.open_nursery() as nursery:
        nursery.start_soon(download)
        with trio.fail_after(10):
            await sent_first.wait()
        with faded(topo):
            nursery.start_soon(small_request)
            await trio.sleep(fade)
        fade_over.set()
    assert got["download"] == (hashlib.sha256(body + body).hexdigest(), 2 * CHUNK)
    assert got["request"] == (hashlib.sha256(b"during" * 1000).hexdigest(), 6000)


async def hash_to_eof_after(sock: trio.socket.SocketType, fade_over: trio.Event) -> tuple[str, int]:
    """The download to its end; the server closes only after its second chunk, which cannot
    arrive before the fade is over (its EOF before then would be a bug)."""
    result = await hash_to_eof(sock)
    assert fade_over.is_set(), "the download ended while the link was down"
    return result


async def test_pooled_flows_are_held_through_a_fade_and_the_state_is_reported(
    topo: Topology, start_pep: StartPep, tmp_path: Path
) -> None:
    near = start_pair(start_pep, tmp_path, peer=True)
    assert (await wait_state(near, up=True))["outages"] == 0

    async def watch_down() -> None:
        state = await wait_state(near, up=False)
        assert state["down_for_s"] is not None
        assert metric(topo, "pep_link_up") == 0

    async with trio.open_nursery() as nursery:
        nursery.start_soon(watch_down)
        await stream_across_a_fade(topo, FADE)
    state = await wait_state(near, up=True)
    assert state["outages"] == 1 and 1.0 < state["outage_seconds"] < FADE + 5, state
    assert metric(topo, "pep_link_up") == 1
    assert metric(topo, "pep_link_outages_total") == 1
    assert metric(topo, "pep_link_outage_seconds_total") > 1.0
    doc = await status_json(near)
    assert doc["peer"]["pool"]["fallback"] == 0, near.log()  # every flow took the pool
    assert "link out0: down" in near.log() and "link out0: up again" in near.log()


async def test_direct_link_legs_are_held_through_a_fade(
    topo: Topology, start_pep: StartPep, tmp_path: Path
) -> None:
    near = start_pair(start_pep, tmp_path, peer=False)
    await stream_across_a_fade(topo, FADE)
    doc = await status_json(near)
    assert doc["link"]["retransmits"] > 0  # the legs did resend across the fade
    assert doc["listener"]["upstream_failed"] == 0, near.log()
