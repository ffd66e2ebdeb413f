"""pep's pytest plugin as another project uses it: pytest run in a subprocess (pytester) on
small projects, the labs they build looked for afterwards in the kernel.

Each project's tests write what they saw (their lab's prefix, a pid) to a record file named by
an environment variable; after the run, none of those labs may have left a namespace, a state
directory or a process, whether its test passed, failed, was interrupted (SIGINT) or its
pytest was killed (SIGKILL: the next run removes the orphan). Labs use the short LEO link.
"""

from __future__ import annotations

import json
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from pep.lab.objects import body_sha256
from pep.lab.state import lab_namespaces, pid_running, state_root
from pep.testing.daemon import REPO

pytestmark = pytest.mark.netns

RECORD = "SATLAB_RECORD"
PRELUDE = f'''
import json, os, pathlib, subprocess, sys, time
import pytest

def record(**what):
    with open(os.environ["{RECORD}"], "a") as f:
        f.write(json.dumps(what) + "\\n")

def fetch_sha256(lab, size):
    """The lab's object server, through the link and both peps, as curl gets it."""
    url = f"http://{{lab.addr('server')}}/{{size}}"
    return lab.run("client", f"curl -sS --fail {{url}} | sha256sum", timeout=60).stdout.split()[0]
'''


def records(path: Path) -> list[dict[str, object]]:
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def assert_gone(prefixes: set[str]) -> None:
    assert prefixes, "the tests recorded no lab"
    for prefix in prefixes:
        assert not lab_namespaces(prefix), f"{prefix}: namespaces left"
        assert not (state_root() / prefix).exists(), f"{prefix}: state directory left"


@pytest.fixture
def record(pytester: pytest.Pytester, monkeypatch: pytest.MonkeyPatch) -> Path:
    path = pytester.path / "record.jsonl"
    monkeypatch.setenv(RECORD, str(path))
    monkeypatch.setenv("CI", "true")  # a lab test that cannot run fails instead of skipping
    return path


def test_the_fixtures_work_and_a_failing_test_cleans_up(
    pytester: pytest.Pytester, record: Path
) -> None:
    pytester.makepyfile(
        test_app=PRELUDE
        + f'''
pytestmark = pytest.mark.satlab("leo")

def test_a_lab_of_its_own(satlab):
    record(prefix=satlab.prefix)
    assert satlab.nodes == ["client", "pepa", "link", "pepb", "server"]
    assert satlab.addr("server") == "10.78.4.2" and satlab.mode == "peer"
    assert satlab.addresses("pepa") == {{"lan0": "10.78.1.1", "sat0": "10.78.2.1"}}
    assert fetch_sha256(satlab, 300_000) == "{body_sha256(300_000)}"
    assert satlab.pep_status("pepa")["totals"]["bytes_down"] >= 300_000
    sleeper = satlab.start("server", ["sleep", "300"])
    record(pid=sleeper.pid)
    with pytest.raises(subprocess.CalledProcessError) as e:
        satlab.run("server", "echo no such file >&2; exit 3")
    assert str(e.value).startswith(
        f"in node 'server' ({{satlab.prefix}}-server): `echo no such file >&2; exit 3` exited "
        "with status 3; its stderr ends:\\n    no such file"
    )
    assert satlab.run("link", ["false"], check=False).returncode == 1
    satlab.set_mode("none")
    assert fetch_sha256(satlab, 100_000) == "{body_sha256(100_000)}"
    assert "pep: stopped" in satlab.status()

def test_that_fails(satlab):
    record(prefix=satlab.prefix)
    assert satlab.run("client", "echo $((6 * 7))").stdout == "43\\n"

@pytest.mark.satlab(pep="direct")
def test_shared_first(satlab_session):
    record(prefix=satlab_session.prefix, shared="first")
    assert satlab_session.mode == "direct"
    family = satlab_session.start(
        "client", "sleep 301 & echo child=$!; wait", name="first-sleeper", ready="child="
    )
    record(child=int(family.output().split("child=")[1].split()[0]))

@pytest.mark.satlab(pep="peer")
@pytest.mark.trio
async def test_shared_second_in_trio(satlab_session):
    record(prefix=satlab_session.prefix, shared="second")
    assert satlab_session.mode == "peer"
    assert "first-sleeper" not in satlab_session.lab.procs  # stopped when its test ended
    r = await satlab_session.arun("client", ["ip", "-4", "-o", "addr", "show", "eth0"])
    assert "10.78.1.2/24" in r.stdout
    satlab_session.lab.stop("pepa")  # the next test in this mode gets it back

@pytest.mark.satlab(pep="peer")
def test_shared_third(satlab_session):
    record(prefix=satlab_session.prefix, shared="third")
    assert satlab_session.lab.running("pepa")
    with pytest.raises(Exception, match="port 80 is already listening in node 'server'"):
        satlab_session.start("server", ["sleep", "9"], listen=80)
'''
    )
    result = pytester.runpytest_subprocess("-v", "-p", "no:cacheprovider", timeout=300)
    result.assert_outcomes(passed=4, failed=1)
    result.stdout.fnmatch_lines(["*assert '42\\n' == '43\\n'*"])
    seen = records(record)
    shared = {str(r["prefix"]) for r in seen if "shared" in r}
    assert len(shared) == 1, seen  # one lab for both tests of the same link
    assert_gone({str(r["prefix"]) for r in seen if "prefix" in r})
    [sleeper] = [int(r["pid"]) for r in seen if "pid" in r]  # type: ignore[call-overload]
    assert not pid_running(sleeper)
    [child] = [int(r["child"]) for r in seen if "child" in r]  # type: ignore[call-overload]
    assert not pid_running(child)  # started by a process the test started: its group stopped


