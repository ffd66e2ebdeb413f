"""The delay line's pure scheduling core: which batch verdicts to send when (no root needed);
and the link's rules as python-iptables really installs them (in a namespace)."""

from __future__ import annotations

import math

import pytest
from hypothesis import given
from hypothesis import strategies as st

from pep.lab.delay_schedule import DelayLine, queue_sizing, simulate
from pep.lab.link_rules import LinkRules
from pep.testing.netenv import in_ns, ipt


def test_nothing_held_means_no_deadline() -> None:
    line = DelayLine(0.3)
    assert line.deadline() is None
    assert line.release(100.0) is None


def test_due_prefix_is_one_batch_naming_its_last_id() -> None:
    line = DelayLine(0.3)
    for packet_id, t in ((1, 0.0), (2, 0.01), (3, 0.02), (4, 0.5)):
        line.arrive(packet_id, t)
    assert line.deadline() == pytest.approx(0.3)
    assert line.release(0.299) is None  # nothing due yet
    assert line.release(0.315) == 2  # ids 1 and 2 are due: one verdict for "<= 2"
    assert line.deadline() == pytest.approx(0.32)
    assert line.release(0.33) == 3
    assert len(line) == 1 and line.released == 3 and line.batches == 2


def test_slack_wakes_early_and_releases_what_is_due_within_it() -> None:
    line = DelayLine(0.1, slack=0.0005)
    line.arrive(7, 1.0)
    line.arrive(8, 1.0003)
    line.arrive(9, 1.0009)
    assert line.deadline() == pytest.approx(1.0995)  # half a millisecond early
    # At 1.09985, 7 (due 1.1) and 8 (due 1.1003) are due within the slack; 9 (1.1009) is not.
    assert line.release(1.09985) == 8
    assert line.release(1.1004) == 9


def test_release_all_on_shutdown() -> None:
    line = DelayLine(600.0)
    for i in range(5):
        line.arrive(i + 10, float(i))
    assert line.release_all() == 14
    assert len(line) == 0 and line.max_held == 5


def test_simulate_spaced_arrivals_each_released_after_the_delay() -> None:
    out = simulate([(1, 0.0), (2, 1.0), (3, 2.0)], delay=0.25)
    assert out == [(0.25, 1), (1.25, 2), (2.25, 3)]


def test_simulate_burst_is_a_single_verdict() -> None:
    out = simulate([(i, 5.0) for i in range(1, 1001)], delay=0.3)
    assert out == [(pytest.approx(5.3), 1000)]


def test_simulate_arrival_at_the_wakeup_instant_joins_the_batch() -> None:
    # id 2 arrives exactly when id 1 is due minus the delay difference: 0.3 + 0 = 0.3 for 1;
    # id 2 arrives at 0.0 as well, so both go together.
    assert simulate([(1, 0.0), (2, 0.0), (3, 0.1)], delay=0.3) == [
        (pytest.approx(0.3), 2),
        (pytest.approx(0.4), 3),
    ]


@given(
    gaps=st.lists(st.floats(0, 0.05, allow_nan=False), min_size=1, max_size=200),
    delay=st.floats(0.001, 1.0, allow_nan=False),
    slack=st.sampled_from([0.0, 0.0005]),
)
def test_every_packet_released_once_in_order_never_before_its_time(
    gaps: list[float], delay: float, slack: float
) -> None:
    t, arrivals = 0.0, []
    for i, gap in enumerate(gaps):
        t += gap
        arrivals.append((i + 1, t))
    out = simulate(arrivals, delay, slack)
    ids = [i for _, i in out]
    times = [w for w, _ in out]
    assert ids == sorted(set(ids)) and ids[-1] == len(arrivals)  # increasing, ends at the last
    assert times == sorted(times)
    for packet_id, arrived in arrivals:
        # The batch that releases a packet is the first whose id covers it.
        when = next(w for w, i in out if i >= packet_id)
        assert arrived + delay - slack - 1e-9 <= when <= arrived + delay + 1e-9


