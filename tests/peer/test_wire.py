"""The PEP-to-PEP wire format: round trips, refusals, and parsers total on any bytes."""

from __future__ import annotations

import os

import pytest
from hypothesis import given
from hypothesis import strategies as st

from pep.peer import wire as w

KEY = bytes(range(32))


def test_handshake_round_trip_proves_the_key_both_ways() -> None:
    near_nonce, far_nonce = os.urandom(16), os.urandom(16)
    hello, used = w.parse_hello(w.encode_hello(near_nonce))  # type: ignore[misc]
    assert (hello.version, hello.nonce, used) == (1, near_nonce, w.HELLO_LEN)
    proof = w.far_proof(KEY, hello.nonce, far_nonce)
    challenge, used = w.parse_challenge(w.encode_challenge(far_nonce, proof))  # type: ignore[misc]
    assert used == w.CHALLENGE_LEN
    assert w.verify(w.far_proof(KEY, near_nonce, challenge.nonce), challenge.proof)
    answer = w.near_proof(KEY, near_nonce, far_nonce)
    got, used = w.parse_answer(answer)  # type: ignore[misc]
    assert w.verify(w.near_proof(KEY, near_nonce, far_nonce), got) and used == 32
    assert w.parse_ready(w.READY) == 1


def test_proofs_depend_on_the_key_the_side_and_both_nonces() -> None:
    a, b = os.urandom(16), os.urandom(16)
    proof = w.near_proof(KEY, a, b)
    assert not w.verify(proof, w.near_proof(b"x" * 32, a, b))  # another key
    assert not w.verify(proof, w.far_proof(KEY, a, b))  # the other side's label
    assert not w.verify(proof, w.near_proof(KEY, a, os.urandom(16)))  # a replayed answer


def test_partial_messages_need_more() -> None:
    hello = w.encode_hello(os.urandom(16))
    for n in range(len(hello)):
        assert w.parse_hello(hello[:n]) is None
    assert w.parse_ready(b"") is None
    assert w.parse_status(b"") is None


@pytest.mark.parametrize(
    ("data", "message"),
    [
        (b"GET / HTTP/1.1\r\n", "not a pep peer connection"),
        (b"PEPP\x02" + bytes(16), "version 2"),
        (b"\x16\x03\x01", "not a pep peer connection"),  # a TLS ClientHello
    ],
)
def test_garbage_and_other_versions_are_refused(data: bytes, message: str) -> None:
    with pytest.raises(w.WireError, match=message):
        w.parse_hello(data)


@pytest.mark.parametrize(
    "flow",
    [
        w.Flow(("203.0.113.9", 443), ("192.168.7.20", 51234)),
        w.Flow(("2001:db8::1", 80), ("fd00::2", 1), transparent=True),
    ],
)
def test_flow_header_round_trip(flow: w.Flow) -> None:
    data = w.encode_flow(flow) + b"GET / HTTP/1.1\r\n"
    got, used = w.parse_flow(data)  # type: ignore[misc]
    assert got == flow
    assert data[used:] == b"GET / HTTP/1.1\r\n"  # the client's bytes follow at once
    for n in range(used):
        assert w.parse_flow(data[:n]) is None


@pytest.mark.parametrize(
    ("data", "message"),
    [
        (b"X", "expected a flow header"),
        (b"F\x05\x00\x00\x50\x00\x01", "family 5"),
        (b"F\x04\x80\x00\x50\x00\x01", "unknown flags"),
        (b"F\x04\x00\x00\x00\x00\x01", "port 0"),
    ],
)
def test_bad_flow_headers_are_refused(data: bytes, message: str) -> None:
    with pytest.raises(w.WireError, match=message):
        w.parse_flow(data)


def test_a_flow_is_of_one_family() -> None:
    with pytest.raises(ValueError, match="one family"):
        w.encode_flow(w.Flow(("10.0.0.1", 80), ("::1", 1)))


def test_status_bytes() -> None:
    assert w.parse_status(bytes([w.CONNECTED])) == w.CONNECTED
    assert w.STATUS_TEXT[w.REFUSED] == "connect refused"
    with pytest.raises(w.WireError, match="unknown status"):
        w.parse_status(b"\x63")
    with pytest.raises(w.WireError):
        w.parse_ready(b"\x00")


@given(st.binary(max_size=120))
def test_every_parser_is_total(data: bytes) -> None:
    for parse in (
        w.parse_hello,
        w.parse_challenge,
        w.parse_answer,
        w.parse_ready,
        w.parse_flow,
        w.parse_status,
    ):
        try:
            result = parse(data)
        except w.WireError:
            continue
        if isinstance(result, tuple):
            assert 0 < result[1] <= len(data)


@given(
    st.sampled_from([4, 6]),
    st.integers(1, 65535),
    st.integers(0, 65535),
    st.binary(min_size=16, max_size=16),
    st.binary(min_size=16, max_size=16),
    st.booleans(),
)
def test_flow_headers_round_trip_for_any_addresses(
    family: int, dport: int, sport: int, a: bytes, b: bytes, transparent: bool
) -> None:
    import ipaddress

    make = ipaddress.IPv4Address if family == 4 else ipaddress.IPv6Address
    n = 4 if family == 4 else 16
    flow = w.Flow((str(make(a[:n])), dport), (str(make(b[:n])), sport), transparent)
    assert w.parse_flow(w.encode_flow(flow)) == (flow, 7 + 2 * n)
