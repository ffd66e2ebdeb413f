"""Per-namespace runtime paths (pep.config.paths), without root: the namespace files are stood in
for
by ordinary files, compared the way `ip netns identify` compares them (device and inode)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from pep.config import Config, build, paths


def fake_netns(tmp_path: Path, *names: str) -> tuple[str, Path]:
    """A /proc/self/ns/net stand-in and a /run/netns stand-in naming ``names`` (the first one
    is this process's namespace: a hard link to the same inode)."""
    me = tmp_path / "self-net"
    me.write_text("")
    run_netns = tmp_path / "netns"
    run_netns.mkdir()
    for i, name in enumerate(names):
        if i == 0:
            os.link(me, run_netns / name)
        else:
            (run_netns / name).write_text("")  # another namespace: another inode
    return str(me), run_netns


def test_named_namespace_is_found_by_inode(tmp_path: Path) -> None:
    me, run_netns = fake_netns(tmp_path, "gw", "client", "server")
    assert paths.netns_name(me, str(run_netns)) == "gw"


def test_unnamed_or_unreadable_namespace_has_no_name(tmp_path: Path) -> None:
    me, run_netns = fake_netns(tmp_path)
    (run_netns / "other").write_text("")
    assert paths.netns_name(me, str(run_netns)) is None  # initial (or a container's) netns
    assert paths.netns_name(me, str(tmp_path / "no-such-dir")) is None  # no `ip netns` ever
    assert paths.netns_name(str(tmp_path / "no-proc"), str(run_netns)) is None


def test_runtime_dir_and_default_socket(monkeypatch: pytest.MonkeyPatch) -> None:
    assert paths.runtime_dir_for(None) == "/run/pep"
    assert paths.runtime_dir_for("gw") == "/run/pep/netns/gw"
    monkeypatch.setattr(paths, "netns_name", lambda: None)
    assert paths.default_status_socket() == "/run/pep/pep.sock"
    assert Config().status_socket == build({}).status_socket == "/run/pep/pep.sock"
    monkeypatch.setattr(paths, "netns_name", lambda: "lab-a")
    assert paths.default_status_socket() == "/run/pep/netns/lab-a/pep.sock"
    # The daemon's default and `pep status`'s (build of a file without the key) are one.
    assert Config().status_socket == build({}).status_socket == "/run/pep/netns/lab-a/pep.sock"


def test_long_names_stay_distinct_and_fit_a_worker_socket() -> None:
    """sun_path holds 107 bytes and a worker appends ".127": the default must take that."""
    long_a, long_b = "n" * 200 + "a", "n" * 200 + "b"
    a, b = paths.runtime_dir_for(long_a), paths.runtime_dir_for(long_b)
    assert a != b and a.startswith("/run/pep/netns/nnnn")
    for name in (long_a, "é" * 100, "x" * 64):
        socket_path = os.path.join(paths.runtime_dir_for(name), "pep.sock")
        assert len((socket_path + ".127").encode()) <= 107
        assert build({"status_socket": socket_path}).status_socket == socket_path
    assert paths.runtime_dir_for("x" * 64) == "/run/pep/netns/" + "x" * 64  # kept as it is
