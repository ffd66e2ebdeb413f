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


# /proc/net/netlink as the kernel writes it (af_netlink.c, netlink_seq_show): the second socket
# of protocol 12 was autobound to a port id that is not its process's pid.
NETLINK_TEXT = """\
sk               Eth Pid        Groups   Rmem     Wmem     Dump  Locks    Drops    Inode
0000000006446baa 0   0          00000000 0        0        0     2        0        4
00000000a1b2c3d4 12  4242       00000000 0        0        0     2        0        91001
00000000a1b2c3d5 12  4294963203 00000000 0        0        0     2        0        91002
00000000a1b2c3d6 0   4294963203 00000000 0        0        0     2        0        91003
"""


def test_a_queue_s_port_id_leads_to_its_socket_and_process(tmp_path: Path) -> None:
    """D2 (issue 20): who holds a queue, exactly, also when the port id is not a pid."""
    assert nfq_proc.netlink_inode(NETLINK_TEXT, 12, 4294963203) == 91002
    assert nfq_proc.netlink_inode(NETLINK_TEXT, 12, 4242) == 91001
    assert nfq_proc.netlink_inode(NETLINK_TEXT, 12, 7) is None
    assert nfq_proc.netlink_inode("garbage\nnot a line\n", 12, 4242) is None
    proc = tmp_path / "proc"
    for pid, target in (("10", "socket:[91002]"), ("11", "pipe:[5]"), ("self", "socket:[91002]")):
        (proc / pid / "fd").mkdir(parents=True)
        (proc / pid / "fd" / "3").symlink_to(target)
    (proc / "12").mkdir()  # no fd directory readable: skipped
    assert nfq_proc.socket_pids(91002, str(proc)) == [10]
