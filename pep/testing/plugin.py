"""pep's pytest plugin: a satellite link in one fixture, for any project's integration tests.

Registered by pep's ``pytest11`` entry point, so installing pep is enough (``-p no:pep``
switches it off). README "Testing your application over a satellite link" is the user's guide;
in short:

    @pytest.mark.satlab("geo", pep=["none", "peer"])    # runs twice: without and with pep
    def test_download(satlab):
        satlab.start("server", ["python3", "-m", "http.server", "8000"], listen=8000)
        satlab.run("client", ["curl", "-sSf", f"http://{satlab.addr('server')}:8000/"])

Fixtures: ``satlab`` (a lab for one test), ``satlab_session`` (one lab per link configuration
for the whole session, each test's PEP mode set on entry), ``satlab_prefix`` (a unique prefix,
everything under it removed at teardown, for tests that drive ``pep lab`` themselves) and
``satlab_config`` (what the markers ask for). Markers: ``satlab(...)`` configures the lab (a
list runs the test once per value; every test that uses a lab is marked with the values it got,
so ``-m "satlab(profile='geo')"`` selects by profile) and ``needs_root`` (root and the tools, or
a skip with the reason; under CI=true a failure, so a CI runner that lost its privileges cannot
pass by skipping). The module stays light to import: pytest loads it in every run.
"""

from __future__ import annotations

import functools
import os
import signal
import threading
from collections.abc import Iterator
from typing import TYPE_CHECKING

import pytest

from pep.support.errors import describe
from pep.testing import node_commands

if TYPE_CHECKING:
    from pep.testing.satlab import SatLab, SharedLabs
    from pep.testing.satlab_options import LabConfig

# The configuration each test that uses a lab gets, decided once at collection: the fixture
# reads it back rather than merging the markers again (the plugin's own marker among them).
CONFIG_KEY = pytest.StashKey["LabConfig"]()
SIGTERM_KEY = pytest.StashKey[bool]()  # this plugin installed the SIGTERM handler
_PYTEST_PID = 0  # the process it is installed in (forks inherit it)

__all__ = ["netns_unavailable", "require_root"]

LAB_FIXTURES = ("satlab", "satlab_session", "satlab_config")
MARKERS = (
    "satlab(profile='geo', topology='symmetric', pep='peer', rtt=, down=, up=, loss=, queue=, "
    "handover=): the lab the satlab/satlab_session fixtures build (profile geo, meo, leo, lan or "
    "custom; pep none, direct or peer; values as `pep lab up` takes them); a list runs the test "
    "once per value. Tests that use a lab carry the values they got: -m \"satlab(profile='geo')\"",
    "needs_root: needs root, network namespaces, ip and iptables-legacy: skipped with the reason "
    "otherwise, a failure under CI=true",
)


# Why namespace tests cannot run here, or None when they can (asked once per run).
netns_unavailable = functools.cache(node_commands.netns_unavailable)


def require_root() -> None:
    """Skip the running test with the reason it cannot run here; under ``CI=true`` fail it."""
    reason = netns_unavailable()
    if reason is None:
        return
    if os.environ.get("CI", "").lower() == "true":
        pytest.fail(f"CI=true but this test cannot run: {reason}", pytrace=False)
    pytest.skip(reason)


def pytest_configure(config: pytest.Config) -> None:
    for line in MARKERS:
        config.addinivalue_line("markers", line)
    # SIGTERM (a cancelled CI job, `timeout`) would end pytest with no teardown, leaving the
    # labs behind: made a KeyboardInterrupt, it tears down as Ctrl-C does. Only where nobody
    # handles SIGTERM already, and only in the main thread (where handlers can be set).
    if (
        threading.current_thread() is threading.main_thread()
        and signal.getsignal(signal.SIGTERM) == signal.SIG_DFL
    ):
        global _PYTEST_PID
        _PYTEST_PID = os.getpid()
        signal.signal(signal.SIGTERM, _sigterm)
        config.stash[SIGTERM_KEY] = True


def pytest_unconfigure(config: pytest.Config) -> None:
    if config.stash.get(SIGTERM_KEY, False) and signal.getsignal(signal.SIGTERM) is _sigterm:
        signal.signal(signal.SIGTERM, signal.SIG_DFL)


