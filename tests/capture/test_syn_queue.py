"""The SYN reader's sans-IO core: every queued packet gets exactly one verdict."""

from __future__ import annotations

import struct

import pytest

from pep.capture import nfq_codec as nfq
from pep.capture.flows import FlowTable
from pep.capture.syn_queue import Decider, SynCounters, Verdict, encode
from pep.config import build
from tests.helpers.packets import RAW, SYN_V4, packet_msg

SPLIT, MASK = 0x5E9, 0xFFFF
VERDICT, BATCH = (3 << 8) | nfq.NFQNL_MSG_VERDICT, (3 << 8) | nfq.NFQNL_MSG_VERDICT_BATCH


def sent(data: bytes) -> list[tuple[str, int, int, int, int | None]]:
    """(kind, queue, packet id, verdict, mark or None) of each message in a send buffer."""
    out, off = [], 0
    while off < len(data):
        length, mtype = struct.unpack_from("=IH", data, off)
        assert mtype in (VERDICT, BATCH)
        (queue,) = struct.unpack_from(">H", data, off + 18)
        mark, verdict, pid, a = None, -1, -1, off + 20
        while a < off + length:
            alen, atype = struct.unpack_from("=HH", data, a)
            if atype == 2:
                verdict, pid = struct.unpack_from(">II", data, a + 4)
            elif atype == 3:
                (mark,) = struct.unpack_from(">I", data, a + 4)
            a += (alen + 3) & ~3
        out.append(("batch" if mtype == BATCH else "one", queue, pid, verdict, mark))
        off += length
    return out


def syn_with(sport: int = 0xB216, dport: int = 5001, dst: bytes | None = None) -> bytes:
    """The captured SYN with another source/destination port or destination address."""
    p = bytearray(SYN_V4)
    struct.pack_into(">HH", p, 20, sport, dport)
    if dst is not None:
        p[16:20] = dst
    return bytes(p)


def decider(**settings: object) -> tuple[Decider, SynCounters, FlowTable]:
    cfg = build({"interfaces": ["eth1"], **settings})
    flows, counters = FlowTable(100, 30), SynCounters()
    return Decider(cfg, flows, counters), counters, flows


def run(buf: bytes, **settings: object) -> tuple[list, SynCounters, FlowTable]:
    d, c, flows = decider(**settings)
    verdicts, holds = d.decide(nfq.parse_messages(buf))
    assert holds == []
    return [(v.queue, v.packet_id, v.verdict, v.mark) for v in verdicts], c, flows


def test_real_captured_syn_is_recorded_and_marked_keeping_foreign_mark_bits() -> None:
    # The captured packet already carries mark 0x2a (set by a test rule).
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


def test_tproxy_mode_repeats_split_syns() -> None:
    out, _, _ = run(packet_msg(0, 1, SYN_V4), mode="tproxy")
    assert out == [(0, 1, nfq.NF_REPEAT, SPLIT)]


def test_non_syn_is_accepted_unmarked_and_counted() -> None:
    ack = bytearray(SYN_V4)
    ack[33] = 0x10  # TCP flags: ACK only
    out, c, flows = run(packet_msg(0, 4, bytes(ack)) + packet_msg(0, 5, b"\x45garbage"))
    assert out == [(0, 4, nfq.NF_ACCEPT, None), (0, 5, nfq.NF_ACCEPT, None)]
    assert (c.queued, c.split, c.unparsable) == (2, 0, 2) and len(flows) == 0


def test_malformed_with_readable_id_is_still_accepted() -> None:
    bad = bytearray(packet_msg(2, 77, SYN_V4))
    struct.pack_into("=H", bad, 20 + 12, 0xFFF0)  # attribute after PACKET_HDR: too long
    out, c, _ = run(bytes(bad))
    assert out == [(2, 77, nfq.NF_ACCEPT, None)]
    assert c.malformed == 1


def test_acks_and_errors_produce_no_verdicts() -> None:
    out, c, _ = run(RAW["ack_bind"] + RAW["err_verdict_unknown_id"])
    assert out == [] and c.queued == 0


