"""nfnetlink_queue codec: wire layout, real kernel messages, and totality of the decoder (pure)."""

from __future__ import annotations

import errno
import socket
import struct
import sys

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pep.capture import nfq_codec as nfq
from pep.capture.nfq_codec import Ack, Malformed, Packet, parse_messages
from tests.helpers.packets import (
    NF_INET_LOCAL_OUT,
    RAW,
    SYN_V4,
    SYN_V6,
    error_msg,
    nla,
    nlmsg,
    packet_msg,
)

little_endian_only = pytest.mark.skipif(
    sys.byteorder != "little", reason="expected bytes are written for a little-endian host"
)

# --- real kernel messages -------------------------------------------------------------------

# RAW, SYN_V4 and SYN_V6 were captured from a real kernel; tests/helpers/packets.py says how.


def test_captured_ipv4_syn_packet() -> None:
    assert parse_messages(RAW["packet_v4"]) == [
        Packet(
            queue=7,
            packet_id=1,
            hw_protocol=0x0800,
            hook=NF_INET_LOCAL_OUT,
            mark=0x2A,
            indev=None,
            outdev=1,
            payload=SYN_V4,
            cap_len=None,
        )
    ]


def test_captured_ipv6_syn_packet() -> None:
    (msg,) = parse_messages(RAW["packet_v6"])
    assert isinstance(msg, Packet)
    assert (msg.queue, msg.packet_id, msg.hw_protocol, msg.hook) == (7, 2, 0x86DD, 3)
    assert (msg.mark, msg.indev, msg.outdev, msg.cap_len) == (0x2A, None, 1, None)
    assert msg.payload == SYN_V6


def test_captured_truncated_packet_reports_cap_len() -> None:
    (msg,) = parse_messages(RAW["packet_v4_truncated"])
    assert isinstance(msg, Packet)
    assert msg.packet_id == 3
    assert len(msg.payload) == 40 and msg.cap_len == 60
    assert msg.payload[0] == 0x45


@pytest.mark.parametrize("name", ["ack_bind", "ack_params", "ack_unbind"])
def test_captured_acks(name: str) -> None:
    (msg,) = parse_messages(RAW[name])
    assert isinstance(msg, Ack) and msg.errno == 0


def test_captured_errors_are_positive_errnos() -> None:
    assert parse_messages(RAW["err_params_unbound"]) == [Ack(seq=3, errno=errno.ENODEV)]
    assert parse_messages(RAW["err_verdict_unknown_id"]) == [Ack(seq=9, errno=errno.ENOENT)]


def test_builders_match_requests_echoed_by_the_kernel() -> None:
    # An error reply carries our request as the kernel received it (after errno, offset 20).
    echoed = RAW["err_params_unbound"][20:]
    assert echoed == nfq.build_config(8, 3, copy_mode=nfq.NFQNL_COPY_PACKET, copy_range=256)
    # A successful ACK echoes the request header only.
    bind = nfq.build_config(7, 1, cmd=nfq.NFQNL_CFG_CMD_BIND, pf=socket.AF_INET)
    assert RAW["ack_bind"][20:36] == bind[:16]
    verdict = bytearray(nfq.build_verdict(7, 123456, nfq.NF_ACCEPT, seq=9))
    verdict[6:8] = struct.pack("=H", 0x1 | 0x4)  # the capture set NLM_F_ACK by hand
    assert RAW["err_verdict_unknown_id"][20:] == verdict


# --- wire layout of what we send --------------------------------------------------------------


@little_endian_only
def test_verdict_bytes() -> None:
    assert nfq.build_verdict(7, 1, nfq.NF_ACCEPT) == bytes.fromhex(
        "20000000" "0103" "0100" "00000000" "00000000"  # len 32, QUEUE<<8|VERDICT, REQUEST
        "00" "00" "0007"  # nfgenmsg: AF_UNSPEC, v0, queue 7 (be16)
        "0c00" "0200" "00000001" "00000001"  # VERDICT_HDR: ACCEPT, id 1 (be32)
    )  # fmt: skip
    assert nfq.build_verdict(7, 0x01020304, nfq.NF_DROP, mark=0x2A, seq=5) == bytes.fromhex(
        "28000000" "0103" "0100" "05000000" "00000000"
        "00" "00" "0007"
        "0c00" "0200" "00000000" "01020304"
        "0800" "0300" "0000002a"  # MARK
    )  # fmt: skip


@little_endian_only
def test_verdict_batch_bytes() -> None:
    assert nfq.build_verdict_batch(0x0102, 99, nfq.NF_ACCEPT, seq=1) == bytes.fromhex(
        "20000000" "0303" "0100" "01000000" "00000000"
        "00" "00" "0102"
        "0c00" "0200" "00000001" "00000063"
    )  # fmt: skip


