"""The link's outages without a link: the state machine (pep.link.state), what one socket's
tcp_info says (pep.link.watch.evidence), waiting across the link (pep.split.hooks.patiently),
the [link] numbers behind them, and the lab's outage schedule (pep.lab.outages)."""

from __future__ import annotations

import math
import socket

import pytest
import trio
import trio.testing

from pep.config import ConfigError, LegTuning, build
from pep.config.link import Link
from pep.lab.outages import Handover, Outages, parse_handover, read_control, write_control
from pep.link import tcpinfo
from pep.link.state import SLACK, LinkState
from pep.link.watch import evidence
from pep.split.hooks import NO_LINK, patiently
from pep.split.sockopts import TCP_RTO_MAX_MS, TCP_USER_TIMEOUT, apply_tuning

GEO = Link("sat0", 0.6, 20_000_000, 5_000_000, "bbr")


# --- the state -------------------------------------------------------------------------------


def test_down_needs_both_a_stalled_socket_and_silence() -> None:
    s = LinkState(silence=1.8)
    assert s.observe(10.0, heard_ago=5.0, stalled=False) is None  # idle, nothing waits
    assert s.observe(10.2, heard_ago=1.0, stalled=True) is None  # one stalls, others hear
    change = s.observe(10.4, heard_ago=2.0, stalled=True)
    assert change is not None and not change.up and change.at == pytest.approx(8.4)
    assert not s.up and s.outages == 1
    assert s.observe(10.6, heard_ago=2.2, stalled=True) is None  # still down: no new change


def test_up_at_the_first_thing_heard_after_it_went_down() -> None:
    s = LinkState(silence=1.5)
    s.observe(20.0, heard_ago=2.0, stalled=True)  # down since 18.0
    assert s.observe(21.0, heard_ago=3.0 - SLACK / 2, stalled=True) is None  # same old packet
    change = s.observe(40.0, heard_ago=0.5, stalled=False)  # heard at 39.5
    assert change is not None and change.up and change.lasted == pytest.approx(21.5)
    assert s.up and s.down_seconds == pytest.approx(21.5) and s.outages == 1


def test_down_time_counts_the_live_outage() -> None:
    s = LinkState(silence=1.5)
    s.observe(10.0, heard_ago=2.0, stalled=True)  # down since 8.0
    assert s.down_total(12.0) == pytest.approx(4.0)
    assert s.down_during(9.0, 12.0) == pytest.approx(3.0)
    s.observe(15.0, heard_ago=0.1, stalled=False)  # up at 14.9
    assert s.down_total(100.0) == pytest.approx(6.9)
    assert s.down_during(0.0, 100.0) == 0.0  # nothing live


def test_a_socket_never_heard_from_still_takes_the_link_down() -> None:
    s = LinkState(silence=1.5)
    change = s.observe(5.0, heard_ago=math.inf, stalled=True)
    assert change is not None and change.at == pytest.approx(3.5)


def _info(**fields: int) -> tcpinfo.TcpInfo:
    zero = dict.fromkeys(tcpinfo.TcpInfo._fields, 0)
    return tcpinfo.TcpInfo(**(zero | fields))


@pytest.mark.parametrize(
    ("fields", "heard", "stalled"),
    [
        ({"last_data_recv_ms": 5000, "last_ack_recv_ms": 200}, 0.2, False),
        ({"last_data_recv_ms": 300, "last_ack_recv_ms": 9000, "retransmits": 1}, 0.3, False),
        ({"last_data_recv_ms": 4000, "last_ack_recv_ms": 4000, "retransmits": 2}, 4.0, True),
        ({"last_data_recv_ms": 4000, "last_ack_recv_ms": 4000, "probes": 2}, 4.0, True),
    ],
)
def test_what_one_socket_says(fields: dict[str, int], heard: float, stalled: bool) -> None:
    assert evidence(_info(**fields)) == (pytest.approx(heard), stalled)


# --- waiting across the link -----------------------------------------------------------------


class FakeLink:
    """A LinkSide that is down while ``down`` says so, counting its down time by trio's clock."""

    def __init__(self, hold: float) -> None:
        self.hold = hold
        self._since: float | None = None
        self._total = 0.0

    @property
    def down(self) -> bool:
        return self._since is not None

    def go(self, down: bool) -> None:
        now = trio.current_time()
        if down and self._since is None:
            self._since = now
        elif not down and self._since is not None:
            self._total += now - self._since
            self._since = None

    def down_time(self) -> float:
        live = trio.current_time() - self._since if self._since is not None else 0.0
        return self._total + live


async def test_patience_without_a_link_is_a_timeout(autojump_clock: trio.testing.MockClock) -> None:
    t0 = trio.current_time()
    with pytest.raises(trio.TooSlowError):
        await patiently(trio.Event().wait, 10.0, NO_LINK)
    assert trio.current_time() - t0 == pytest.approx(10.0)


async def test_time_down_does_not_count(autojump_clock: trio.testing.MockClock) -> None:
    link = FakeLink(hold=600.0)
    done = trio.Event()

    async def fade() -> None:
        await trio.sleep(2.0)
        link.go(True)
        await trio.sleep(60.0)  # longer than the 10 s timeout
        link.go(False)
        await trio.sleep(5.0)  # the answer comes 5 s after the link's return
        done.set()

    t0 = trio.current_time()
    async with trio.open_nursery() as nursery:
        nursery.start_soon(fade)
        await patiently(done.wait, 10.0, link)  # type: ignore[arg-type]
    assert trio.current_time() - t0 == pytest.approx(67.0)


