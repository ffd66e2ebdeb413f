"""The relay's state, as tables (h11's ``_state.py`` style): what each socket is polled for,
what a connection's state is called, and how it ends. Pure; the engine (pep.split.relay) and
``pep status`` (through pep.split.connections) both read these, so they cannot disagree.

A connection has two directions (client -> upstream "up", upstream -> client "down"). Each
direction is, at any time:

- *reading*: nothing waits in its pipe, no EOF yet: its source is polled for input;
- *pending*: bytes wait in its pipe for the destination to take them: its source is not read
  (the pipe is the only buffer, so memory stays bounded), its destination is polled for
  output while it is full;
- *done*: its source's FIN was read and passed on (``shutdown(SHUT_WR)`` on the destination,
  RFC 9293 section 3.6 half-close).

The connection ends cleanly (FIN after the data) when both directions are done or it idled
out; with an RST to both sides when one side failed or the daemon stopped, so that neither
peer takes a cut-off transfer for a complete one.

``RelayStats`` is what the engine reports of one connection while it runs (bytes each way,
which FINs were passed on, why it ended): what ``pep status`` and the link's sharer read.
"""

from __future__ import annotations

import select
from dataclasses import dataclass

__all__ = ["ENDINGS", "INTEREST", "STATES", "RelayStats", "ending", "interest", "state"]

IN, OUT = select.EPOLLIN, select.EPOLLOUT


@dataclass(slots=True)
class RelayStats:
    """Live counters of one connection, readable while the relay runs."""

    up: int = 0  # client -> server bytes
    down: int = 0  # server -> client bytes
    close_reason: str = ""
    # The FIN read from one side has been passed on (half-closed), for `pep status`.
    up_eof: bool = False
    down_eof: bool = False


# What one socket is polled for, by (its own direction may read, the direction writing into
# it has bytes pending).
INTEREST: dict[tuple[bool, bool], int] = {
    (True, False): IN,
    (True, True): IN | OUT,
    (False, False): 0,
    (False, True): OUT,
}


def interest(reading_eof: bool, reading_pending: int, writing_pending: int) -> int:
    """The epoll mask of a socket whose own direction is at ``reading_eof`` /
    ``reading_pending`` and into which ``writing_pending`` bytes wait to be written."""
    return INTEREST[(not reading_eof and not reading_pending, writing_pending > 0)]


# A live connection's state as pep status shows it, by (the client's FIN passed on, the
# server's FIN passed on).
STATES: dict[tuple[bool, bool], str] = {
    (False, False): "open",
    (True, False): "client-done",  # the client sent its FIN, the server is still sending
    (False, True): "server-done",
    (True, True): "closing",
}


def state(relaying: bool, up_eof: bool, down_eof: bool) -> str:
    """``connecting`` until the relay starts, then the entry of STATES."""
    return STATES[(up_eof, down_eof)] if relaying else "connecting"


# How a relay ends: (close_reason, clean) by (a side failed, it idled out, it was cancelled
# before either). clean: FIN after the data to both; not clean: RST to both.
ENDINGS: dict[tuple[bool, bool, bool], tuple[str | None, bool]] = {
    (False, False, False): ("eof", True),  # both directions done
    (False, True, False): ("idle timeout", True),
    (False, False, True): ("cancelled", False),  # the daemon is stopping
    (True, False, False): (None, False),  # the failure's own text, e.g. "upstream error: ..."
}


def ending(failure: str | None, idled: bool, cancelled: bool) -> tuple[str, bool]:
    """(close_reason, clean) of a relay that ended this way. A failure wins over the rest
    (it ended the relay); an idle timeout over a cancellation that came after it."""
    failed = failure is not None
    reason, clean = ENDINGS[(failed, idled and not failed, cancelled and not failed and not idled)]
    return (failure if reason is None else reason), clean
