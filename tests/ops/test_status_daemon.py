"""`pep status` and the Prometheus endpoint against the real daemon and real traffic."""

from __future__ import annotations

import hashlib
import os

import pytest
import trio
from prometheus_client.parser import text_string_to_metric_families

from pep.testing.daemon import PepProcess, StartPep, pep_status, status_json, wait_for
from pep.testing.netenv import GW_CLIENT_IP, PORT, SERVER_IP
from pep.testing.topology import Topology
from pep.testing.traffic import connect, http_get, recv_to_eof, request, send_all, serving, sha

pytestmark = pytest.mark.netns

CLOSED_PORT = 8081
METRICS = ("127.0.0.1", 9560)


@pytest.fixture
def pep(start_pep: StartPep) -> PepProcess:
    return start_pep(config=f'metrics_listen = "{METRICS[0]}:{METRICS[1]}"\n')


async def recv_exactly(sock: trio.socket.SocketType, n: int) -> bytes:
    buf = bytearray()
    while len(buf) < n:
        chunk = await sock.recv(min(1 << 16, n - len(buf)))
        if not chunk:
            raise AssertionError(f"EOF after {len(buf)} of {n} bytes")
        buf += chunk
    return bytes(buf)


async def test_status_json_lists_20_live_connections_with_byte_counts(
    topo: Topology, pep: PepProcess
) -> None:
    count = 20
    # Connection i sends up[i] bytes, gets down[i] back, then both sides hold it open.
    up = {i: os.urandom(1000 + 997 * i) for i in range(count)}
    down = {i: os.urandom(50_000 + 4099 * i) for i in range(count)}
    server_got: dict[int, str] = {}
    client_port: dict[int, int] = {}
    release, all_exchanged = trio.Event(), trio.Event()
    exchanged = 0

    async def server_side(conn: trio.socket.SocketType) -> None:
        i = int((await recv_exactly(conn, 2)).decode())
        server_got[i] = sha(await recv_exactly(conn, len(up[i])))
        await send_all(conn, down[i])
        assert await recv_to_eof(conn) == b""  # held open until the client's FIN

    async def client(i: int) -> None:
        nonlocal exchanged
        sock = await connect(topo.ns("client"), (SERVER_IP, PORT))
        with sock:
            client_port[i] = sock.getsockname()[1]
            await send_all(sock, b"%02d" % i + up[i])
            assert sha(await recv_exactly(sock, len(down[i]))) == sha(down[i])
            exchanged += 1
            if exchanged == count:
                all_exchanged.set()
            await release.wait()
            sock.shutdown(trio.socket.SHUT_WR)
            assert await recv_to_eof(sock) == b""

    with trio.fail_after(60):
        async with serving(topo, (SERVER_IP, PORT), server_side), trio.open_nursery() as clients:
            for i in range(count):
                clients.start_soon(client, i)
            await all_exchanged.wait()

            doc: dict = {}

            async def counts_match() -> bool:
                nonlocal doc
                doc = await status_json(pep)
                got = {
                    int(c["client"].rsplit(":", 1)[1]): (c["up"], c["down"])
                    for c in doc["connections"]
                }
                want = {client_port[i]: (2 + len(up[i]), len(down[i])) for i in range(count)}
                return got == want

            await wait_for(counts_match, 10, "status byte counts", step=0.2)
            assert len(doc["connections"]) == count
            for c in doc["connections"]:
                assert c["dst"] == f"{SERVER_IP}:{PORT}" and c["flow"] == c["dst"]
                assert c["state"] == "open" and c["age"] >= 0
            assert doc["totals"]["active"] == count and doc["state"] == "running"
            assert doc["syn"]["split"] == count
            human = await pep_status(pep)
            assert human.returncode == 0
            text = human.stdout.decode()
            assert f"connections: {count} active" in text
            assert sum(f"{SERVER_IP}:{PORT}" in line for line in text.splitlines()) == count
            release.set()
    assert server_got == {i: sha(up[i]) for i in range(count)}
    recs = pep.closed_lines(expect=count)
    by_port = {int(r["client"].rsplit(":", 1)[1]): r for r in recs}
    for i in range(count):
        rec = by_port[client_port[i]]
        assert (int(rec["up"]), int(rec["down"])) == (2 + len(up[i]), len(down[i]))
        assert rec["reason"] == "eof" and rec["dst"] == f"{SERVER_IP}:{PORT}"
        assert float(rec["duration"].rstrip("s")) > 0
    # Closed connections' bytes stay in the totals: the counters never go backwards.
    doc = await status_json(pep)
    assert doc["connections"] == []
    assert doc["totals"]["bytes_up"] == sum(2 + len(b) for b in up.values())
    assert doc["totals"]["bytes_down"] == sum(len(b) for b in down.values())