def _sigterm(signum: int, frame: object) -> None:
    if os.getpid() != _PYTEST_PID:
        # A fork of pytest that did not exec (pyroute2's NetNS helper) ends as SIGTERM ends
        # it: running pytest's teardown there would remove the labs under the real pytest.
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        os.kill(os.getpid(), signal.SIGTERM)
        return
    raise KeyboardInterrupt("SIGTERM")


def pytest_runtest_setup(item: pytest.Item) -> None:
    if item.get_closest_marker("needs_root") is not None:
        require_root()


# --- what a test asks for -----------------------------------------------------------------------


def _asked(node: pytest.Item | pytest.Function | object) -> list[tuple[str | None, LabConfig]]:
    from pep.testing.satlab_options import SatlabError, cases, merge

    marks = list(node.iter_markers("satlab"))  # type: ignore[attr-defined]
    try:
        return cases(merge([(m.args, m.kwargs) for m in reversed(marks)]))
    except SatlabError as e:
        raise pytest.UsageError(f"{node.nodeid}: {describe(e)}") from None  # type: ignore[attr-defined]


def _uses_lab(fixturenames: object) -> bool:
    return any(name in fixturenames for name in LAB_FIXTURES)  # type: ignore[operator]


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    """A ``satlab`` marker with lists runs the test once per configuration; a bad marker is a
    collection error naming the keyword."""
    if not _uses_lab(metafunc.fixturenames):
        return
    asked = _asked(metafunc.definition)
    if asked[0][0] is not None:
        ids = [label for label, _ in asked]
        metafunc.parametrize("satlab_config", [c for _, c in asked], ids=ids)


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Each test that uses a lab is marked ``satlab(profile=, topology=, pep=)`` with what it
    gets, for ``-m``."""
    for item in items:
        if not _uses_lab(getattr(item, "fixturenames", ())):
            continue
        callspec = getattr(item, "callspec", None)
        config = callspec.params.get("satlab_config") if callspec is not None else None
        if config is None:
            config = _asked(item)[0][1]
        item.stash[CONFIG_KEY] = config
        item.add_marker(pytest.mark.satlab(**config.marker_kwargs()))


# --- fixtures -----------------------------------------------------------------------------------


@pytest.fixture
def satlab_config(request: pytest.FixtureRequest) -> LabConfig:
    """The lab the test's ``satlab`` markers ask for (module, class, function: the nearest
    keyword wins); a list in them parametrizes this fixture instead."""
    config = request.node.stash.get(CONFIG_KEY, None)
    return config if config is not None else _asked(request.node)[0][1]


@pytest.fixture
def satlab_prefix() -> Iterator[str]:
    """A lab prefix of the test's own (``pep lab up --prefix ...``); whatever is built under it
    is removed at teardown, however the test ended."""
    require_root()
    from pep.testing.lab_prefix import reserved_prefix

    with reserved_prefix() as prefix:
        yield prefix


@pytest.fixture
def satlab(satlab_config: LabConfig) -> Iterator[SatLab]:
    """A lab for this test alone (pep.testing.satlab.SatLab), removed at teardown."""
    require_root()
    from pep.testing.satlab import open_lab

    with open_lab(satlab_config) as lab:
        yield lab


@pytest.fixture(scope="session")
def satlab_shared() -> Iterator[SharedLabs]:
    """The labs of ``satlab_session``, one per link configuration, removed when the session
    (with pytest-xdist: the worker) ends."""
    from pep.testing.satlab import SharedLabs

    shared = SharedLabs()
    try:
        yield shared
    finally:
        shared.close()


@pytest.fixture
def satlab_session(satlab_config: LabConfig, satlab_shared: SharedLabs) -> Iterator[SatLab]:
    """A lab shared with every test of the session that asks for the same link (profile,
    topology, options), in this test's PEP mode. What the test started is stopped when it
    ends, and a fade it left running is ended; anything else it changes stays for the next."""
    require_root()
    lab = satlab_shared.get(satlab_config)
    try:
        yield lab
    finally:
        lab.end_test()