@little_endian_only
def test_config_bytes() -> None:
    request_ack = "0500"  # NLM_F_REQUEST | NLM_F_ACK
    assert nfq.build_config(7, 1, cmd=nfq.NFQNL_CFG_CMD_BIND, pf=socket.AF_INET) == bytes.fromhex(
        "1c000000" "0203" + request_ack + "01000000" "00000000" "00000007"
        "0800" "0100" "01" "00" "0002"  # CMD: BIND, pad, pf AF_INET (be16)
    )  # fmt: skip
    assert nfq.build_config(
        7, 2, copy_mode=nfq.NFQNL_COPY_META, copy_range=0x10000, maxlen=4096,
        flags=nfq.NFQA_CFG_F_FAIL_OPEN | nfq.NFQA_CFG_F_GSO,
    ) == bytes.fromhex(
        "38000000" "0203" + request_ack + "02000000" "00000000" "00000007"
        "0900" "0200" "00010000" "01" "000000"  # PARAMS: nla_len 9, range be32, mode, pad
        "0800" "0300" "00001000"  # QUEUE_MAXLEN
        "0800" "0400" "00000005"  # MASK defaults to FLAGS
        "0800" "0500" "00000005"  # FLAGS
    )  # fmt: skip


def test_config_mask_and_flags() -> None:
    def flag_attrs(msg: bytes) -> dict[int, int]:
        attrs, a = {}, 20
        while a < len(msg):
            alen, atype = struct.unpack_from("=HH", msg, a)
            attrs[atype] = struct.unpack_from(">I", msg, a + 4)[0]
            a += (alen + 3) & ~3
        return attrs

    assert flag_attrs(nfq.build_config(1, 1, flags=1, mask=3)) == {4: 3, 5: 1}
    assert flag_attrs(nfq.build_config(1, 1, mask=nfq.NFQA_CFG_F_FAIL_OPEN)) == {4: 1, 5: 0}
    assert flag_attrs(nfq.build_config(1, 1, flags=0)) == {4: 0, 5: 0}
    assert len(nfq.build_config(1, 1)) == 20  # nothing asked, nothing sent


@pytest.mark.parametrize(
    "build",
    [
        lambda: nfq.build_verdict(70000, 1, nfq.NF_ACCEPT),
        lambda: nfq.build_verdict(1, -1, nfq.NF_ACCEPT),
        lambda: nfq.build_verdict(1, 1, nfq.NF_ACCEPT, mark=1 << 32),
        lambda: nfq.build_verdict_batch(1, 1 << 32, nfq.NF_ACCEPT),
        lambda: nfq.build_config(-1, 1),
        lambda: nfq.build_config(1, 1, cmd=256),
        lambda: nfq.build_config(1, 1, copy_mode=nfq.NFQNL_COPY_PACKET, copy_range=-1),
        lambda: nfq.build_config(1, 1 << 32),
    ],
)
def test_out_of_range_values_raise_codec_error(build: object) -> None:
    with pytest.raises(nfq.CodecError):
        build()  # type: ignore[operator]


@given(
    queue=st.integers(0, 0xFFFF),
    packet_id=st.integers(0, 0xFFFFFFFF),
    verdict=st.sampled_from([nfq.NF_DROP, nfq.NF_ACCEPT, nfq.NF_REPEAT]),
    mark=st.none() | st.integers(0, 0xFFFFFFFF),
    seq=st.integers(0, 0xFFFFFFFF),
    batch=st.booleans(),
)
def test_verdict_header_fields(
    queue: int, packet_id: int, verdict: int, mark: int | None, seq: int, batch: bool
) -> None:
    build = nfq.build_verdict_batch if batch else nfq.build_verdict
    msg = build(queue, packet_id, verdict, mark, seq)
    length, msg_type, flags, got_seq, pid = struct.unpack_from("=IHHII", msg)
    assert length == len(msg) == (40 if mark is not None else 32)
    assert msg_type == (3 << 8) | (3 if batch else 1)
    assert (flags, got_seq, pid) == (1, seq, 0)  # NLM_F_REQUEST only: no ACK per verdict
    assert struct.unpack_from(">H", msg, 18) == (queue,)
    assert struct.unpack_from("=HH", msg, 20) == (12, 2)
    assert struct.unpack_from(">II", msg, 24) == (verdict, packet_id)
    if mark is not None:
        assert struct.unpack_from("=HH", msg, 32) == (8, 3)
        assert struct.unpack_from(">I", msg, 36) == (mark,)


# --- walking buffers --------------------------------------------------------------------------