def test_policy_first_match_wins_and_counts_per_rule() -> None:
    policy = [
        {"name": "ssh", "action": "bypass", "dport": [22]},
        {"name": "lan", "action": "bypass", "dst": ["10.0.0.0/8"], "dport": "1-1000"},
        {"name": "web", "action": "split", "dport": ["80", "8000-8100"]},
    ]
    buf = b"".join(
        packet_msg(0, i, syn_with(1000 + i, port, dst))
        for i, (port, dst) in enumerate(
            [(22, None), (80, bytes([10, 1, 2, 3])), (80, None), (8050, None), (9000, None)], 1
        )
    )
    d, c, _ = decider(policy=policy, default_action="bypass")
    verdicts, _ = d.decide(nfq.parse_messages(buf))
    assert [v.mark for v in verdicts] == [None, None, SPLIT, SPLIT, None]
    assert d.policy.hits == {"ssh": 1, "lan": 1, "web": 2, "default": 1}
    assert (c.split, c.bypassed) == (2, 3)


def test_interface_rule_uses_ingress_name() -> None:
    d, _, _ = decider(policy=[{"action": "bypass", "interface": ["wan0"]}])
    d.ifname = {5: "wan0", 6: "lan0"}.get
    msgs = nfq.parse_messages(
        packet_msg(0, 1, syn_with(1), indev=5) + packet_msg(0, 2, syn_with(2), indev=6)
    )
    verdicts, _ = d.decide(msgs)
    assert [v.mark for v in verdicts] == [None, SPLIT]


def test_admission_control_bypasses_at_capacity() -> None:
    d, c, flows = decider(max_connections=5)
    live = [3]
    d.load = lambda: live[0]
    buf = b"".join(packet_msg(0, i, syn_with(2000 + i)) for i in range(1, 6))
    verdicts, _ = d.decide(nfq.parse_messages(buf))
    # 3 live + 2 SYNs let through (waiting in the flow table) = 5: the rest bypass.
    assert [v.mark for v in verdicts] == [SPLIT, SPLIT, None, None, None]
    assert (c.split, c.admission_bypassed, len(flows)) == (2, 3, 2)


def test_strict_mode_holds_instead_of_verdicting() -> None:
    d, c, flows = decider(syn_verdict="after-upstream")
    verdicts, holds = d.decide(nfq.parse_messages(packet_msg(0, 7, SYN_V4) + packet_msg(0, 8)))
    assert verdicts == [Verdict(0, 8, nfq.NF_ACCEPT, None)]  # the non-SYN is not held
    [hold] = holds
    assert hold.split == Verdict(0, 7, nfq.NF_ACCEPT, SPLIT)
    assert hold.key == ("127.0.0.1", 0xB216)
    assert len(flows) == 0 and c.split == 0  # recorded only once upstream is connected


def test_encode_batches_runs_of_equal_verdicts() -> None:
    vs = [Verdict(0, i, nfq.NF_ACCEPT, SPLIT) for i in (1, 2, 3)]
    vs += [Verdict(0, 4, nfq.NF_ACCEPT, None)]
    vs += [Verdict(0, i, nfq.NF_ACCEPT, SPLIT) for i in (5, 6)]
    data, batches = encode(vs, batch=True)
    assert sent(data) == [
        ("batch", 0, 3, nfq.NF_ACCEPT, SPLIT),
        ("one", 0, 4, nfq.NF_ACCEPT, None),
        ("batch", 0, 6, nfq.NF_ACCEPT, SPLIT),
    ]
    assert batches == 2


@pytest.mark.parametrize("n", [1, 2, 17])
def test_encode_without_batching_is_one_verdict_per_packet(n: int) -> None:
    vs = [Verdict(1, i, nfq.NF_ACCEPT, SPLIT) for i in range(n)]
    data, batches = encode(vs, batch=False)
    assert sent(data) == [("one", 1, i, nfq.NF_ACCEPT, SPLIT) for i in range(n)]
    assert batches == 0


def test_every_packet_of_a_buffer_gets_one_verdict_in_order() -> None:
    buf = b"".join(packet_msg(1, i, SYN_V4 if i % 2 else b"") for i in range(1, 41))
    d, c, _ = decider()
    verdicts, _ = d.decide(nfq.parse_messages(buf))
    assert [v.packet_id for v in verdicts] == list(range(1, 41))
    assert [v.mark for v in verdicts] == [SPLIT if i % 2 else None for i in range(1, 41)]
    assert (c.split, c.unparsable) == (20, 20)