def test_queue_sizing_geo_from_the_bandwidth_delay_product() -> None:
    # 20 Mbit/s down + 5 up, 300 ms one way + 600 ms of tbf queue, 1448-byte packets, x4.
    maxlen, rcvbuf = queue_sizing(20_000_000, 5_000_000, 0.3, 0.6)
    expected = math.ceil(25e6 / 8 * 0.9 / 1448 * 4)
    assert maxlen == expected
    assert rcvbuf == max(4 << 20, maxlen * 1024)


def test_queue_sizing_floor_and_unlimited_rate() -> None:
    assert queue_sizing(1_000_000, 1_000_000, 0.001, 0.0)[0] == 1024
    assert queue_sizing(None, 5_000_000, 0.3, 0.6)[0] == 65536


def test_link_rules_drop_before_queue_per_direction() -> None:
    rules = LinkRules((("cl0", 1, True), ("sv0", 2, True)), loss=0.005)
    lines = rules.lines()
    assert lines[0] == "-A FORWARD -m comment --comment pep-lab -j LAB_LINK"
    assert lines[1:] == [
        # 0.005 as libxt_statistic keeps it (a 2**-31 fixed point) and iptables-save prints it
        "-A LAB_LINK -i cl0 -m statistic --mode random --probability 0.00499999989 -j DROP",
        "-A LAB_LINK -i cl0 -j NFQUEUE --queue-num 1",
        "-A LAB_LINK -i sv0 -m statistic --mode random --probability 0.00499999989 -j DROP",
        "-A LAB_LINK -i sv0 -j NFQUEUE --queue-num 2",
    ]
    assert LinkRules((("cl0", 1, False), ("sv0", 2, False)), loss=0.0).lines() == [lines[0]]


@pytest.mark.netns
@pytest.mark.parametrize(
    "rules",
    [
        LinkRules((("cl0", 1, True), ("sv0", 2, True)), loss=0.005),
        LinkRules((("cl0", 1, False), ("sv0", 2, True)), loss=0.25),
    ],
    ids=["delay-and-loss", "one-way-delay"],
)
def test_link_rules_install_builds_what_lines_say_and_remove_leaves_nothing(
    netns: str,
    rules: LinkRules,
) -> None:
    """install() builds its python-iptables rules from the same description lines() renders:
    what the kernel then holds, read by iptables-legacy, is exactly those lines."""
    ipt(netns, "-A", "FORWARD", "-p", "udp", "-j", "ACCEPT")  # not the link's: stays
    user = ["-A FORWARD -p udp -j ACCEPT"]
    install = f"from pep.lab.link_rules import LinkRules\n{rules!r}.install()"
    in_ns(netns, install)
    in_ns(netns, install)  # again: replaced, not doubled
    saved = [line for line in ipt(netns, "-S") if not line.startswith("-P ")]
    assert saved == ["-N LAB_LINK", rules.lines()[0], *user, *rules.lines()[1:]]
    in_ns(netns, "from pep.lab.link_rules import LinkRules\nLinkRules.remove()")
    assert [line for line in ipt(netns, "-S") if not line.startswith("-P ")] == user


def test_learns_how_late_its_timer_fires_and_aims_that_early() -> None:
    line = DelayLine(0.02)
    t = 0.0
    for i in range(200):  # a timer that always fires 0.8 ms late
        line.arrive(i, t)
        target = line.deadline()
        assert target is not None
        line.woke(target, target + 0.0008)
        assert line.release(target + 0.0008) == i
        t += 0.05
    assert line.lead == pytest.approx(0.0008, rel=0.01)
    line.arrive(999, 100.0)
    assert line.deadline() == pytest.approx(100.02 - 0.0008, abs=1e-5)  # leaves on time
    line.woke(0.0, 10.0)  # one wake-up seconds late (a stalled VM) is clamped
    assert line.lead <= 0.0008 + DelayLine.LEAD_MAX * DelayLine.LEAD_GAIN