def test_the_root_marker_skips_with_the_reason_and_fails_under_ci(
    pytester: pytest.Pytester, monkeypatch: pytest.MonkeyPatch
) -> None:
    pytester.makepyfile(
        """
import pytest

@pytest.mark.needs_root
def test_root(): pass

def test_lab(satlab): pass
"""
    )
    # Without iptables-legacy and ip on the PATH, neither test can run here.
    monkeypatch.setenv("PATH", str(pytester.path))
    monkeypatch.delenv("CI", raising=False)
    result = pytester.runpytest_subprocess("-rs", "-p", "no:cacheprovider", timeout=60)
    result.assert_outcomes(skipped=2)
    result.stdout.fnmatch_lines(["*`iptables-legacy` is not installed (Debian package iptables)"])
    monkeypatch.setenv("CI", "true")
    result = pytester.runpytest_subprocess("-p", "no:cacheprovider", timeout=60)
    result.assert_outcomes(errors=2)
    result.stdout.fnmatch_lines(["*CI=true but this test cannot run: `iptables-legacy`*"])


def test_two_labs_at_once_with_xdist(pytester: pytest.Pytester, record: Path) -> None:
    """Each test waits until the other's lab is up too, then fetches through its own."""
    one = (
        PRELUDE
        + f'''
@pytest.mark.satlab("leo", pep="none")
def test_lab_NAME(satlab):
    record(prefix=satlab.prefix, pid=os.getpid())
    deadline = time.monotonic() + 120
    while True:
        seen = map(json.loads, open(os.environ["{RECORD}"]))
        if others := [r for r in seen if r["prefix"] != satlab.prefix]:
            break
        assert time.monotonic() < deadline, "the other lab never came up"
        time.sleep(0.1)
    assert os.path.exists(f"/run/netns/{{others[0]['prefix']}}-link")  # both labs up at once
    assert fetch_sha256(satlab, 1_000_000) == "{body_sha256(1_000_000)}"
'''
    )
    pytester.makepyfile(test_a=one.replace("NAME", "a"), test_b=one.replace("NAME", "b"))
    result = pytester.runpytest_subprocess("-n", "2", "-p", "no:cacheprovider", timeout=300)
    result.assert_outcomes(passed=2)
    seen = records(record)
    assert len({r["pid"] for r in seen}) == 2, seen  # two workers, one lab each
    assert_gone({str(r["prefix"]) for r in seen})


def _until_recorded(path: Path, proc: subprocess.Popen[bytes]) -> str:
    deadline = time.monotonic() + 120
    while not (seen := records(path)):
        assert proc.poll() is None, proc.communicate()
        assert time.monotonic() < deadline, "no lab came up"
        time.sleep(0.1)
    return str(seen[0]["prefix"])


def test_interrupted_or_killed_runs_leave_nothing(pytester: pytest.Pytester, record: Path) -> None:
    """Ctrl-C, SIGTERM (the plugin makes it a KeyboardInterrupt): the teardown removes the
    lab. SIGKILL: nothing runs in the killed process, so
    its lab stays until the next run's first lab fixture, which removes it (its owner's pid,
    in the prefix, is gone)."""
    pytester.makepyfile(
        test_slow=PRELUDE
        + """
def test_waits(satlab):
    record(prefix=satlab.prefix)
    time.sleep(120)
""",
        test_sweep="def test_sweeps(satlab_prefix): pass\n",
    )
    argv = [sys.executable, "-m", "pytest", "-p", "no:cacheprovider", "test_slow.py"]
    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGKILL):
        record.unlink(missing_ok=True)
        proc = pytester.popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            prefix = _until_recorded(record, proc)
            proc.send_signal(sig)
            proc.wait(60)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
        if sig == signal.SIGKILL:
            assert lab_namespaces(prefix), "a killed run removed its lab?"
            result = pytester.runpytest_subprocess("-p", "no:cacheprovider", "test_sweep.py")
            result.assert_outcomes(passed=1)
        assert_gone({prefix})


def test_the_example_project(pytester: pytest.Pytester) -> None:
    """examples/satellite-http as a user copies it: curl and a trio client over GEO, without
    and with pep, byte-exact."""
    shutil.copytree(REPO / "examples" / "satellite-http", pytester.path, dirs_exist_ok=True)
    result = pytester.runpytest_subprocess("-v", "-s", "-p", "no:cacheprovider", timeout=300)
    result.assert_outcomes(passed=4)
    result.stdout.fnmatch_lines(["*GEO: 600 ms RTT*pep none: 2,000,000 bytes in*"])
    result.stdout.fnmatch_lines(["*GEO: 600 ms RTT*pep peer: 2,000,000 bytes in*"])
