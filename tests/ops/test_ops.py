"""Unit tests for the operations layer: status document, metrics, reload plan, config keys."""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import re
import socket
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest
import trio
from prometheus_client.parser import text_string_to_metric_families

from pep.capture.syn_queue import SynCounters
from pep.config import Config, ConfigError, LegTuning, build, load
from pep.ops import systemd
from pep.ops.reload import RELOADABLE, plan_reload
from pep.ops.status import document as status
from pep.ops.status import metrics
from pep.ops.status import render as status_render
from pep.ops.status import socket as status_socket
from pep.split.connections import ConnectionTable, LatencyHistogram
from pep.split.relay_state import RelayStats
from tests.helpers.packets import PROC_TEXT
from tests.helpers.status import sample_doc


def test_document_counts_live_and_closed_bytes() -> None:
    doc = sample_doc()
    assert doc["totals"] == {"active": 2, "closed": 1, "bytes_up": 105, "bytes_down": 2007}
    rows = {c["client"]: c for c in doc["connections"]}
    assert rows["10.0.0.2:40000"] == {
        "client": "10.0.0.2:40000",
        "dst": "10.9.0.1:80",
        "flow": "10.9.0.1:80",
        "age": 3.0,
        "state": "open",
        "up": 100,
        "down": 2000,
        "connect_ms": 3.0,
        "worker": None,
    }
    assert rows["10.0.0.3:40001"]["dst"] == "[2001:db8::1]:443"
    assert rows["10.0.0.3:40001"]["state"] == "connecting"
    assert doc["upstream_failures"] == {"connect failed: ECONNREFUSED": 1}
    assert doc["connect_latency"]["counts"][0] == 0  # 3 ms is above 2.5 ms
    assert sum(doc["connect_latency"]["counts"]) == 2
    assert doc["syn"] == dataclasses.asdict(SynCounters(queued=5, split=4, unparsable=1))
    assert doc["uptime"] == 53.0
    assert doc["config"]["interfaces"] == ["eth1"]
    assert status.decode(status.encode(doc)) == json.loads(json.dumps(doc))


def test_document_config_with_networks_ranges_and_tables_is_json() -> None:
    """`pep status` failed for any config whose [[policy]] had dst/src or whose
    [[upstream_override]] had dst: dataclasses.asdict kept the ipaddress networks, which json
    cannot encode. Networks are now their text; tuples, nested tables and rules plain JSON."""
    cfg = build(
        {
            "interfaces": ["eth1"],
            "policy": [
                {
                    "name": "lan",
                    "action": "bypass",
                    "dst": ["10.0.0.0/8", "2001:db8::/32"],
                    "src": ["192.168.1.0/24"],
                    "dport": [22, "8000-8080"],
                }
            ],
            "upstream_override": [{"dst": ["10.9.0.0/16"], "nodelay": False, "sndbuf": 1 << 20}],
            "upstream": {"keepalive": True},
        }
    )
    doc = status.decode(status.encode(sample_doc(cfg=cfg)))  # through the socket's encoding
    assert doc["config"]["policy"] == [
        {
            "name": "lan",
            "action": "bypass",
            "dst": ["10.0.0.0/8", "2001:db8::/32"],
            "src": ["192.168.1.0/24"],
            "dport": [[22, 22], [8000, 8080]],
            "interface": [],
        }
    ]
    assert doc["config"]["upstream_override"] == [
        {"dst": ["10.9.0.0/16"], "changes": [["nodelay", False], ["sndbuf", 1 << 20]]}
    ]
    assert doc["config"]["upstream"]["keepalive"] is True
    assert doc["config"]["client"] == dataclasses.asdict(LegTuning())
    assert doc["config"]["interfaces"] == ["eth1"]
    assert "connections: 2 active" in status_render.render(doc)


def test_half_close_states() -> None:
    table = ConnectionTable()
    c = table.open(("a", 1), ("b", 2), "-")
    stats = RelayStats()
    table.established(c, stats, 0.0)
    assert c.state == "open"
    stats.up_eof = True
    assert c.state == "client-done"
    stats.down_eof = True
    assert c.state == "closing"