def test_every_message_of_a_buffer_is_returned_in_order() -> None:
    noop = nlmsg(1, b"")  # NLMSG_NOOP
    done = nlmsg(3, b"\0\0\0\0")  # NLMSG_DONE
    other = nlmsg(0x0302, b"\0\0\0\7")  # a CONFIG message: not ours to decode
    buf = RAW["ack_bind"] + noop + RAW["packet_v4"] + done + other + RAW["packet_v6"]
    msgs = parse_messages(buf)
    assert [type(m) for m in msgs] == [Ack, Packet, Packet]
    assert [m.packet_id for m in msgs[1:]] == [1, 2]  # type: ignore[union-attr]


def test_messages_are_walked_at_4_byte_alignment() -> None:
    odd = packet_msg(packet_id=1, payload=None) + struct.pack("=HH", 9, 10) + b"\x45" * 5
    odd = struct.pack("=I", len(odd)) + odd[4:]  # PAYLOAD unpadded: nlmsg_len 45
    assert len(odd) % 4 != 0
    padded = odd + b"\0" * (-len(odd) % 4)
    msgs = parse_messages(padded + packet_msg(packet_id=2, payload=b"xyz"))
    assert [(m.packet_id, m.payload) for m in msgs] == [(1, b"\x45" * 5), (2, b"xyz")]  # type: ignore[union-attr]
    # The last message may end unpadded at the end of the buffer.
    assert [m.packet_id for m in parse_messages(padded + odd)] == [1, 1]  # type: ignore[union-attr]


def test_bytearray_and_memoryview_input() -> None:
    buf = bytearray(4096)
    data = RAW["packet_v4"] + RAW["packet_v6"]
    buf[: len(data)] = data
    view = memoryview(buf)
    assert parse_messages(view[: len(data)]) == parse_messages(data)
    assert parse_messages(bytearray(data)) == parse_messages(data)
    msg = parse_messages(view[: len(data)])[0]
    assert type(msg.payload) is bytes  # type: ignore[union-attr]


def test_packet_round_trip_with_all_attributes() -> None:
    msg = packet_msg(
        9, 77, b"\x60" + b"\0" * 39, hw_protocol=0x86DD, hook=0, mark=5, indev=3, outdev=4,
        cap_len=1500, extra=nla(4, b"\0" * 16) + nla(9, b"\0" * 12),  # TIMESTAMP, HWADDR
    )  # fmt: skip
    assert parse_messages(msg) == [Packet(9, 77, 0x86DD, 0, 5, 3, 4, b"\x60" + b"\0" * 39, 1500)]


def test_attribute_type_flags_are_masked() -> None:
    body = struct.pack("=BBH", 2, 0, socket.htons(7)) + nla(1, struct.pack(">IHB", 5, 0x800, 1))
    body += nla(0x4000 | 3, struct.pack(">I", 9)) + nla(0x8000 | 10, b"abcd")
    (msg,) = parse_messages(nlmsg(0x0300, body))
    assert isinstance(msg, Packet)
    assert (msg.mark, msg.payload) == (9, b"abcd")


def test_missing_payload_is_empty() -> None:
    (msg,) = parse_messages(packet_msg(payload=None))
    assert isinstance(msg, Packet) and msg.payload == b"" and msg.cap_len is None


def test_ack_errno_is_stored_positive() -> None:
    assert parse_messages(error_msg(4, -errno.EPERM)) == [Ack(4, errno.EPERM)]
    assert parse_messages(error_msg(5, 0)) == [Ack(5, 0)]


# --- malformed input --------------------------------------------------------------------------


def test_empty_buffer() -> None:
    assert parse_messages(b"") == []


def test_truncated_header_ends_the_walk() -> None:
    msgs = parse_messages(RAW["ack_bind"] + b"\x10\0\0\0\0\0")
    assert msgs[0] == Ack(1, 0)
    assert isinstance(msgs[1], Malformed) and msgs[1].packet_id is None
    assert "truncated netlink header" in msgs[1].reason
    assert len(msgs) == 2


@pytest.mark.parametrize("length", [0, 15, 10_000])
def test_bad_nlmsg_len_ends_the_walk(length: int) -> None:
    bad = bytearray(RAW["packet_v4"])
    struct.pack_into("=I", bad, 0, length)
    msgs = parse_messages(RAW["packet_v6"] + bytes(bad) + RAW["packet_v4"])
    assert isinstance(msgs[0], Packet) and msgs[0].packet_id == 2
    assert len(msgs) == 2 and isinstance(msgs[1], Malformed)
    assert msgs[1].packet_id is None and "length" in msgs[1].reason


