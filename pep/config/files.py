"""Reading the files a setting names (the config itself, ``link.terminals_file``,
``peer.key_file``): one guard for all of them, so none of them can hang a start or a SIGHUP.

A path that is not a regular file (a FIFO would block the open until a writer came, /dev/zero
never ends, a directory cannot be read) or is larger than the caller allows is refused before
anything is read, with a ConfigError that names the key: exit 2 at start, the running
settings kept on SIGHUP (issue 20, D4).
"""

from __future__ import annotations

import os
import stat
from collections.abc import Callable

from pep.config.schema import ConfigError
from pep.support.errors import describe

__all__ = ["read_small"]


def read_small(
    key: str,
    path: str,
    limit: int,
    *,
    what: str = "a file",
    nofollow: bool = False,
    check: Callable[[os.stat_result], None] | None = None,
) -> bytes:
    """The bytes of regular file ``path``, at most ``limit`` of them (larger is refused, as
    ``what``); ``check`` may refuse the file from its stat before it is read."""
    flags = os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC | (os.O_NOFOLLOW if nofollow else 0)
    try:
        fd = os.open(path, flags)  # O_NONBLOCK: a FIFO's open would wait for a writer
    except FileNotFoundError:
        raise ConfigError(key, path, "file does not exist") from None
    except OSError as e:
        raise ConfigError(key, path, f"cannot be read: {describe(e)}") from None
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise ConfigError(key, path, "is not a regular file")
        if st.st_size > limit:
            raise ConfigError(key, path, f"is {st.st_size} bytes: {what} is at most {limit}")
        if check is not None:
            check(st)
        data = os.read(fd, limit + 1)
    except OSError as e:
        raise ConfigError(key, path, f"cannot be read: {describe(e)}") from None
    finally:
        os.close(fd)
    if len(data) > limit:  # grew between the fstat and the read
        raise ConfigError(key, path, f"is over {limit} bytes: {what} is at most {limit}")
    return data