def test_histogram_buckets_are_upper_bounds() -> None:
    h = LatencyHistogram(bounds=(0.1, 1.0))
    for v in (0.05, 0.1, 0.5, 1.0, 7.0):
        h.observe(v)
    assert h.counts == [2, 2, 1] and h.count == 5


def test_fill_kernel_queues_only_with_our_portids(tmp_path: Path) -> None:
    proc = tmp_path / "nfq"
    proc.write_text(PROC_TEXT)
    doc = sample_doc()
    doc["kernel_queues"], doc["kernel_queues_error"] = None, "Permission denied"
    status.fill_kernel_queues(doc, str(proc))
    assert [r["portid"] for r in doc["kernel_queues"]] == [31415]
    other = sample_doc()
    other.update(kernel_queues=None, queue_portids=[4242])  # another namespace's queue 0
    status.fill_kernel_queues(other, str(proc))
    assert other["kernel_queues"] is None


def test_merge_sums_workers_and_reports_a_dead_one() -> None:
    master = sample_doc()
    merged = status.merge(master, [(0, sample_doc(0)), (1, sample_doc(1)), (2, "refused")])
    assert merged["totals"] == {"active": 4, "closed": 2, "bytes_up": 210, "bytes_down": 4014}
    assert merged["listener"]["accepted"] == 8 and merged["syn"]["queued"] == 10
    assert {c["worker"] for c in merged["connections"]} == {0, 1}
    assert merged["upstream_failures"] == {"connect failed: ECONNREFUSED": 2}
    assert sum(merged["connect_latency"]["counts"]) == 4
    assert [w["state"] for w in merged["workers"]] == ["running", "running", "down"]
    assert merged["workers"][2]["error"] == "refused"
    assert len(merged["kernel_queues"]) == 2
    assert merged["pid"] == master["pid"]


def test_render_shows_summary_and_table() -> None:
    text = status_render.render(sample_doc())
    assert "connections: 2 active, 2 split" in text
    assert "ECONNREFUSED" in text
    assert "SYN verdicts: 5 queued, 4 split, 1 not split (unparsable 1)" in text
    assert "kernel queue 0: 2 waiting" in text
    header = next(line for line in text.splitlines() if line.startswith("CLIENT"))
    assert header.split() == ["CLIENT", "DESTINATION", "AGE", "STATE", "UP", "DOWN"]
    assert "10.0.0.2:40000" in text and "2.0 kB" in text
    doc = sample_doc()
    doc.update(kernel_queues=None, kernel_queues_error="x: Permission denied")
    assert "kernel queues: unavailable (x: Permission denied)" in status_render.render(doc)


def test_decode_rejects_other_versions() -> None:
    with pytest.raises(status.StatusError, match="version"):
        status.decode(b'{"version": 99}')
    with pytest.raises(status.StatusError, match="JSON"):
        status.decode(b"{")