def test_bad_attribute_after_packet_hdr_keeps_the_packet_id() -> None:
    bad_attr = struct.pack("=HH", 200, 10) + b"\0" * 8  # claims 200 bytes, message is shorter
    buf = packet_msg(3, 41, payload=None, extra=bad_attr) + RAW["packet_v4"]
    msgs = parse_messages(buf)
    assert isinstance(msgs[0], Malformed)
    assert (msgs[0].packet_id, msgs[0].queue) == (41, 3)
    assert isinstance(msgs[1], Packet)  # the walk goes on after a bad PACKET


@pytest.mark.parametrize("alen", [0, 1, 2, 3])
def test_attribute_shorter_than_its_header(alen: int) -> None:
    extra = struct.pack("=HH", alen, 3) + b"\0" * 4
    (msg,) = parse_messages(packet_msg(packet_id=8, payload=None, extra=extra))
    assert isinstance(msg, Malformed) and msg.packet_id == 8


def test_short_u32_attribute() -> None:
    extra = nla(3, b"\0\0")  # MARK with 2 bytes
    (msg,) = parse_messages(packet_msg(packet_id=8, extra=extra))
    assert isinstance(msg, Malformed) and msg.packet_id == 8 and msg.queue == 7


def test_packet_without_packet_hdr() -> None:
    body = struct.pack("=BBH", 2, 0, socket.htons(7)) + nla(10, b"\x45" * 20)
    assert parse_messages(nlmsg(0x0300, body)) == [
        Malformed("PACKET message without PACKET_HDR", None, 7)
    ]


def test_short_packet_hdr() -> None:
    body = struct.pack("=BBH", 2, 0, socket.htons(7)) + nla(1, b"\0\0\0\1\x08")
    (msg,) = parse_messages(nlmsg(0x0300, body))
    assert isinstance(msg, Malformed) and msg.packet_id is None and msg.queue == 7


def test_packet_without_nfgenmsg() -> None:
    (msg,) = parse_messages(nlmsg(0x0300, b""))
    assert isinstance(msg, Malformed) and msg.queue is None


def test_short_error_message() -> None:
    msgs = parse_messages(nlmsg(2, b"\0\0") + b"\0\0" + RAW["ack_bind"])
    assert isinstance(msgs[0], Malformed)
    assert msgs[1] == Ack(1, 0)


def test_trailing_bytes_shorter_than_an_attribute_header_are_tolerated() -> None:
    msg = packet_msg(packet_id=4, payload=b"\x45" * 4) + b"\0\0"
    msg = struct.pack("=I", len(msg)) + msg[4:]
    (got,) = parse_messages(msg)
    assert isinstance(got, Packet) and got.payload == b"\x45" * 4


def _check(msgs: object) -> None:
    assert isinstance(msgs, list)
    for m in msgs:
        assert isinstance(m, Packet | Ack | Malformed)


@given(st.binary(max_size=512))
def test_never_raises_on_arbitrary_bytes(data: bytes) -> None:
    _check(parse_messages(data))


@given(
    st.sampled_from(sorted(RAW)),
    st.lists(st.tuples(st.integers(0, 10_000), st.integers(0, 255)), max_size=8),
    st.integers(0, 10_000),
)
@settings(max_examples=500)
def test_never_raises_on_mutated_real_messages(
    name: str, flips: list[tuple[int, int]], cut: int
) -> None:
    buf = bytearray(RAW[name] + RAW["packet_v4"])
    for pos, value in flips:
        buf[pos % len(buf)] = value
    _check(parse_messages(bytes(buf[: cut % (len(buf) + 1)])))


@pytest.mark.parametrize("name", sorted(RAW))
def test_every_truncation_of_real_messages(name: str) -> None:
    raw = RAW[name]
    for cut in range(len(raw)):
        msgs = parse_messages(raw[:cut])
        _check(msgs)
        if cut:  # a cut message never passes for a whole one
            assert len(msgs) == 1 and isinstance(msgs[0], Malformed)


@given(
    queue=st.integers(0, 0xFFFF),
    packet_id=st.integers(0, 0xFFFFFFFF),
    payload=st.binary(max_size=300),
    mark=st.none() | st.integers(1, 0xFFFFFFFF),
    indev=st.none() | st.integers(0, 0xFFFFFFFF),
    cap_len=st.none() | st.integers(0, 0xFFFFFFFF),
    count=st.integers(1, 4),
)
def test_packet_round_trip(
    queue: int,
    packet_id: int,
    payload: bytes,
    mark: int | None,
    indev: int | None,
    cap_len: int | None,
    count: int,
) -> None:
    one = packet_msg(queue, packet_id, payload, mark=mark, indev=indev, cap_len=cap_len)
    one += b"\0" * (-len(one) % 4)
    expected = Packet(queue, packet_id, 0x0800, 1, mark or 0, indev, None, payload, cap_len)
    assert parse_messages(one * count) == [expected] * count
