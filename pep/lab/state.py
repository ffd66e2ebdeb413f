"""A lab that exists: the :class:`Lab` object, its state file and the processes it runs.

The processes run in their own sessions and log to ``/run/pep-lab/{prefix}/``, so they outlive
the ``pep lab up`` command that started them. The state file there records the profile, the
settings and the process ids for ``status``; nothing depends on it for cleanup, which finds
the lab's namespaces by prefix (``lab_namespaces``).
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pep.lab.plan import PEP_NODES, LabError
from pep.lab.profiles import LinkProfile
from pep.testing.node_commands import tail

__all__ = [
    "STATE_ENV",
    "Lab",
    "exists",
    "lab_namespaces",
    "not_up",
    "pid_running",
    "state_root",
]

STATE_ENV = "PEP_LAB_STATE"  # where labs keep their state, /run/pep-lab unless set


def state_root() -> Path:
    """Read when used, not at import: a test or a second lab set may point it elsewhere."""
    return Path(os.environ.get(STATE_ENV, "/run/pep-lab"))


_PACKAGE_ROOT = str(Path(__file__).resolve().parents[2])


def lab_namespaces(prefix: str) -> list[str]:
    from pyroute2 import netns

    return sorted(n for n in netns.listnetns() if n.startswith(prefix + "-"))


def exists(prefix: str) -> bool:
    return bool(lab_namespaces(prefix))


def not_up(prefix: str) -> LabError:
    """What every command that needs a running lab says when there is none."""
    return LabError(f"lab {prefix!r} is not up (start it with `pep lab up --prefix {prefix}`)")


def _ns_inode(ns: str) -> int | None:
    try:
        return os.stat(f"/run/netns/{ns}").st_ino
    except OSError:
        return None


def pid_running(pid: int, ns: str | None = None) -> bool:
    """Alive, not a zombie, and (when ``ns`` is given) inside that namespace: a recorded pid
    that was reused by an unrelated process does not count."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            if f.read().rsplit(")", 1)[1].split()[0] == "Z":
                return False
        if ns is not None:
            return os.stat(f"/proc/{pid}/ns/net").st_ino == _ns_inode(ns)
    except (OSError, IndexError):
        return False
    return True


