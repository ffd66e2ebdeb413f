"""The PEP-to-PEP wire format of pooled connections (sans-IO: bytes in, messages out).

A near PEP keeps connections to the far PEP's peer listener open and authenticated, and hands
one to each new split flow that crosses the link (pep.config.peer). On each connection, in order:

    near -> far  HELLO      "PEPP" | version 1 | near nonce (16)                     21 bytes
    far -> near  CHALLENGE  "PEPP" | version 1 | far nonce (16) | far proof (32)     53 bytes
    near -> far  ANSWER     near proof (32)                                          32 bytes
    far -> near  READY      0x06                                                      1 byte
      ... idle in the near PEP's pool, for as long as it takes ...
    near -> far  FLOW       "F" | family 4/6 | flags | dport | sport | dst | src   15 / 39 bytes
    far -> near  STATUS     one byte: CONNECTED, REFUSED, UNREACHABLE, TIMEOUT, FORBIDDEN
      ... then the flow's bytes both ways, and its FIN or RST, as on any split leg

The proofs are HMAC-SHA256 over both nonces with the shared key, each side's with its own
label, so each end proves the key to the other and a recorded exchange proves nothing on a
later connection (RFC 2104; the nonces are fresh per connection). Nothing of a flow is
encrypted or authenticated per byte: this keeps an open proxy closed (a stranger cannot make
the far PEP connect anywhere), it does not make the link private (README).

Integers are big-endian. Every parser here is total: any bytes give a message, "need more"
(None) or a WireError, never another exception (tests/peer/test_wire.py, hypothesis).
"""

from __future__ import annotations

import hashlib
import hmac
import ipaddress
import struct
from dataclasses import dataclass
from typing import NamedTuple

__all__ = [
    "ANSWER_LEN",
    "CHALLENGE_LEN",
    "FLOW_HEAD_LEN",
    "HELLO_LEN",
    "NONCE_LEN",
    "READY",
    "STATUS_TEXT",
    "VERSION",
    "Challenge",
    "Flow",
    "Hello",
    "WireError",
    "encode_challenge",
    "encode_flow",
    "encode_hello",
    "far_proof",
    "flow_size",
    "near_proof",
    "parse_answer",
    "parse_challenge",
    "parse_flow",
    "parse_hello",
    "parse_ready",
    "parse_status",
    "verify",
]

MAGIC = b"PEPP"
VERSION = 1
NONCE_LEN = 16  # 128 bits: a nonce never repeats in practice (os.urandom)
PROOF_LEN = 32  # a full SHA-256 HMAC
HELLO_LEN = len(MAGIC) + 1 + NONCE_LEN
CHALLENGE_LEN = len(MAGIC) + 1 + NONCE_LEN + PROOF_LEN
ANSWER_LEN = PROOF_LEN
READY = b"\x06"  # ASCII ACK
_FLOW = struct.Struct("!cBBHH")  # "F", family, flags, dport, sport
FLOW_TYPE = b"F"
FLAG_TRANSPARENT = 0x01  # the near end asks the far end to connect from the client's address
# STATUS: what became of the far end's connect to the destination.
CONNECTED, REFUSED, UNREACHABLE, TIMEOUT, FORBIDDEN = range(5)
STATUS_TEXT = {
    CONNECTED: "connected",
    REFUSED: "connect refused",
    UNREACHABLE: "unreachable",
    TIMEOUT: "connect timeout",
    FORBIDDEN: "forbidden destination",
}
_ADDR_LEN = {4: 4, 6: 16}
_FAR, _NEAR = b"pep peer far v1", b"pep peer near v1"


class WireError(ValueError):
    """The bytes are not what this side of the protocol expects (garbage, another version)."""


class Hello(NamedTuple):
    version: int
    nonce: bytes


class Challenge(NamedTuple):
    version: int
    nonce: bytes
    proof: bytes


@dataclass(frozen=True, slots=True)
class Flow:
    """Where the far end is to connect, and for whom."""

    dst: tuple[str, int]
    src: tuple[str, int]  # the client (for transparent_source at the far end, and logs)
    transparent: bool = False


# --- the handshake -----------------------------------------------------------------------------


def encode_hello(nonce: bytes) -> bytes:
    _check_nonce(nonce)
    return MAGIC + bytes([VERSION]) + nonce


def parse_hello(buf: bytes) -> tuple[Hello, int] | None:
    """(hello, bytes used) once ``buf`` holds one; None while it holds a prefix of one."""
    _prefix(buf)
    if len(buf) < HELLO_LEN:
        return None
    return Hello(buf[4], bytes(buf[5:HELLO_LEN])), HELLO_LEN


