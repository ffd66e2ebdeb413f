"""Graceful stop (SIGTERM drains) and reload (SIGHUP) of the real daemon under traffic."""

from __future__ import annotations

import errno
import hashlib
import os
import signal
import time
from collections.abc import Awaitable, Callable

import pytest
import trio

from pep.testing.daemon import PepProcess, StartPep, status_json, wait_for, wait_log
from pep.testing.netenv import CLIENT_IP, GW_SERVER_IP, SERVER_IP, rules_in
from pep.testing.topology import Topology
from pep.testing.traffic import connect, peer_seen, request, send_all, serving, sha

pytestmark = pytest.mark.netns

BULK_PORT, ECHO_PORT, CHAT_PORT, IDLE_PORT = 8080, 8081, 8082, 8083
ECHO = (SERVER_IP, ECHO_PORT)


async def test_sigterm_drains_a_50mib_transfer_while_new_flows_go_end_to_end(
    topo: Topology, start_pep: StartPep
) -> None:
    drain_timeout = 20.0
    pep = start_pep(config=f"drain_timeout = {drain_timeout}\n")
    size = 50 * 1024 * 1024
    data = os.urandom(size)
    received = 0
    result: dict[str, tuple[str, int]] = {}

    async def bulk(conn: trio.socket.SocketType) -> None:
        await send_all(conn, data)

    async def slow_reader() -> None:
        """Reads at ~12 MiB/s, so the transfer spans the signal by a few seconds."""
        nonlocal received
        sock = await connect(topo.ns("client"), (SERVER_IP, BULK_PORT))
        h = hashlib.sha256()
        with sock:
            while chunk := await sock.recv(1 << 18):
                h.update(chunk)
                received += len(chunk)
                await trio.sleep(len(chunk) / (12 << 20))
        result["client"] = (h.hexdigest(), received)

    with trio.fail_after(60):
        async with serving(topo, (SERVER_IP, BULK_PORT), bulk), serving(topo, ECHO) as echoed:
            assert await peer_seen(topo, ECHO, echoed, b"new flow") == GW_SERVER_IP  # split
            async with trio.open_nursery() as transfer:
                transfer.start_soon(slow_reader)

                async def started() -> bool:
                    return received > 5 << 20

                await wait_for(started, 20, "the first 5 MiB")
                pep.signal(signal.SIGTERM)
                signalled = time.monotonic()
                await trio.to_thread.run_sync(wait_log, pep, "SIGTERM: stopping")
                await wait_for(_syn_jumps_gone(topo), 10, "SYN jumps removed")
                assert received < size, "the transfer ended before the signal: too fast"
                # A new connection after the signal is routed end to end, unsplit.
                assert await peer_seen(topo, ECHO, echoed, b"new flow") == CLIENT_IP
                doc = await status_json(pep)
                assert doc["state"] == "draining" and doc["totals"]["active"] == 1
        code = await trio.to_thread.run_sync(pep.wait, drain_timeout)
        elapsed = time.monotonic() - signalled
    assert result["client"] == (sha(data), size)  # completed byte-exact
    assert code == 0 and elapsed < drain_timeout
    [rec] = [r for r in pep.closed_lines(expect=2) if r["down"] == str(size)]
    assert rec["reason"] == "eof"
    assert "PEP" not in rules_in(topo, "gw")


def _syn_jumps_gone(topo: Topology) -> Callable[[], Awaitable[bool]]:
    async def check() -> bool:
        return "-j PEP_SYN" not in await trio.to_thread.run_sync(rules_in, topo, "gw")

    return check


async def test_drain_timeout_resets_connections_still_open(
    topo: Topology, start_pep: StartPep
) -> None:
    pep = start_pep(config="drain_timeout = 1.0\n")

    async def hold(conn: trio.socket.SocketType) -> None:
        await trio.sleep_forever()

    with trio.fail_after(30):
        async with serving(topo, (SERVER_IP, CHAT_PORT), hold):
            sock = await connect(topo.ns("client"), (SERVER_IP, CHAT_PORT))
            with sock:
                await wait_for(_active(pep, 1), 5, "the idle connection in pep status")
                pep.signal(signal.SIGTERM)
                signalled = time.monotonic()
                try:
                    data = await sock.recv(10)
                except OSError as e:
                    assert e.errno == errno.ECONNRESET
                else:
                    raise AssertionError(f"expected a reset, got {data!r}")
                code = await trio.to_thread.run_sync(pep.wait, 10)
    assert code == 0
    assert 1.0 <= time.monotonic() - signalled < 6
    assert "resetting 1 connection(s) still open after the drain" in pep.log()


def _active(pep: PepProcess, n: int) -> Callable[[], Awaitable[bool]]:
    async def check() -> bool:
        return (await status_json(pep))["totals"]["active"] == n

    return check


