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
be mistaken for a live owner. The lock is held through its open descriptor (close-on-exec), and
a ``workers = N`` master hands that descriptor to each worker it starts (pep.ops.workers): the
lock belongs to the open file, so it is released only when the last process of the daemon is
gone. A master killed with kill -9 leaves its workers draining their connections, still bound
to the daemon's queues; until they have finished, a new start is refused (naming the master's
pid, and saying it has exited) rather than taking over from under them. On release the file is
removed; a taker checks that the file it locked is still the one at the path, so a release
that unlinks it between another's open and flock cannot leave two owners.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import os
import time

from pep.config import paths

__all__ = ["LOCK_FILE", "Owned", "Owner", "acquire", "holder", "running"]

LOCK_FILE = "owner.lock"


class Owned(RuntimeError):
    """Another live pep owns this namespace's kernel state; ``str()`` says who."""

    def __init__(
        self, path: str, pid: int | None, status_socket: str | None, alive: bool = True
    ) -> None:
        self.path, self.pid, self.status_socket = path, pid, status_socket
        who = f"pid {pid}" if pid else "a process"
        sock = f", status socket {status_socket}" if status_socket else ", no status socket"
        if alive:
            super().__init__(
                f"another pep ({who}{sock}) owns pep's rules and routes in this network "
                f"namespace ({path}): stop it first; `pep status` asks it what it does"
            )
        else:  # its workers hold the lock it handed them (see the module's docstring)
            super().__init__(
                f"another pep ({who}, which has exited) still owns pep's rules and routes in "
                f"this network namespace ({path}): its workers are finishing their "
                "connections (up to its drain_timeout); start again once they have"
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


def _record(fd: int) -> tuple[int | None, str | None]:
    """(pid, status socket) as the owner wrote them; None for what is not there."""
    held = _read(fd)
    pid, sock = held.get("pid"), held.get("status_socket")
    return (pid if isinstance(pid, int) else None), (sock if isinstance(sock, str) else None)


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
            try:
                pid, sock = _record(fd)
                if pid is None or not running(pid):
                    # A new owner writes its record just after it locks: a moment to do so,
                    # so that a dead one's record left in the file is not taken for it.
                    time.sleep(0.05)
                    pid, sock = _record(fd)
            finally:
                os.close(fd)
            raise Owned(path, pid, sock, alive=pid is None or running(pid)) from None
        try:
            try:
                same = os.fstat(fd).st_ino == os.stat(path).st_ino
            except FileNotFoundError:
                same = False
            if same:
                record = json.dumps({"pid": os.getpid(), "status_socket": status_socket})
                os.ftruncate(fd, 0)
                os.pwrite(fd, record.encode(), 0)
        except OSError:
            os.close(fd)  # and the lock with it: a failed take holds nothing
            raise
        if same:
            return Owner(fd, path)
        os.close(fd)  # released (unlinked) between our open and our lock: again
    raise OSError(errno.EAGAIN, f"{path}: the lock changed hands too often; try again")


def running(pid: int) -> bool:
    """Whether process ``pid`` runs (a zombie, killed and not yet reaped, does not)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            state = f.read().rpartition(")")[2].split()[0]
    except (OSError, IndexError):
        return False
    return state not in ("Z", "X")


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