@dataclass
class Lab:
    """A lab that exists (or is being built); its state file mirrors this object."""

    prefix: str
    topology: str
    profile: LinkProfile
    pep: bool
    peer: bool = False  # the PEPs keep pre-connected legs ([peer])
    created: str = ""
    congestion: str | None = None
    nodes: dict[str, dict[str, str]] = field(default_factory=dict)  # node -> {iface: addr}
    settings: dict[str, list[str]] = field(default_factory=dict)  # node -> what was set
    procs: dict[str, dict[str, object]] = field(default_factory=dict)
    # --topology star (pep.lab.star): {"plans": [[down, up] bit/s per terminal], "terminal_pep"}
    star: dict[str, Any] = field(default_factory=dict)
    _children: dict[str, subprocess.Popen[bytes]] = field(default_factory=dict, repr=False)

    @property
    def dir(self) -> Path:
        return state_root() / self.prefix

    def ns(self, node: str) -> str:
        return f"{self.prefix}-{node}"

    @property
    def pep_nodes(self) -> list[str]:
        if self.star:  # the hub, and each terminal when it runs its own pep
            return ["hub"] + [n for n in self.nodes if n[0] == "t" and self.star["terminal_pep"]]
        return [n for n in PEP_NODES if n in self.nodes]

    # --- state file ---------------------------------------------------------------------------

    def save(self) -> None:
        data = {
            "prefix": self.prefix,
            "topology": self.topology,
            "profile": self.profile.to_json(),
            "pep": self.pep,
            "peer": self.peer,
            "created": self.created,
            "congestion": self.congestion,
            "nodes": self.nodes,
            "settings": self.settings,
            "procs": self.procs,
            "star": self.star,
        }
        tmp = self.dir / "lab.json.tmp"
        tmp.write_text(json.dumps(data, indent=1))
        tmp.replace(self.dir / "lab.json")

    @classmethod
    def load(cls, prefix: str) -> Lab | None:
        try:
            data = json.loads((state_root() / prefix / "lab.json").read_text())
        except (OSError, ValueError):
            return None
        return cls(
            prefix=data["prefix"],
            topology=data["topology"],
            profile=LinkProfile.from_json(data["profile"]),
            pep=data["pep"],
            peer=data.get("peer", False),
            created=data.get("created", ""),
            congestion=data.get("congestion"),
            nodes=data.get("nodes", {}),
            settings=data.get("settings", {}),
            procs=data.get("procs", {}),
            star=data.get("star", {}),
        )

    # --- processes ----------------------------------------------------------------------------

    def launch(self, name: str, node: str, argv: list[str]) -> subprocess.Popen[bytes]:
        """Start ``argv`` in ``node`` in its own session, so it outlives this command, logging
        to ``{name}.log``; ``wait_ready`` then waits for it."""
        log_path = self.dir / f"{name}.log"
        start = log_path.stat().st_size if log_path.exists() else 0
        env = dict(os.environ)
        env["PYTHONPATH"] = _PACKAGE_ROOT + os.pathsep + env.get("PYTHONPATH", "")
        with open(log_path, "ab") as logf:
            proc = subprocess.Popen(
                ["ip", "netns", "exec", self.ns(node), *argv],
                stdin=subprocess.DEVNULL,
                stdout=logf,
                stderr=subprocess.STDOUT,
                start_new_session=True,
                env=env,
            )
        self._children[name] = proc
        self.procs[name] = {
            "node": node,
            "pid": proc.pid,
            "argv": argv,
            "log": str(log_path),
            "log_offset": start,
        }
        self.save()
        return proc

    def wait_ready(self, name: str, ready: str, timeout: float = 20) -> int:
        """Wait for ``ready`` in what the process logged since its launch."""
        info = self.procs[name]
        proc = self._children[name]
        ns = self.ns(str(info["node"]))
        deadline = time.monotonic() + timeout
        while True:
            text = self.output(name)
            if ready in text:
                return proc.pid
            if proc.poll() is not None:
                raise LabError(
                    f"{name} in {ns} exited with status {proc.returncode}:\n" + tail(text)
                )
            if time.monotonic() > deadline:
                raise LabError(f"{name} in {ns} not ready after {timeout:g}s:\n" + tail(text))
            time.sleep(0.05)

    def output(self, name: str) -> str:
        """What the process ``name`` has logged since its launch."""
        info = self.procs[name]
        return _read_from(Path(str(info["log"])), int(info["log_offset"]))  # type: ignore[call-overload]

    def running(self, name: str) -> bool:
        info = self.procs.get(name)
        if not info:
            return False
        return pid_running(int(info["pid"]), self.ns(str(info["node"])))  # type: ignore[call-overload]

    def stop(self, *names: str, timeout: float = 10) -> None:
        """SIGTERM (pep removes its rules on it), then SIGKILL after ``timeout``; all the named
        processes at once, since each takes a moment to shut down. Each leads its own session
        (``launch``), so its process group is signalled: what it started goes too."""
        pids = {}
        for name in names:
            info = self.procs.get(name)
            if info and self.running(name):
                pids[name] = int(info["pid"])  # type: ignore[call-overload]
                _signal_group(pids[name], signal.SIGTERM)
        deadline = time.monotonic() + timeout
        while any(self.running(n) for n in pids) and time.monotonic() < deadline:
            for name in pids:
                self._reap(name)
            time.sleep(0.02)
        for name, pid in pids.items():
            # the leader, if it outlived the deadline, and whatever of its group outlived it
            _signal_group(pid, signal.SIGKILL)
            self._reap(name, wait=True)

    def _reap(self, name: str, wait: bool = False) -> None:
        proc = self._children.get(name)
        if proc is not None:
            if wait:
                with contextlib.suppress(subprocess.TimeoutExpired):
                    proc.wait(5)
            else:
                proc.poll()

    def config(self, node: str, direct: bool = False) -> Path:
        """A PEP node's config: with [peer] (if the lab has it), or without (``direct``)."""
        return self.dir / (f"{node}-direct.toml" if direct else f"{node}.toml")

    def pep_argv(self, node: str, direct: bool = False) -> list[str]:
        config = str(self.config(node, direct))
        return [sys.executable, "-m", "pep.ops.cli", "run", "--config", config]

    def set_split(self, on: bool, direct: bool = False) -> None:
        """Start or stop pep on every PEP node (the demo's with/without switch); ``direct``:
        with pep, but without the pre-connected legs. A pep running the other way is
        restarted."""
        if not self.pep:
            raise LabError(f"lab {self.prefix!r} was built with --no-pep: it has no pep to switch")
        if not on:
            self.stop(*self.pep_nodes)
            return
        argv = {n: self.pep_argv(n, direct) for n in self.pep_nodes}
        other = [n for n in self.pep_nodes if self.running(n) and self.procs[n]["argv"] != argv[n]]
        self.stop(*other)
        starting = [n for n in self.pep_nodes if not self.running(n)]
        for node in starting:
            self.launch(node, node, argv[node])
        for node in starting:
            self.wait_ready(node, "ready:")
        if not direct:
            for node in starting:
                self.wait_pool(node)

    def wait_pool(self, node: str, timeout: float = 15) -> None:
        """Until ``node``'s peer pool holds its target of ready connections (no pool: at
        once). A pep just started opens them in the background, one handshake and one
        challenge round trip across the link each; a measurement started before then would
        time the fallback (direct legs), not the pool."""
        from pep.ops.status.socket import StatusError, fetch

        deadline = time.monotonic() + timeout
        while True:
            try:
                pool = (fetch(str(self.dir / f"{node}.sock")).get("peer") or {}).get("pool")
            except StatusError:
                pool = None  # not answering yet
            else:
                if not pool or pool["ready"] >= pool["target"]:
                    return
            if time.monotonic() > deadline:
                raise LabError(f"pep on {node}: peer pool not ready after {timeout:g} s: {pool}")
            time.sleep(0.05)

    def link_drops(self) -> int:
        """Packets the link's rate limiters (tbf, both directions) have dropped so far: the
        modem queue overflowing."""
        from pyroute2 import NetNS

        with NetNS(self.ns("link")) as ipr:
            return sum(
                (q.get_attr("TCA_STATS") or {}).get("drop", 0)
                for q in ipr.get_qdiscs()
                if q.get_attr("TCA_KIND") == "tbf"
            )

    async def settle(self) -> None:
        """Let the last FIN/ACKs of a measurement cross the link before the next one starts."""
        import trio

        await trio.sleep(0.3 + self.profile.rtt_ms / 1000)

    def reap_all(self) -> None:
        for name in list(self._children):
            self._reap(name, wait=True)


def _signal_group(pid: int, sig: int) -> None:
    """Signal the process group ``pid`` leads (a lab process leads its session)."""
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pid, sig)


def _read_from(path: Path, offset: int) -> str:
    try:
        with open(path, "rb") as f:
            f.seek(offset)
            return f.read().decode(errors="replace")
    except OSError:
        return ""
