"""The SYN reader's sans-IO core: every queued packet gets exactly one verdict."""

from __future__ import annotations

import struct

from pep import nfq_codec as nfq
from pep.flows import FlowTable
from pep.syn_queue import SynCounters, decide
from tests.test_nfq_codec import RAW, SYN_V4, packet_msg

SPLIT, MASK = 0x5E9, 0xFFFF


def verdicts(data: bytes) -> list[tuple[int, int, int, int | None]]:
    """(queue, packet id, verdict, mark or None) of each VERDICT message in a send buffer."""
    out, off = [], 0
    while off < len(data):
        length, mtype = struct.unpack_from("=IH", data, off)
        assert mtype == (3 << 8) | nfq.NFQNL_MSG_VERDICT
        (queue,) = struct.unpack_from(">H", data, off + 18)
        mark, verdict, pid, a = None, -1, -1, off + 20
        while a < off + length:
            alen, atype = struct.unpack_from("=HH", data, a)
            if atype == 2:
                verdict, pid = struct.unpack_from(">II", data, a + 4)
            elif atype == 3:
                (mark,) = struct.unpack_from(">I", data, a + 4)
            a += (alen + 3) & ~3
        out.append((queue, pid, verdict, mark))
        off += length
    return out


def run(buf: bytes) -> tuple[list[tuple[int, int, int, int | None]], SynCounters, FlowTable]:
    flows, counters = FlowTable(100, 30), SynCounters()
    return verdicts(decide(nfq.parse_messages(buf), flows, counters, SPLIT, MASK)), counters, flows


def test_real_captured_syn_is_recorded_and_marked_keeping_foreign_mark_bits() -> None:
    # The captured packet already carries mark 0x2a (set by a test rule); other tools' bits
    # outside the mask must survive.
    buf = RAW["packet_v4"]
    [pkt] = nfq.parse_messages(buf)
    assert isinstance(pkt, nfq.Packet)
    out, c, flows = run(buf)
    assert out == [(pkt.queue, pkt.packet_id, nfq.NF_ACCEPT, (pkt.mark & ~MASK) | SPLIT)]
    assert (c.queued, c.split, c.unparsable) == (1, 1, 0)
    flow = flows.claim(("127.0.0.1", 0xB216))
    assert flow is not None and flow.original_dst == ("127.0.0.1", 5001)


def test_foreign_mark_bits_outside_mask_survive() -> None:
    out, _, _ = run(packet_msg(3, 9, SYN_V4, mark=0xABC_0000 | 0x1234))
    assert out == [(3, 9, nfq.NF_ACCEPT, 0xABC_0000 | SPLIT)]


def test_non_syn_is_accepted_unmarked_and_counted() -> None:
    ack = bytearray(SYN_V4)
    ack[33] = 0x10  # TCP flags: ACK only
    out, c, flows = run(packet_msg(0, 4, bytes(ack)) + packet_msg(0, 5, b"\x45garbage"))
    assert out == [(0, 4, nfq.NF_ACCEPT, None), (0, 5, nfq.NF_ACCEPT, None)]
    assert (c.queued, c.split, c.unparsable) == (2, 0, 2) and len(flows) == 0


def test_every_packet_of_a_buffer_gets_one_verdict_in_order() -> None:
    buf = b"".join(packet_msg(1, i, SYN_V4 if i % 2 else b"") for i in range(1, 41))
    out, c, _ = run(buf)
    assert [v[1] for v in out] == list(range(1, 41))
    assert all(v[2] == nfq.NF_ACCEPT for v in out)
    assert [v[3] for v in out] == [SPLIT if i % 2 else None for i in range(1, 41)]
    assert (c.split, c.unparsable) == (20, 20)


def test_malformed_with_readable_id_is_still_accepted() -> None:
    good = packet_msg(2, 77, SYN_V4)
    # Corrupt the attribute after PACKET_HDR: nla_len larger than the message.
    bad = bytearray(good)
    struct.pack_into("=H", bad, 20 + 12, 0xFFF0)
    out, c, _ = run(bytes(bad))
    assert out == [(2, 77, nfq.NF_ACCEPT, None)]
    assert c.malformed == 1


def test_acks_and_errors_produce_no_verdicts() -> None:
    out, c, _ = run(RAW["ack_bind"] + RAW["err_verdict_unknown_id"])
    assert out == [] and c.queued == 0
