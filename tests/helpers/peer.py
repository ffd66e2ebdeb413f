"""A hand-made near end of ``[peer]``, for tests of the far end's peer listener: the wire
format's handshake (pep.peer.wire) from the near side, with any key."""

from __future__ import annotations

import os

import trio

from pep.peer import wire
from pep.testing.traffic import send_all

__all__ = ["near_handshake"]


async def near_handshake(sock: trio.socket.SocketType, secret: bytes) -> None:
    """HELLO, CHALLENGE, ANSWER with ``secret``, READY; ConnectionResetError when the far end
    closes instead (a wrong key, or a refusal before the handshake). ``sock`` is closed when
    the handshake fails."""
    try:
        await _handshake(sock, secret)
    except BaseException:
        sock.close()
        raise


async def _handshake(sock: trio.socket.SocketType, secret: bytes) -> None:
    nonce = os.urandom(wire.NONCE_LEN)
    await send_all(sock, wire.encode_hello(nonce))
    challenge = b""
    while len(challenge) < wire.CHALLENGE_LEN:
        chunk = await sock.recv(wire.CHALLENGE_LEN - len(challenge))
        if not chunk:
            raise ConnectionResetError("closed during the handshake")
        challenge += chunk
    parsed = wire.parse_challenge(challenge)
    assert parsed is not None
    await send_all(sock, wire.near_proof(secret, nonce, parsed[0].nonce))
    if await sock.recv(1) != wire.READY:
        raise ConnectionResetError("no READY")