async def expect_reset(topo: Topology, dst: tuple[str, int]) -> None:
    """pep accepts, then resets (the reset may already be there when connect() returns)."""
    with pytest.raises(ConnectionResetError):
        sock = await connect(topo.ns("client"), dst)
        with sock:
            await recv_to_eof(sock)


def samples(text: str) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    return {
        (s.name, frozenset(s.labels.items())): s.value
        for fam in text_string_to_metric_families(text)
        for s in fam.samples
    }


async def test_metrics_endpoint_counts_a_known_workload(topo: Topology, pep: PepProcess) -> None:
    ok = 6
    payloads = [hashlib.sha256(bytes([i])).digest() * (31 * (i + 1)) for i in range(ok)]
    with trio.fail_after(30):
        async with serving(topo, (SERVER_IP, PORT)):
            for p in payloads:
                reply = await request(topo, (SERVER_IP, PORT), p)
                assert sha(reply) == sha(p.upper())
            for _ in range(2):  # nothing listens there: pep's upstream connect is refused
                await expect_reset(topo, (SERVER_IP, CLOSED_PORT))
            # Straight to the listener: refused, pep is not an open proxy.
            await expect_reset(topo, (GW_CLIENT_IP, 5000))
        pep.closed_lines(expect=ok)

        async def settled() -> bool:
            doc = await status_json(pep)
            return doc["totals"]["active"] == 0 and doc["listener"]["accepted"] == ok + 3

        await wait_for(settled, 5, "all connections closed")
        status_code, headers, body = await http_get(topo, "gw", METRICS, "/metrics")
    assert status_code == 200 and headers["Content-Type"].startswith("text/plain; version=0.0.4")
    m = samples(body.decode())

    def v(name: str, **labels: str) -> float:
        return m[(name, frozenset(labels.items()))]

    total = sum(len(p) for p in payloads)
    assert v("pep_connections_total") == ok
    assert v("pep_connections_closed_total") == ok
    assert v("pep_connections_active") == 0
    assert v("pep_connections_accepted_total") == ok + 3
    assert v("pep_connections_refused_total") == 1
    assert v("pep_relayed_bytes_total", direction="up") == total
    assert v("pep_relayed_bytes_total", direction="down") == total
    assert v("pep_syn_queued_total") == ok + 2  # the direct connection is never queued
    assert v("pep_syn_split_total") == ok + 2
    assert v("pep_syn_unsplit_total") == 0
    assert v("pep_upstream_connect_failures_total", reason="ECONNREFUSED") == 2
    assert v("pep_upstream_connect_seconds_count") == ok
    assert v("pep_upstream_connect_seconds_bucket", le="+Inf") == ok
    assert 0 < v("pep_upstream_connect_seconds_sum") < ok * 1.0
    assert v("pep_queue_dropped_total", queue="0") == 0
    assert v("pep_flow_table_entries") == 0
    # The library's content negotiation: OpenMetrics when asked for.
    assert (await http_get(topo, "gw", METRICS, "/nope"))[0] == 404


async def test_status_works_with_networks_in_the_config(
    topo: Topology, start_pep: StartPep
) -> None:
    """`pep status` failed for any config with networks in [[policy]] or [[upstream_override]]:
    the daemon could not encode its status document."""
    pep = start_pep(
        config='[[policy]]\nname = "lan"\naction = "bypass"\ndst = ["10.99.0.0/16"]\n'
        'src = ["fd77:1::/64"]\n[[upstream_override]]\ndst = ["10.77.2.0/24"]\nnodelay = false\n'
    )
    doc = await status_json(pep)
    assert doc["state"] == "running"
    [rule] = doc["config"]["policy"]
    assert (rule["dst"], rule["src"]) == (["10.99.0.0/16"], ["fd77:1::/64"])
    assert doc["config"]["upstream_override"][0]["dst"] == ["10.77.2.0/24"]
    human = await pep_status(pep)
    assert human.returncode == 0, human.stderr.decode()
    assert "connections: 0 active" in human.stdout.decode()
