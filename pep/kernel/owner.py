"""One owner for pep's kernel state in a network namespace.

pep's rules, routes, route metrics and their recovery file are per network namespace, and
everything that installs or removes them replaces what is there: a second ``pep run`` in the
same namespace would silently take the first one's rules over (and remove them all when it
stops, leaving the first one splitting nothing). So whatever changes that state (``pep run``,
``pep rules install``, ``pep rules remove``) first takes this lock: an ``flock`` on
``owner.lock`` in the namespace's runtime directory (pep.config.paths), held for as long as it
runs. A second one is refused (``Owned``: exit 2, nothing touched) with the owner's pid and
status socket, which the file holds.

flock, not a pid file: the kernel drops the lock when the owner dies, even by kill -9, so a
crashed owner's state is found and replaced by the next start as before, and no stale pid can
be mistaken for a live owner. The lock file stays locked only through its open descriptor
(close-on-exec: a ``workers = N`` master's workers do not inherit it; the master owns the
state, and a second ``pep run`` is refused by the master's lock). On release the file is
removed; a taker checks that the file it locked is still the one at the path, so a release
that unlinks it between another's open and flock cannot leave two owners.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import os

from pep.config import paths

__all__ = ["LOCK_FILE", "Owned", "Owner", "acquire", "holder"]

LOCK_FILE = "owner.lock"


class Owned(RuntimeError):
    """Another live pep owns this namespace's kernel state; ``str()`` says who."""

    def __init__(self, path: str, pid: int | None, status_socket: str | None) -> None:
        self.path, self.pid, self.status_socket = path, pid, status_socket
        who = f"pid {pid}" if pid else "a process"
        sock = f", status socket {status_socket}" if status_socket else ", no status socket"
        super().__init__(
            f"another pep ({who}{sock}) owns pep's rules and routes in this network namespace "
            f"({path}): stop it first; `pep status` asks it what it does"
        )


class Owner:
    """The lock, held: ``release`` (or the process's death) gives it up."""

    def __init__(self, fd: int, path: str) -> None:
        self.fd, self.path = fd, path

    def release(self) -> None:
        if self.fd < 0:
            return
        with contextlib.suppress(OSError):
            os.unlink(self.path)  # while still locked: no taker can be left on a dead file
        os.close(self.fd)
        self.fd = -1
        paths.remove_created_dirs()
        # A named namespace's directory is pep's whoever made it (a crashed run): gone when
        # nothing of pep's is left in it.
        directory = os.path.dirname(self.path)
        if os.path.dirname(directory) == os.path.join(paths.RUN_DIR, "netns"):
            with contextlib.suppress(OSError):
                os.rmdir(directory)

    def __enter__(self) -> Owner:
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()


def lock_path(directory: str | None = None) -> str:
    return os.path.join(directory or paths.runtime_dir(), LOCK_FILE)


def _read(fd: int) -> dict[str, object]:
    try:
        data = json.loads(os.pread(fd, 4096, 0) or b"{}")
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def acquire(status_socket: str, directory: str | None = None) -> Owner:
    """Take ownership of this namespace's kernel state, or raise Owned naming the owner.
    OSError when the runtime directory cannot be made or the file cannot be opened."""
    path = lock_path(directory)
    paths.ensure_dir(os.path.dirname(path))
    for _ in range(5):  # only a release racing us makes it go round
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC | os.O_NOFOLLOW, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            if e.errno not in (errno.EWOULDBLOCK, errno.EACCES):
                os.close(fd)
                raise
            held = _read(fd)
            os.close(fd)
            pid = held.get("pid")
            sock = held.get("status_socket")
            raise Owned(
                path, pid if isinstance(pid, int) else None, sock if isinstance(sock, str) else None
            ) from None
        try:
            same = os.fstat(fd).st_ino == os.stat(path).st_ino
        except FileNotFoundError:
            same = False
        if not same:  # released (unlinked) between our open and our lock: again
            os.close(fd)
            continue
        record = json.dumps({"pid": os.getpid(), "status_socket": status_socket}).encode()
        os.ftruncate(fd, 0)
        os.pwrite(fd, record, 0)
        return Owner(fd, path)
    raise OSError(errno.EAGAIN, f"{path}: the lock changed hands too often; try again")


def holder(directory: str | None = None) -> dict[str, object] | None:
    """Who holds the lock now ({"pid", "status_socket"}), or None when nobody does."""
    path = lock_path(directory)
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC | os.O_NOFOLLOW)
    except OSError:
        return None
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except OSError:
            return _read(fd)
        fcntl.flock(fd, fcntl.LOCK_UN)
        return None
    finally:
        os.close(fd)
