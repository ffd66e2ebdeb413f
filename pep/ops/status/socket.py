"""The status socket: the daemon serves its status document (pep.ops.status.document) on a unix
socket.

Protocol: connect, read until EOF, one UTF-8 JSON object. No request: there is one thing to
ask for, and a reader that just connects is trivial to write in any language (``socat - UNIX:``).
The socket is 0660 (owner and group), never world-writable: it tells who talks to whom.

One client, ``fetch``: blocking, for the CLI; the ``workers = N`` master, which asks its
workers from trio, runs the same function in a thread (``afetch``), so connecting, reading,
the deadline and what each error tells the operator exist once.
"""

from __future__ import annotations

import contextlib
import logging
import os
import socket
import stat
import time
from collections.abc import Awaitable, Callable

import trio

from pep.config import paths
from pep.ops.status.document import Doc, StatusError, decode, encode
from pep.support.errors import describe

__all__ = [
    "NotRunning",
    "afetch",
    "bind_unix",
    "fetch",
    "serve_status",
    "unlink_socket",
    "worker_socket",
]

log = logging.getLogger(__name__)


class NotRunning(StatusError):
    """Nothing answers on the socket: no daemon runs with this status_socket."""


def _probe(path: str) -> bool:
    """Whether a daemon answers on ``path`` (False for a stale socket file)."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC) as s:
        s.settimeout(1)
        try:
            s.connect(path)
        except (ConnectionRefusedError, FileNotFoundError):
            return False
        except OSError:
            return True  # e.g. EACCES: it exists and we cannot tell; do not remove it
    return True


def bind_unix(path: str) -> socket.socket:
    """A listening unix socket at ``path``, mode 0660; replaces a stale file from a crash.

    Refuses when another daemon answers there: two peps must not share a status socket.
    """
    directory = os.path.dirname(path)
    try:
        paths.ensure_dir(directory, mode=0o750)
    except FileNotFoundError as e:
        raise StatusError(f"status_socket {path}: {describe(e)}") from None
    except OSError as e:
        raise StatusError(
            f"status_socket {path}: cannot create {directory}: {describe(e)}"
        ) from None
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        pass
    else:
        if not stat.S_ISSOCK(st.st_mode):
            raise StatusError(f"status_socket {path} exists and is not a socket; remove it")
        if _probe(path):
            raise StatusError(
                f"status_socket {path} is in use: another pep is running (stop it, or give this "
                "one its own status_socket)"
            )
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)  # stale: left behind by a daemon that was killed
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
    # umask is per process: the socket file is born 0660, never briefly wider.
    old = os.umask(0o117)
    try:
        sock.bind(path)
    except OSError as e:
        sock.close()
        raise StatusError(f"status_socket {path}: cannot bind: {describe(e)}") from None
    finally:
        os.umask(old)
    sock.listen(64)
    return sock


async def serve_status(
    sock: socket.socket,
    get_doc: Callable[[], Awaitable[Doc]],
    *,
    task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Serve the document on a socket from ``bind_unix`` until cancelled."""
    listener = trio.SocketListener(trio.socket.from_stdlib_socket(sock))

    async def handle(stream: trio.SocketStream) -> None:
        try:
            data = encode(await get_doc())
        except Exception:  # a bug here must cost one `pep status`, not the daemon
            log.exception("status: building the document failed")
            data = b""
        with trio.move_on_after(5):  # a reader that does not read must not pin a task
            with contextlib.suppress(trio.BrokenResourceError, trio.ClosedResourceError):
                await stream.send_all(data)
        await trio.aclose_forcefully(stream)

    async with listener:
        await trio.serve_listeners(handle, [listener], task_status=task_status)


def unlink_socket(sock: socket.socket, path: str, inode: int) -> None:
    """Close ``sock`` and remove its file (``inode`` as bound), unless a successor has
    already replaced it."""
    sock.close()
    with contextlib.suppress(OSError):
        if os.stat(path).st_ino == inode:
            os.unlink(path)


def _connect_error(path: str, e: OSError) -> StatusError:
    if isinstance(e, FileNotFoundError | ConnectionRefusedError):
        return NotRunning(f"no pep daemon is running (nothing answers on {path})")
    if isinstance(e, PermissionError):
        return StatusError(
            f"cannot connect to {path}: permission denied (run as root, or as a member of "
            "the socket's group)"
        )
    return StatusError(f"cannot read {path}: {e.strerror or e}")


def fetch(path: str, timeout: float = 5.0) -> Doc:
    """The document served on ``path``; StatusError (NotRunning: no daemon) when it cannot be
    had within ``timeout`` seconds, connecting and reading together."""
    deadline = time.monotonic() + timeout
    chunks = []
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC) as s:
        try:
            s.settimeout(timeout)
            s.connect(path)
            while True:
                left = deadline - time.monotonic()
                if left <= 0:
                    raise TimeoutError
                s.settimeout(left)
                chunk = s.recv(1 << 16)
                if not chunk:
                    break
                chunks.append(chunk)
        except TimeoutError:
            raise StatusError(f"the daemon on {path} did not answer within {timeout} s") from None
        except OSError as e:
            raise _connect_error(path, e) from None
    return decode(b"".join(chunks))


async def afetch(path: str, timeout: float = 5.0) -> Doc:
    """``fetch`` for a trio caller (the ``workers = N`` master asking its workers), in a
    worker thread. Cancelling returns at once; the thread ends by ``timeout`` on its own."""
    return await trio.to_thread.run_sync(fetch, path, timeout, abandon_on_cancel=True)


def worker_socket(path: str, index: int) -> str:
    """Where worker ``index`` of a ``workers = N`` daemon serves its own status."""
    return f"{path}.{index}"
