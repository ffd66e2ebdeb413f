"""Whose lab is it: the prefixes of the labs the pytest plugin builds, and the removal of the
labs whose test run was killed before it could remove them.

A prefix is ``pepsl{pid}x{4 hex}``: unique to a process and a call, so pytest-xdist workers
never collide, and it names its owner, so a later run can tell that the owner is gone (a kill
-9, a dead worker: nothing ran the teardown) and remove the lab (``sweep_orphans``), as
``pep lab down`` would. A lab whose owner is alive is never touched.
"""

from __future__ import annotations

import contextlib
import os
import re
import secrets
from collections.abc import Iterator

from pep.lab import build
from pep.lab.plan import LabError
from pep.lab.state import lab_namespaces, pid_running, state_root

__all__ = ["new_prefix", "orphans", "reserved_prefix", "sweep_orphans"]

PREFIX_TAG = "pepsl"
# pepsl{pid}x{4 hex}: at most 5 + 7 (pid_max 4194304) + 5 = 17 characters of the lab's 24.
_OWNED = re.compile(rf"^{PREFIX_TAG}(\d+)x[0-9a-f]{{4}}$")


def new_prefix() -> str:
    """A prefix unique to this process and call, with this process's full pid in it, so that a
    later run can tell that its owner is gone (``sweep_orphans``)."""
    return f"{PREFIX_TAG}{os.getpid()}x{secrets.token_hex(2)}"


def orphans() -> list[str]:
    """The labs of ``open_lab`` whose process is gone: from the namespaces (a lab killed while
    being built may have no state directory yet) and the state directories. A pid that was
    reused keeps its lab until that process ends too: never remove a live owner's lab."""
    from pyroute2 import netns

    names = {n.split("-", 1)[0] for n in netns.listnetns()}
    with contextlib.suppress(OSError):
        names |= {p.name for p in state_root().iterdir()}
    out = []
    for name in sorted(names):
        m = _OWNED.match(name)
        if m and int(m.group(1)) != os.getpid() and not pid_running(int(m.group(1))):
            out.append(name)
    return out


def sweep_orphans() -> list[str]:
    """Remove every orphaned lab (``orphans``); returns their prefixes."""
    gone = orphans()
    for prefix in gone:
        build.down(prefix)
    return gone


@contextlib.contextmanager
def reserved_prefix() -> Iterator[str]:
    """A fresh prefix for a lab built some other way (``pep lab up --prefix``); whatever is
    built under it is removed afterwards, and LabError if anything is left."""
    sweep_orphans()
    prefix = new_prefix()
    try:
        yield prefix
    finally:
        build.down(prefix)
    if lab_namespaces(prefix):
        raise LabError(f"lab {prefix!r} left namespaces behind: {lab_namespaces(prefix)}")