def metric_values(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    out = {}
    for fam in text_string_to_metric_families(text):
        for s in fam.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def test_metrics_exposition_parses_and_matches_document() -> None:
    body, ctype = metrics.exposition(sample_doc())
    assert ctype.startswith("text/plain")
    v = metric_values(body.decode())
    assert v[("pep_connections_active", ())] == 2
    assert v[("pep_connections_total", ())] == 2
    assert v[("pep_relayed_bytes_total", (("direction", "up"),))] == 105
    assert v[("pep_relayed_bytes_total", (("direction", "down"),))] == 2007
    assert v[("pep_syn_queued_total", ())] == 5
    assert v[("pep_syn_unsplit_total", ())] == 1
    assert v[("pep_upstream_connect_failures_total", (("reason", "ECONNREFUSED"),))] == 1
    assert v[("pep_upstream_connect_seconds_count", ())] == 2
    assert v[("pep_upstream_connect_seconds_bucket", (("le", "0.005"),))] == 1
    assert v[("pep_upstream_connect_seconds_bucket", (("le", "+Inf"),))] == 2
    assert v[("pep_queue_waiting", (("queue", "0"),))] == 2
    body, ctype = metrics.exposition(sample_doc(), "application/openmetrics-text")
    assert ctype.startswith("application/openmetrics-text") and body.endswith(b"# EOF\n")


def test_reason_labels() -> None:
    assert metrics.reason_label("connect failed: ECONNREFUSED") == "ECONNREFUSED"
    assert metrics.reason_label("connect timeout") == "timeout"


def test_reload_plan_applies_tuning_and_keeps_restart_keys() -> None:
    old = Config(interfaces=("eth1",), client=LegTuning(sndbuf=65536))
    new = dataclasses.replace(
        old,
        interfaces=("eth2",),
        listen_port=6000,
        idle_timeout=5.0,
        upstream=LegTuning(nodelay=False),
        client=LegTuning(),  # sndbuf unset: a listening socket cannot go back to autotuning
    )
    plan = plan_reload(old, new)
    assert plan.changed == ("idle_timeout", "upstream")
    assert set(plan.kept) == {"interfaces", "listen_port", "client.sndbuf"}
    assert plan.config.idle_timeout == 5.0 and plan.config.upstream.nodelay is False
    assert plan.config.interfaces == ("eth1",) and plan.config.listen_port == 5000
    assert plan.config.client.sndbuf == 65536
    assert plan_reload(old, old).changed == ()


def test_reloadable_keys_exist() -> None:
    assert {f.name for f in dataclasses.fields(Config)} >= RELOADABLE


@pytest.mark.parametrize(
    ("settings", "key", "fragment"),
    [
        ({"drain_timeout": -1}, "drain_timeout", "between"),
        ({"status_socket": "relative.sock"}, "status_socket", "absolute"),
        ({"status_socket": "/" + "x" * 120}, "status_socket", "too long"),
        ({"metrics_listen": "9560"}, "metrics_listen", "IPV4:PORT"),
        ({"metrics_listen": "127.0.0.1:70000"}, "metrics_listen", "port 1-65535"),
        ({"metrics_listen": "example.org:9560"}, "metrics_listen", "IPV4:PORT"),
        ({"workers": 0}, "workers", "between 1 and 128"),
        ({"workers": 2, "queue": 65535}, "workers", "exceeds 65535"),
        ({"workers": 2, "status_socket": ""}, "status_socket", "workers > 1"),
    ],
)
def test_ops_config_errors(settings: dict[str, object], key: str, fragment: str) -> None:
    with pytest.raises(ConfigError) as exc:
        build(settings)
    assert exc.value.key == key and fragment in str(exc.value)


def test_ops_config_accepts(tmp_path: Path) -> None:
    p = tmp_path / "pep.toml"
    p.write_text(
        'interfaces = ["eth1"]\nworkers = 4\ndrain_timeout = 0\nmetrics_listen = "[::1]:9560"\n'
    )
    cfg = load(p, {})
    assert (cfg.workers, cfg.drain_timeout, cfg.metrics_listen) == (4, 0.0, "[::1]:9560")
    assert cfg.status_socket == "/run/pep/pep.sock"


SAMPLE = Path(__file__).parents[2] / "deploy" / "pep.toml"


def test_sample_config_lists_every_key_and_is_valid_uncommented() -> None:
    """deploy/pep.toml shows every key; as shipped and with every setting uncommented it loads."""
    text = SAMPLE.read_text()
    for f in dataclasses.fields(Config):
        assert re.search(rf"^#?({f.name} = |\[\[?{f.name}\]\]?$)", text, re.M), f.name
    for f in dataclasses.fields(LegTuning):
        assert re.search(rf"^#?{f.name} = ", text, re.M), f"client/upstream {f.name} missing"
    assert load(SAMPLE, {}).interfaces == ("eth1",)
    uncommented = re.sub(r"^#(?=[a-z_\[])", "", text, flags=re.M)
    cfg = build(tomllib.loads(uncommented))
    assert cfg.metrics_listen == "127.0.0.1:9560" and cfg.upstream.congestion == "cubic"
    assert cfg.client.keepcnt == 9 and [r.name for r in cfg.policy] == ["no-ssh"]


def test_sd_notify(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = str(tmp_path / "notify")
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as rx:
        rx.bind(path)
        monkeypatch.setenv("NOTIFY_SOCKET", path)
        assert systemd.notify("READY=1", "STATUS=ok")
        assert rx.recv(100) == b"READY=1\nSTATUS=ok"
    monkeypatch.delenv("NOTIFY_SOCKET")
    assert not systemd.notify("READY=1")


async def test_status_socket_roundtrip_permissions_and_stale_file(tmp_path: Path) -> None:
    path = str(tmp_path / "pep.sock")
    doc = sample_doc()

    async def get() -> status.Doc:
        return doc

    sock = status_socket.bind_unix(path)
    assert oct(os.stat(path).st_mode & 0o777) == "0o660"
    async with trio.open_nursery() as n:
        n.start_soon(status_socket.serve_status, sock, get)
        got = await status_socket.afetch(path)
        got_blocking = await trio.to_thread.run_sync(status_socket.fetch, path)
        with pytest.raises(status.StatusError, match="in use"):
            status_socket.bind_unix(path)
        n.cancel_scope.cancel()
    assert got == got_blocking == json.loads(json.dumps(doc))
    # The daemon was killed: the file stays, nothing answers; a new daemon takes it over.
    assert os.path.exists(path)
    with pytest.raises(status_socket.NotRunning):
        status_socket.fetch(path)
    status_socket.bind_unix(path).close()


def test_a_status_socket_outside_pep_s_directory_creates_nothing(tmp_path: Path) -> None:
    """D6: pep makes no directories outside its runtime directory (a typo in status_socket
    once left /nonexistent/dir behind); the error names the directory."""
    path = tmp_path / "no" / "such" / "dir" / "x.sock"
    with pytest.raises(status.StatusError, match=r"directory .*/no/such/dir does not exist"):
        status_socket.bind_unix(str(path))
    assert not (tmp_path / "no").exists()


async def test_fetch_deadline_covers_the_whole_read(tmp_path: Path) -> None:
    """A daemon that trickles its answer is given up on after ``timeout`` in all. The
    blocking client used to apply it per recv, so a byte every 0.2 s kept `pep status`
    waiting for as long as the daemon kept trickling."""
    path = str(tmp_path / "slow.sock")
    listener = trio.SocketListener(trio.socket.from_stdlib_socket(status_socket.bind_unix(path)))

    async def trickle(stream: trio.SocketStream) -> None:
        with contextlib.suppress(trio.BrokenResourceError):
            while True:
                await stream.send_all(b" ")
                await trio.sleep(0.2)

    async with trio.open_nursery() as n:
        await n.start(trio.serve_listeners, trickle, [listener])
        t0 = trio.current_time()
        with trio.fail_after(3), pytest.raises(status.StatusError, match=r"within 0\.6 s"):
            await trio.to_thread.run_sync(status_socket.fetch, path, 0.6, abandon_on_cancel=True)
        assert trio.current_time() - t0 < 1.5
        n.cancel_scope.cancel()


def test_cli_status_without_daemon_exits_3(tmp_path: Path) -> None:
    r = subprocess.run(
        [sys.executable, "-m", "pep.ops.cli", "status", "--socket", str(tmp_path / "none.sock")],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert r.returncode == 3
    assert "no pep daemon is running" in r.stderr and "none.sock" in r.stderr


# A child that asks for SIGTERM when its parent dies (as a worker does), then exits 0 after
# a while: -SIGTERM means the death signal fired while the parent was still alive.
_DEATH_SIGNAL_CHILD = (
    "import time; from pep.ops.systemd import set_parent_death_signal; "
    "set_parent_death_signal(); time.sleep(2.0)"
)


async def test_worker_death_signal_outlives_trio_worker_threads(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """PR_SET_PDEATHSIG follows the thread that forked the child. trio.lowlevel.open_process
    forks in a cached thread that exits when idle (10 s; shortened here), which used to send
    every worker SIGTERM 10 s after it started; workers are forked from the main thread."""
    from pep.ops.workers import WorkerProcess

    # Long enough for the child to start and set its death signal, short for a unit test.
    monkeypatch.setattr("trio._core._thread_cache.IDLE_TIMEOUT", 0.5)
    proc = WorkerProcess([sys.executable, "-c", _DEATH_SIGNAL_CHILD], dict(os.environ))
    assert proc.returncode is None
    await trio.to_thread.run_sync(lambda: None)  # a cached thread that exits while we wait
    with trio.fail_after(10):
        assert await proc.wait() == 0
    assert await proc.wait() == 0  # a second wait returns at once
