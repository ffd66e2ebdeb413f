"""``[peer]``: the far PEP this node keeps connections to, or the near PEPs it accepts them from.

A near end (``connect``) keeps ``pool`` authenticated connections to the far end's peer
listener ready, and gives each new split flow that crosses to it one of them: no handshake and
no unscaled SYN window on the link (pep.peer.pool). A far end (``listen``, ``allow``) accepts
them from the ``allow`` networks only, checks the key, and connects each flow where its header
says (pep.peer.server). A node may be both. The wire format: pep.peer.wire.

The key file holds the shared secret, the same at both ends: 32 random bytes or more, raw (``head
-c 32 /dev/urandom``) or as hex (``pep peer keygen``), readable by its owner only.
"""

from __future__ import annotations

import os
import secrets
import stat
import string
from dataclasses import dataclass

from pep.config.files import read_small
from pep.config.schema import ConfigError, Net, integer, ip_port, key, nets

__all__ = ["KEY_BYTES", "Peer", "keygen", "load_key"]

KEY_BYTES = 32  # 256 bits, HMAC-SHA256's own block of strength (RFC 2104 section 3)
KEY_FILE_MAX_BYTES = 4096  # a key is 32 bytes, or 64 hex digits and a newline: larger is not a key


def _path(key: str, value: object) -> str:
    if not isinstance(value, str) or not value.startswith("/"):
        raise ConfigError(key, value, "must be an absolute path")
    return value


@dataclass(frozen=True, slots=True)
class Peer:
    """The ``[peer]`` table (keys declared once, as pep.config's)."""

    key_file: str = key(check=_path)  # the shared secret (required)
    # Near end: the far PEP's peer listener, and how many connections to keep ready.
    # Numeric addresses only: a resolver is not something to wait on per pooled connection,
    # nor to trust with where flows go.
    connect: str = key("", ip_port("no far end"))
    # Eight ready connections cover a browser's six per host with two to spare; more are
    # opened as flows take them faster than they come back, up to pool_max.
    pool: int = key(8, integer(1, 1024))
    pool_max: int = key(64, integer(1, 4096))
    # Far end: where to listen for near PEPs, and which source networks may connect.
    listen: str = key("", ip_port("no peer listener"))
    allow: tuple[Net, ...] = key((), nets)

    def problem(self) -> tuple[str, object, str] | None:
        """What is wrong between the keys (config.build reports it), or None."""
        if not self.connect and not self.listen:
            return "peer", "", "needs `connect` (near end), `listen` (far end) or both"
        if self.listen and not self.allow:
            return "peer.allow", [], "is required with `listen`: the networks of the near PEPs"
        if self.pool_max < self.pool:
            return "peer.pool_max", self.pool_max, f"must be at least pool ({self.pool})"
        return None


def load_key(path: str) -> bytes:
    """The shared secret from ``path``; ConfigError (exit 2 at start) when the file is missing,
    readable by group or others, or holds fewer than 32 bytes of key."""
    k = "peer.key_file"

    def private(st: os.stat_result) -> None:
        if st.st_mode & 0o077:
            raise ConfigError(
                k,
                path,
                f"is readable or writable by others (mode {stat.S_IMODE(st.st_mode):04o}): "
                f"chmod 600 {path}",
            )

    data = read_small(k, path, KEY_FILE_MAX_BYTES, what="a key file", nofollow=True, check=private)
    text = data.strip()
    # Hex text when it is all hex digits: 32 random bytes are that by chance with odds of
    # (22/256)^32, about 1 in 10^34. Printable text that is not hex is neither: a mistyped
    # key (raw random bytes are printable by chance with odds of (95/256)^32, 1 in 10^14).
    if text and all(chr(c) in string.hexdigits for c in text):
        secret = bytes.fromhex(text.decode()) if len(text) % 2 == 0 else b""
    elif text and all(chr(c) in string.printable for c in text):
        raise ConfigError(
            k,
            path,
            "holds text that is not hex: a key is hex (`pep peer keygen > FILE`) or 32 random "
            "bytes (`head -c 32 /dev/urandom > FILE`)",
        )
    else:
        secret = data
    if len(secret) < KEY_BYTES:
        raise ConfigError(
            k,
            path,
            f"holds {len(secret)} bytes of key, at least {KEY_BYTES} are needed "
            "(make one with `pep peer keygen > FILE` or `head -c 32 /dev/urandom > FILE`)",
        )
    return secret


def keygen() -> str:
    """A new key, as the hex text ``pep peer keygen`` prints."""
    return secrets.token_hex(KEY_BYTES)
