"""``describe``: what an exception says in a log line or an error message, never nothing.

Some exceptions stringify to "": trio.TooSlowError (a timeout), an OSError built without a
message, a bare Exception; and an OSError's ``strerror`` may be None. A log line "handshake
failed ()" or "peer X: ; flows go direct" tells the operator nothing, so every place that turns
a caught exception into text goes through here (tests/support/test_errors.py finds any that
formats one itself): an OSError's own words (its strerror, as "Connection refused" reads in
every message pep writes), else its errno; any other exception's text; else what it is (a
timeout says timeout).
"""

from __future__ import annotations

import errno
import os

__all__ = ["describe"]

# Exceptions whose class name says less than a word would: the word.
_NAMES = {"TooSlowError": "timeout", "Cancelled": "cancelled", "TimeoutError": "timeout"}


def describe(e: BaseException) -> str:
    if isinstance(e, OSError) and e.errno:
        if e.strerror and e.strerror.strip():
            return e.strerror
        code = errno.errorcode.get(e.errno, str(e.errno))  # str() is "[Errno 104] "
        return f"{code}: {os.strerror(e.errno)}"
    text = str(e).strip()
    if text:
        return text
    name = type(e).__name__
    return _NAMES.get(name, name)
