"""Shared test plumbing: the fixtures every namespace test builds on.

Tests that need root and network namespaces carry the ``netns`` marker. Unprivileged runs skip
them with a reason; under ``CI=true`` they fail instead, so a CI machine that silently lost its
privileges cannot pass by skipping the integration suite. The check is pep's pytest plugin's
(pep/testing/plugin.py, ``needs_root``), as are the lab fixtures (``satlab``, ...) that the lab
tests use: one harness for pep's tests and for other projects'.

A namespace test asks for ``topo`` (the gateway topology of pep/testing/netenv.py, under a name
unique to this run, removed at teardown whatever happened) and starts daemons with
``start_pep`` (stopped at teardown, before the topology goes). A module changes its topology by
overriding ``topo_sysctls`` or ``topo_layout``; a single test by parametrizing either.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Iterator, Sequence
from pathlib import Path

import pytest

from pep.testing import netenv
from pep.testing.daemon import NOBODY, PepProcess, StartPep
from pep.testing.plugin import require_root
from pep.testing.topology import Topology

pytest_plugins = ["pytester"]  # tests/testing/test_plugin.py runs pytest on example projects


def pytest_configure(config: pytest.Config) -> None:
    if not config.pluginmanager.has_plugin("pep"):
        raise pytest.UsageError(
            "pep's pytest plugin (entry point pytest11: pep.testing.plugin) is not loaded: "
            "install pep with its test extra (bash deploy/setup.sh --test), and no -p no:pep"
        )


def pytest_runtest_setup(item: pytest.Item) -> None:
    """``netns`` is pep's own name for the plugin's ``needs_root``: one check for both."""
    if item.get_closest_marker("netns") is not None:
        require_root()


# --- topologies ---------------------------------------------------------------------------------


def _tag(request: pytest.FixtureRequest) -> str:
    """The namespaces' name says which module made them: test_ops_status_netns -> opsstatus."""
    name = request.module.__name__.rsplit(".", 1)[-1]
    return name.removeprefix("test_").removesuffix("_netns").replace("_", "")


@pytest.fixture
def topo_layout() -> netenv.Layout:
    """What ``topo`` builds: the gateway topology unless a module or test says otherwise."""
    return netenv.gateway


@pytest.fixture
def topo_sysctls() -> netenv.Sysctls:
    """Sysctls ``topo`` sets once it is built, per node: none unless a module says so."""
    return {}


@pytest.fixture
def topo(
    request: pytest.FixtureRequest, topo_layout: netenv.Layout, topo_sysctls: netenv.Sysctls
) -> Iterator[Topology]:
    with netenv.topology(_tag(request), topo_layout, topo_sysctls) as t:
        yield t


@pytest.fixture
def netns() -> Iterator[str]:
    """A fresh, uniquely named, empty network namespace, always deleted afterwards."""
    with netenv.topology("ipt", netenv.single) as t:
        yield t.ns("ns")


# --- the daemon ---------------------------------------------------------------------------------


@pytest.fixture
def peps() -> Iterator[list[PepProcess]]:
    """Daemons a test starts (pep.testing.daemon.PepProcess): stopped at teardown, pass or fail."""
    started: list[PepProcess] = []
    yield started
    for p in started:
        p.stop()


@pytest.fixture
def start_pep(topo: Topology, peps: list[PepProcess], tmp_path: Path) -> Iterator[StartPep]:
    """The one way a test starts the daemon: ``start_pep(*extra_args, config=..., node=...,
    interfaces=..., timeout=..., **PepProcess_fields)`` starts ``pep run`` in ``topo`` and
    returns it once it is ready.

    ``config`` is the text of a config file (written to tmp_path) or the Path of one;
    ``interfaces`` become --interface flags (default: the gateway's ingress). Every daemon is
    added to ``peps`` before it starts, and stopped at teardown even if it never got ready;
    its log is printed then, which pytest shows when the test failed.
    """
    mine: list[PepProcess] = []

    def start(
        *args: str,
        config: str | Path | None = None,
        node: str = "gw",
        interfaces: Sequence[str] = (netenv.INGRESS,),
        timeout: float = 15,
        **fields: object,
    ) -> PepProcess:
        if isinstance(config, str):
            text, config = config, tmp_path / f"pep{len(mine)}.toml"
            config.write_text(text)
        flags = [flag for name in interfaces for flag in ("--interface", name)]
        p = PepProcess(topo, node, [*flags, *args], config=config, **fields)  # type: ignore[arg-type]
        mine.append(p)
        peps.append(p)
        return p.start(timeout)

    yield start
    for p in mine:
        if log := p.log():  # empty once the test itself stopped it
            print(f"--- log of pep in {p.node} ---\n{log}")
        p.stop()


@pytest.fixture
def nobody_dir() -> Iterator[Path]:
    """What RuntimeDirectory=pep gives the service (deploy/pep.service): a directory its user
    owns, here uid 65534, for the daemon's status socket and a config it can read."""
    d = tempfile.mkdtemp(prefix="pep-nonroot-")
    os.chown(d, NOBODY, NOBODY)
    try:
        yield Path(d)
    finally:
        shutil.rmtree(d, ignore_errors=True)
