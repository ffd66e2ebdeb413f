"""``describe``: what an exception says in a log line, never nothing.

Some exceptions stringify to "": trio.TooSlowError (a timeout), an OSError built without a
message, a bare Exception. A log line "handshake failed ()" or "peer X: ; flows go direct"
tells the operator nothing, so every log line that carries an exception goes through here: its
text when it has one, else what it is (a timeout says timeout, an OSError its errno).
"""

from __future__ import annotations

import errno
import os

__all__ = ["describe"]

# Exceptions whose class name says less than a word would: the word.
_NAMES = {"TooSlowError": "timeout", "Cancelled": "cancelled", "TimeoutError": "timeout"}


def describe(e: BaseException) -> str:
    if isinstance(e, OSError) and e.errno and not e.strerror:  # str() is "[Errno 104] "
        code = errno.errorcode.get(e.errno, str(e.errno))
        return f"{code}: {os.strerror(e.errno)}"
    text = str(e).strip()
    if text:
        return text
    name = type(e).__name__
    return _NAMES.get(name, name)