def encode_challenge(nonce: bytes, proof: bytes) -> bytes:
    _check_nonce(nonce)
    if len(proof) != PROOF_LEN:
        raise ValueError("proof must be 32 bytes")
    return MAGIC + bytes([VERSION]) + nonce + proof


def parse_challenge(buf: bytes) -> tuple[Challenge, int] | None:
    _prefix(buf)
    if len(buf) < CHALLENGE_LEN:
        return None
    nonce = bytes(buf[5 : 5 + NONCE_LEN])
    return Challenge(buf[4], nonce, bytes(buf[5 + NONCE_LEN : CHALLENGE_LEN])), CHALLENGE_LEN


def parse_answer(buf: bytes) -> tuple[bytes, int] | None:
    if len(buf) < ANSWER_LEN:
        return None
    return bytes(buf[:ANSWER_LEN]), ANSWER_LEN


def parse_ready(buf: bytes) -> int | None:
    """Bytes used by READY (1), None while ``buf`` is empty; WireError on anything else."""
    if not buf:
        return None
    if buf[:1] != READY:
        raise WireError("the far end did not confirm the connection")
    return 1


def far_proof(key: bytes, near_nonce: bytes, far_nonce: bytes) -> bytes:
    return hmac.new(key, _FAR + near_nonce + far_nonce, hashlib.sha256).digest()


def near_proof(key: bytes, near_nonce: bytes, far_nonce: bytes) -> bytes:
    return hmac.new(key, _NEAR + near_nonce + far_nonce, hashlib.sha256).digest()


def verify(expected: bytes, got: bytes) -> bool:
    """Constant-time comparison (a timing side channel must not leak the proof)."""
    return hmac.compare_digest(expected, got)


def _prefix(buf: bytes) -> None:
    """A WireError as soon as ``buf`` cannot be the start of this version's greeting."""
    head = bytes(buf[:5])
    if head != (MAGIC + bytes([VERSION]))[: len(head)]:
        if head[:4] == MAGIC and len(head) == 5:
            raise WireError(f"peer speaks version {head[4]}, this pep speaks {VERSION}")
        raise WireError("not a pep peer connection")


def _check_nonce(nonce: bytes) -> None:
    if len(nonce) != NONCE_LEN:
        raise ValueError("nonce must be 16 bytes")


# --- a flow ------------------------------------------------------------------------------------


def encode_flow(flow: Flow) -> bytes:
    dst_ip, src_ip = ipaddress.ip_address(flow.dst[0]), ipaddress.ip_address(flow.src[0])
    if dst_ip.version != src_ip.version:
        raise ValueError("destination and source must be of one family")
    flags = FLAG_TRANSPARENT if flow.transparent else 0
    head = _FLOW.pack(FLOW_TYPE, dst_ip.version, flags, flow.dst[1], flow.src[1])
    return head + dst_ip.packed + src_ip.packed


FLOW_HEAD_LEN = _FLOW.size  # what a reader takes first: it says how long the rest is


def flow_size(head: bytes) -> int:
    """The whole FLOW header's length from its first FLOW_HEAD_LEN bytes (WireError when
    they cannot start one); a reader then takes exactly that, leaving the flow's own bytes."""
    if head[:1] != FLOW_TYPE:
        raise WireError("expected a flow header")
    if len(head) < _FLOW.size:
        raise WireError("flow header: too short")
    _, family, flags, dport, _ = _FLOW.unpack_from(head)
    n = _ADDR_LEN.get(family)
    if n is None:
        raise WireError(f"flow header: family {family} (4 or 6)")
    if flags & ~FLAG_TRANSPARENT:
        raise WireError(f"flow header: unknown flags {flags:#x}")
    if dport == 0:
        raise WireError("flow header: destination port 0")
    return _FLOW.size + 2 * n


def parse_flow(buf: bytes) -> tuple[Flow, int] | None:
    """(flow, bytes used) once ``buf`` holds a whole FLOW header; None before."""
    if not buf:
        return None
    if buf[:1] != FLOW_TYPE:
        raise WireError("expected a flow header")
    if len(buf) < _FLOW.size:
        return None
    end = flow_size(buf)
    _, family, flags, dport, sport = _FLOW.unpack_from(buf)
    n = _ADDR_LEN[family]
    if len(buf) < end:
        return None
    make = ipaddress.IPv4Address if family == 4 else ipaddress.IPv6Address
    dst = make(bytes(buf[_FLOW.size : _FLOW.size + n]))
    src = make(bytes(buf[_FLOW.size + n : end]))
    return Flow((str(dst), dport), (str(src), sport), bool(flags & FLAG_TRANSPARENT)), end


def parse_status(buf: bytes) -> int | None:
    if not buf:
        return None
    if buf[0] not in STATUS_TEXT:
        raise WireError(f"unknown status {buf[0]}")
    return buf[0]