async def test_patience_ends_at_the_hold(autojump_clock: trio.testing.MockClock) -> None:
    link = FakeLink(hold=30.0)
    link.go(True)  # down from the start, and stays down
    t0 = trio.current_time()
    with pytest.raises(trio.TooSlowError):
        await patiently(trio.Event().wait, 10.0, link)  # type: ignore[arg-type]
    assert trio.current_time() - t0 == pytest.approx(30.0)


async def test_a_fade_that_ended_still_extends_the_wait(
    autojump_clock: trio.testing.MockClock,
) -> None:
    link = FakeLink(hold=600.0)

    async def fade() -> None:
        await trio.sleep(1.0)
        link.go(True)
        await trio.sleep(8.0)
        link.go(False)

    t0 = trio.current_time()
    async with trio.open_nursery() as nursery:
        nursery.start_soon(fade)
        with pytest.raises(trio.TooSlowError):
            await patiently(trio.Event().wait, 10.0, link)  # type: ignore[arg-type]
    assert trio.current_time() - t0 == pytest.approx(18.0)  # 10 s of the link up


# --- [link]'s numbers and the legs' options ---------------------------------------------------


def test_link_outage_numbers() -> None:
    assert GEO.retransmit_cap == 1.0  # 1.5 x 0.6 s is below the kernel's 1 s floor
    assert GEO.heartbeat == 2 and GEO.silence == pytest.approx(1.8)
    slow = Link("sat0", 2.0, 1_000_000, 1_000_000, None, rto_max=None)
    assert slow.retransmit_cap == 3.0 and slow.heartbeat == 4 and slow.silence == 6.0
    leg = GEO.leg_tuning(LegTuning())
    assert (leg.user_timeout, leg.rto_max) == (600.0, 1.0)
    own = GEO.leg_tuning(LegTuning(user_timeout=30.0, rto_max=5.0))
    assert (own.user_timeout, own.rto_max) == (30.0, 5.0)  # the leg's own table wins


def _link(**extra: object) -> dict[str, object]:
    base: dict[str, object] = {"interface": "sat0", "rtt": "600ms", "egress_rate": "5mbit"}
    return {"interfaces": ["eth1"], "link": base | {"ingress_rate": "20mbit"} | extra}


def test_outage_keys_parse_with_units() -> None:
    cfg = build(_link(outage_timeout="300s", rto_max="2s"))
    assert cfg.link is not None
    assert (cfg.link.outage_timeout, cfg.link.rto_max, cfg.link.retransmit_cap) == (300, 2, 2)


@pytest.mark.parametrize(
    ("extra", "key", "text"),
    [
        ({"outage_timeout": "0.5s"}, "link.outage_timeout", "between"),
        ({"outage_timeout": 600}, "link.outage_timeout", "unit"),
        ({"rto_max": "500ms"}, "link.rto_max", "between"),
        ({"rto_max": "121s"}, "link.rto_max", "between"),
    ],
)
def test_bad_outage_keys_name_the_key(extra: dict[str, object], key: str, text: str) -> None:
    with pytest.raises(ConfigError) as e:
        build(_link(**extra))
    assert e.value.key == key and text in str(e.value)


def test_the_legs_options_reach_the_socket() -> None:
    with socket.socket() as sock:
        apply_tuning(sock, LegTuning(user_timeout=600.0, rto_max=1.5))
        assert sock.getsockopt(socket.IPPROTO_TCP, TCP_USER_TIMEOUT) == 600_000
        assert sock.getsockopt(socket.IPPROTO_TCP, TCP_RTO_MAX_MS) == 1500


# --- the lab's schedule ----------------------------------------------------------------------


def test_a_fade_and_handovers() -> None:
    o = Outages(Handover(15.0, 0.1), origin=100.0)
    assert not o.down(100.0) and not o.down(114.89)
    assert o.down(114.91) and o.down(114.99) and not o.down(115.01)  # every 15 s, 100 ms
    assert o.down(129.95)
    o.fade(200.0, 220.0)
    assert o.down(200.0) and o.down(219.9) and not o.down(220.0) and not o.down(199.9)
    o.fade(205.0, 205.0)  # an ended fade: up at once
    assert not o.down(210.0)


@pytest.mark.parametrize(
    ("text", "parsed"),
    [("15s/100ms", (15.0, 0.1)), ("15/100", (15.0, 0.1)), ("2s/1s", (2.0, 1.0))],
)
def test_handover_parsing(text: str, parsed: tuple[float, float]) -> None:
    h = parse_handover(text)
    assert (h.period, h.outage) == pytest.approx(parsed)


@pytest.mark.parametrize("text", ["15s", "1s/2s", "15s/0ms", "x/y", ""])
def test_bad_handovers(text: str) -> None:
    with pytest.raises(ValueError, match=r"PERIOD/OUTAGE|shorter"):
        parse_handover(text)


def test_the_control_file_round_trips(tmp_path: object) -> None:
    from pathlib import Path

    path = Path(str(tmp_path)) / "fade.json"
    assert read_control(path) is None
    write_control(path, 10.0, 30.0)
    assert read_control(path) == (10.0, 30.0)
    path.write_text("{garbage")
    assert read_control(path) is None
