"""The one parser of /proc/net/netfilter/nfnetlink_queue (pep.capture.nfq_proc) and its users."""

from __future__ import annotations

from pathlib import Path

import pytest

from pep.capture import nfq_proc
from pep.lab.delayline import read_proc_queues
from tests.helpers.packets import PROC_TEXT


def test_parse_nfqueue_filters_queue_range() -> None:
    rows = nfq_proc.parse(PROC_TEXT, (1, 7))
    assert [r["queue"] for r in rows] == [1, 7]
    assert rows[0] == {
        "queue": 1,
        "portid": 27182,
        "waiting": 0,
        "copy_mode": 2,
        "copy_range": 256,
        "queue_dropped": 5,
        "user_dropped": 7,
        "last_id": 99,
    }
    assert nfq_proc.parse("garbage\n\n") == []


def test_every_row_without_a_range_and_odd_lines_skipped() -> None:
    text = "queue portid waiting\n" + PROC_TEXT + "    3  1 2\n    4 -1 0 2 256 0 0 0 1\n"
    assert [r["queue"] for r in nfq_proc.parse(text)] == [0, 1, 7]


def test_read_parses_the_file_and_raises_when_it_cannot(tmp_path: Path) -> None:
    proc = tmp_path / "nfnetlink_queue"
    proc.write_text(PROC_TEXT)
    assert nfq_proc.read((0, 0), str(proc)) == nfq_proc.parse(PROC_TEXT, (0, 0))
    with pytest.raises(FileNotFoundError):
        nfq_proc.read(path=str(tmp_path / "none"))


def test_delay_line_stats_keep_their_names(tmp_path: Path) -> None:
    proc = tmp_path / "nfnetlink_queue"
    proc.write_text(PROC_TEXT)
    assert read_proc_queues(str(proc))[1] == {
        "queued_now": 0,
        "queue_dropped": 5,
        "user_dropped": 7,
        "last_id": 99,
    }
    assert read_proc_queues(str(tmp_path / "none")) == {}