async def chat(conn: trio.socket.SocketType) -> None:
    """Echo each chunk upper-cased as it arrives (not at EOF): a long-lived interactive flow."""
    while data := await conn.recv(1 << 16):
        await send_all(conn, data.upper())


async def roundtrip(sock: trio.socket.SocketType, text: bytes) -> None:
    await send_all(sock, text)
    assert await sock.recv(100) == text.upper()


async def idle_closed_after(sock: trio.socket.SocketType) -> float:
    """Seconds until pep closes an idle connection (an orderly EOF: idle timeout)."""
    t0 = time.monotonic()
    assert await sock.recv(10) == b""
    return time.monotonic() - t0


async def test_sighup_adds_a_bypass_rule_and_tuning_and_rejects_an_invalid_file(
    topo: Topology, start_pep: StartPep
) -> None:
    pep = start_pep(config="idle_timeout = 3600.0\n")
    assert pep.config is not None
    reloaded = (
        "idle_timeout = 1.0\n"
        f'[[policy]]\nname = "chat-direct"\naction = "bypass"\ndport = [{CHAT_PORT}]\n'
    )
    chat_peers: list[tuple[str, int]] = []
    idle_peers: list[tuple[str, int]] = []

    async def new_chat_flow_is_bypassed() -> None:
        sock = await connect(topo.ns("client"), (SERVER_IP, CHAT_PORT))
        with sock:
            await roundtrip(sock, b"new chat flow")
        assert chat_peers[-1][0] == CLIENT_IP  # end to end: the server sees the client

    async def new_flow_gets_the_new_idle_timeout() -> None:
        sock = await connect(topo.ns("client"), (SERVER_IP, IDLE_PORT))
        with sock:
            await roundtrip(sock, b"new idle flow")
            assert idle_peers[-1][0] == GW_SERVER_IP  # split
            assert 0.8 < await idle_closed_after(sock) < 3

    with trio.fail_after(60):
        async with (
            serving(topo, (SERVER_IP, CHAT_PORT), chat, chat_peers),
            serving(topo, (SERVER_IP, IDLE_PORT), chat, idle_peers),
        ):
            live = await connect(topo.ns("client"), (SERVER_IP, CHAT_PORT))
            with live:
                await roundtrip(live, b"before reload")
                assert chat_peers == [(GW_SERVER_IP, chat_peers[0][1])]  # split
                rules_before = rules_in(topo, "gw")

                # A valid change: new flows get it; the live split connection keeps working.
                pep.config.write_text(reloaded)
                pep.signal(signal.SIGHUP)
                await trio.to_thread.run_sync(
                    wait_log, pep, "SIGHUP: reloaded (changed: idle_timeout, policy)"
                )
                await new_chat_flow_is_bypassed()
                await new_flow_gets_the_new_idle_timeout()
                await roundtrip(live, b"live flow still split and working after 1+ s idle")
                doc = await status_json(pep)
                assert doc["config"]["idle_timeout"] == 1.0
                assert doc["reloads"] == {"ok": 1, "failed": 0, "last_error": None}
                assert doc["syn"]["bypassed"] == 1
                assert [c["dst"] for c in doc["connections"]] == [f"{SERVER_IP}:{CHAT_PORT}"]

                # An invalid file changes nothing, not even its valid part.
                pep.config.write_text("idle_timeout = 3600.0\nidle_timeuot = 5\n")
                pep.signal(signal.SIGHUP)
                await trio.to_thread.run_sync(wait_log, pep, "SIGHUP: reload rejected")
                assert "idle_timeuot" in pep.log()
                doc = await status_json(pep)
                assert doc["config"]["idle_timeout"] == 1.0
                assert doc["reloads"]["failed"] == 1
                assert "idle_timeuot" in doc["reloads"]["last_error"]
                await new_chat_flow_is_bypassed()  # the policy stays
                await new_flow_gets_the_new_idle_timeout()  # and so does the tuning
                await roundtrip(live, b"live flow unharmed")
                assert rules_in(topo, "gw") == rules_before
                assert pep.running
    assert len(pep.closed_lines(expect=3)) == 3
    assert pep.log().count("reason=idle timeout") == 2


async def test_sighup_without_changes_and_restart_only_keys(
    topo: Topology, start_pep: StartPep
) -> None:
    pep = start_pep(config="")
    assert pep.config is not None
    pep.config.write_text("listen_port = 6000\nconnect_timeout = 2.0\n")
    pep.signal(signal.SIGHUP)
    await trio.to_thread.run_sync(wait_log, pep, "SIGHUP: reloaded (changed: connect_timeout)")
    assert "listen_port changed but only take effect on restart" in pep.log()
    doc = await status_json(pep)
    assert doc["config"]["listen_port"] == 5000 and doc["config"]["connect_timeout"] == 2.0
    with trio.fail_after(10):
        async with serving(topo, ECHO):
            reply = await request(topo, ECHO, b"still splitting")
    assert reply == b"STILL SPLITTING"
    assert pep.closed_lines(expect=1)
