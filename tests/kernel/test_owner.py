"""One owner for pep's kernel state per namespace (pep.kernel.owner), and the runtime
directories pep creates and removes (pep.config.paths): without root, in a temporary
directory standing in for /run/pep."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from pep.config import paths
from pep.kernel import owner


@pytest.fixture
def run_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    run = tmp_path / "run" / "pep"
    monkeypatch.setattr(paths, "RUN_DIR", str(run))
    return run


def test_the_second_taker_is_told_who_owns_it(run_dir: Path) -> None:
    directory = str(run_dir / "netns" / "lab1")
    first = owner.acquire("/run/pep/a.sock", directory)
    with pytest.raises(owner.Owned) as e:
        owner.acquire("/run/pep/b.sock", directory)  # another open file: flock refuses it
    assert e.value.pid == os.getpid() and e.value.status_socket == "/run/pep/a.sock"
    assert f"pid {os.getpid()}" in str(e.value) and "/run/pep/a.sock" in str(e.value)
    assert owner.holder(directory) == {"pid": os.getpid(), "status_socket": "/run/pep/a.sock"}
    first.release()
    assert owner.holder(directory) is None
    assert not (run_dir / "netns" / "lab1").exists()  # made for the lock, gone with it
    with owner.acquire("", directory):  # free again
        pass


def test_a_dead_owner_leaves_the_lock_free(run_dir: Path) -> None:
    """kill -9 of the owner: the kernel drops its flock; the next one takes over."""
    directory = str(run_dir)
    code = (
        "import os, sys; from pep.config import paths; from pep.kernel import owner; "
        f"paths.RUN_DIR = {str(run_dir)!r}; "
        f"owner.acquire('/x.sock', {directory!r}); os.kill(os.getpid(), 9)"
    )
    r = subprocess.run([sys.executable, "-c", code], timeout=30)
    assert r.returncode == -9
    assert (run_dir / owner.LOCK_FILE).exists()  # the file is left, its lock is not
    with owner.acquire("/y.sock", directory):
        assert owner.holder(directory) == {"pid": os.getpid(), "status_socket": "/y.sock"}


def test_pep_creates_directories_only_below_its_own(run_dir: Path, tmp_path: Path) -> None:
    deep = run_dir / "netns" / "x"
    paths.ensure_dir(str(deep))
    assert deep.is_dir()
    (deep / "keep").write_text("")  # something of pep's still there: the directory stays
    paths.remove_created_dirs()
    assert deep.is_dir()
    (deep / "keep").unlink()
    paths.ensure_dir(str(deep))  # exists: nothing recorded, nothing removed later
    paths.remove_created_dirs()
    assert deep.is_dir()
    with pytest.raises(FileNotFoundError, match=r"/elsewhere/dir does not exist"):
        paths.ensure_dir(str(tmp_path / "elsewhere" / "dir"))
    assert not (tmp_path / "elsewhere").exists()
