"""`pep lab fade` on a real lab: the link delivers nothing while it lasts, both ways, and comes
back exactly as it was (the link node's rules and qdiscs), also when the command is interrupted.
The lab runs without pep, on a short link (LEO), so only the link is under test."""

from __future__ import annotations

import signal
import subprocess
import sys
import time

import pytest
import trio

from pep.lab import objects
from pep.lab.plan import SERVER_IP, SERVER_PORT
from pep.testing.daemon import REPO
from pep.testing.satlab import SatLab

pytestmark = [pytest.mark.netns, pytest.mark.satlab("leo", pep="none")]

SERVER = (SERVER_IP, SERVER_PORT)


@pytest.fixture
def lab(satlab_session: SatLab) -> SatLab:
    """The session's LEO lab (pep's pytest plugin), pep stopped: each fade here ends before
    its test does, and the plugin ends one a failed test left running."""
    return satlab_session


def _link_state(lab: SatLab) -> tuple[str, str]:
    def run(*cmd: str) -> str:
        argv = ["ip", "netns", "exec", lab.ns("link"), *cmd]
        return subprocess.run(argv, capture_output=True, text=True, timeout=10).stdout

    tables = ("filter", "mangle", "nat", "raw")
    rules = "".join(run("iptables-legacy", "-t", t, "-S") for t in tables)
    return rules, run("tc", "qdisc", "show")


def _fade(lab: SatLab, *args: str) -> subprocess.Popen[str]:
    argv = [sys.executable, "-m", "pep.ops.cli", "lab", "fade", *args, "--prefix", lab.prefix]
    return subprocess.Popen(argv, cwd=REPO, stderr=subprocess.PIPE, text=True)


async def _fetch(lab: SatLab, size: int, timeout: float) -> objects.Transfer | None:
    with trio.move_on_after(timeout):
        return await objects.fetch(lab.ns("client"), SERVER, size)
    return None


async def test_a_fade_drops_everything_then_the_link_is_back(lab: SatLab) -> None:
    before = _link_state(lab)
    assert await _fetch(lab, 100_000, 5) is not None
    fade = _fade(lab, "3")
    await trio.sleep(0.5)
    assert await _fetch(lab, 1000, 1.5) is None  # the SYN goes nowhere while it fades
    assert fade.wait(timeout=10) == 0
    assert "link up" in (fade.stderr.read() if fade.stderr else "")
    got = await _fetch(lab, 1_000_000, 10)  # every byte checked (sha256) by objects.fetch
    assert got is not None
    assert _link_state(lab) == before


async def test_an_interrupted_fade_restores_the_link_at_once(lab: SatLab) -> None:
    before = _link_state(lab)
    fade = _fade(lab, "600")
    await trio.sleep(1.0)
    assert await _fetch(lab, 1000, 1.0) is None
    fade.send_signal(signal.SIGINT)
    assert fade.wait(timeout=10) == 1
    assert "link restored" in (fade.stderr.read() if fade.stderr else "")
    t0 = time.monotonic()
    assert await _fetch(lab, 100_000, 5) is not None
    assert time.monotonic() - t0 < 5
    assert _link_state(lab) == before


def test_fade_refuses_what_it_cannot_do(lab: SatLab) -> None:
    for args, text in ((["0"], "more than 0"), (["7200"], "at most 3600")):
        r = subprocess.run(
            [sys.executable, "-m", "pep.ops.cli", "lab", "fade", *args, "--prefix", lab.prefix],
            capture_output=True, text=True, timeout=30, cwd=REPO,
        )  # fmt: skip
        assert r.returncode != 0 and text in r.stderr, r.stderr
    r = subprocess.run(
        [sys.executable, "-m", "pep.ops.cli", "lab", "fade", "5", "--prefix", "nosuchlab"],
        capture_output=True, text=True, timeout=30, cwd=REPO,
    )  # fmt: skip
    assert r.returncode == 1 and "is not up" in r.stderr, r.stderr


async def test_the_fixtures_fade_and_its_cancellation(lab: SatLab) -> None:
    """SatLab.afade is `pep lab fade` for a trio test; cancelled, the link is back at once."""
    before = _link_state(lab)
    async with trio.open_nursery() as n:
        n.start_soon(lab.afade, 2.0)
        await trio.sleep(0.5)
        assert await _fetch(lab, 1000, 1.0) is None
    assert await _fetch(lab, 100_000, 5) is not None
    with trio.move_on_after(1.0):
        await lab.afade(600)
    assert await _fetch(lab, 100_000, 5) is not None
    assert _link_state(lab) == before
