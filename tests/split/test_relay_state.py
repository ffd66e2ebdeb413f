"""The relay's state tables (pep.split.relay_state) and the session's admission decisions
(pep.split.admission): pure, one row per case."""

from __future__ import annotations

import logging

import pytest

from pep.split import admission
from pep.split.relay_state import IN, OUT, ending, interest, state


@pytest.mark.parametrize(
    ("reading_eof", "reading_pending", "writing_pending", "mask"),
    [
        (False, 0, 0, IN),  # idle both ways: wait for input
        (False, 0, 100, IN | OUT),  # our input is open, our output is full
        (False, 65536, 0, 0),  # our bytes wait in the pipe for the other side: do not read
        (False, 65536, 100, OUT),
        (True, 0, 0, 0),  # our FIN was passed on, nothing to write: not polled at all
        (True, 0, 7, OUT),  # half-closed, the other direction still writes into us
    ],
)
def test_what_a_socket_is_polled_for(
    reading_eof: bool, reading_pending: int, writing_pending: int, mask: int
) -> None:
    assert interest(reading_eof, reading_pending, writing_pending) == mask


@pytest.mark.parametrize(
    ("relaying", "up_eof", "down_eof", "name"),
    [
        (False, False, False, "connecting"),
        (True, False, False, "open"),
        (True, True, False, "client-done"),
        (True, False, True, "server-done"),
        (True, True, True, "closing"),
    ],
)
def test_state_names(relaying: bool, up_eof: bool, down_eof: bool, name: str) -> None:
    assert state(relaying, up_eof, down_eof) == name


@pytest.mark.parametrize(
    ("failure", "idled", "cancelled", "result"),
    [
        (None, False, False, ("eof", True)),
        (None, True, False, ("idle timeout", True)),
        (None, False, True, ("cancelled", False)),
        ("upstream error: Connection reset by peer", False, False,
         ("upstream error: Connection reset by peer", False)),
        ("client error: x", True, True, ("client error: x", False)),  # the failure wins
        (None, True, True, ("idle timeout", True)),  # idled out before the stop came
    ],
)  # fmt: skip
def test_how_a_relay_ends(
    failure: str | None, idled: bool, cancelled: bool, result: tuple[str, bool]
) -> None:
    assert ending(failure, idled, cancelled) == result


@pytest.mark.parametrize(
    ("dst", "local", "counter", "level"),
    [
        (None, False, "not_redirected", logging.INFO),
        (("10.0.0.1", 5000), True, "refused_local", logging.WARNING),
        (("10.9.0.1", 80), False, None, None),
    ],
)
def test_who_is_refused(
    dst: tuple[str, int] | None, local: bool, counter: str | None, level: int | None
) -> None:
    refused = admission.refusal(dst, local)
    assert (refused.counter, refused.level) == (counter, level) if refused else counter is None


@pytest.mark.parametrize(
    ("recorded", "note"),
    [(None, "flow_missing"), (("10.9.0.2", 80), "flow_mismatch"), (("10.9.0.1", 80), None)],
)
def test_what_the_syn_record_says(recorded: tuple[str, int] | None, note: str | None) -> None:
    assert admission.flow_check(recorded, ("10.9.0.1", 80)) == note
