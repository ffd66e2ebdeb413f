"""The lab's pure parts: profiles and value parsing, PEP-leg settings, tables, the object
protocol over loopback. No root needed."""

from __future__ import annotations

import dataclasses
import hashlib
import subprocess
import sys
import tomllib
from functools import partial

import pytest
import trio

from pep import config as config_mod
from pep.lab import bench, objects, report
from pep.lab import plan as lab_plan
from pep.lab.profiles import (
    PROFILES,
    LinkProfile,
    ParseError,
    format_size,
    parse_loss,
    parse_rate,
    parse_rtt,
    parse_sizes,
    profile,
)


@pytest.mark.parametrize(
    ("text", "ms"), [("600", 600.0), ("600ms", 600.0), ("0.6s", 600.0), (" 40 ", 40.0), ("0", 0.0)]
)
def test_parse_rtt(text: str, ms: float) -> None:
    assert parse_rtt(text) == ms


@pytest.mark.parametrize(
    ("text", "bps"),
    [
        ("20", 20_000_000),
        ("20mbit", 20_000_000),
        ("20M", 20_000_000),
        ("512kbit", 512_000),
        ("1gbit", 1_000_000_000),
        ("2.5", 2_500_000),
        ("0", 0),
        ("unlimited", 0),
    ],
)
def test_parse_rate(text: str, bps: int) -> None:
    assert parse_rate(text) == bps


@pytest.mark.parametrize(("text", "p"), [("0.5", 0.005), ("0.5%", 0.005), ("0", 0.0), ("3", 0.03)])
def test_parse_loss(text: str, p: float) -> None:
    assert parse_loss(text) == pytest.approx(p)


def test_parse_sizes_decimal_and_binary() -> None:
    assert parse_sizes("100k,1M,10M") == [100_000, 1_000_000, 10_000_000]
    assert parse_sizes("1MiB, 64KiB ,1500") == [1024**2, 64 * 1024, 1500]
    assert parse_sizes("2.5MB") == [2_500_000]


@pytest.mark.parametrize(
    ("fn", "text", "words"),
    [
        (parse_rtt, "fast", "RTT 'fast'"),
        (parse_rtt, "-5", "RTT"),
        (parse_rate, "20 parsecs", "rate"),
        (parse_rate, "1bit", "between 8 kbit/s"),
        (parse_loss, "100", "below 100"),
        (parse_loss, "lots", "percentage"),
        (parse_sizes, "1M,0", "between 1 byte"),
        (parse_sizes, "1Q", "size '1Q'"),
        (parse_sizes, "1M,1MB", "listed twice"),
        (profile, "mars", "unknown profile 'mars' (choose from geo, meo, leo, lan)"),
    ],
)
def test_parse_errors_name_the_value(fn, text: str, words: str) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(ParseError, match=None) as e:
        fn(text)
    assert words in str(e.value)


@pytest.mark.parametrize("n", [100_000, 1_000_000, 10_000_000, 2_500_000, 1024**2, 65536, 1500])
def test_format_size_round_trips(n: int) -> None:
    assert parse_sizes(format_size(n).replace(" ", "")) == [n]


def test_profiles_are_the_issues() -> None:
    geo = PROFILES["geo"]
    assert (geo.rtt_ms, geo.down_bps, geo.up_bps, geo.loss) == (600, 20e6, 5e6, 0)
    assert (PROFILES["meo"].rtt_ms, PROFILES["meo"].down_bps) == (150, 50e6)
    assert (PROFILES["leo"].rtt_ms, PROFILES["leo"].up_bps) == (40, 20e6)
    lan = PROFILES["lan"]
    assert lan.tbf("down") is None and lan.bdp_bytes("down") is None
    assert geo.describe() == "GEO: 600 ms RTT, 20 Mbit/s down, 5 Mbit/s up, 0 % loss"


def test_tbf_and_bdp_for_geo() -> None:
    geo = PROFILES["geo"]
    assert geo.bdp_bytes("down") == 1_500_000 and geo.bdp_packets("down") == 1036
    tbf = geo.tbf("down")
    assert tbf == {"rate": 2_500_000, "burst": 5000, "limit": 1_505_000}
    assert geo.tbf("up") == {"rate": 625_000, "burst": 4000, "limit": 379_000}


def test_queue_override_sizes_the_tbf_queue() -> None:
    geo = PROFILES["geo"].with_overrides(queue_ms=100)
    assert geo.tbf("down") == {"rate": 2_500_000, "burst": 5000, "limit": 255_000}
    assert geo.describe().endswith("0 % loss, 100 ms queue")
    assert LinkProfile.from_json(geo.to_json()) == geo


def test_overrides_and_json_round_trip() -> None:
    p = PROFILES["geo"].with_overrides(rtt_ms=500, down_bps=0, loss=0.005)
    assert (p.rtt_ms, p.down_bps, p.up_bps, p.loss) == (500, None, 5_000_000, 0.005)
    assert LinkProfile.from_json(p.to_json()) == p
    assert PROFILES["leo"].with_overrides() is PROFILES["leo"]


def test_link_table_from_the_profile_each_node_its_direction() -> None:
    geo = PROFILES["geo"]
    # pepb sends the downlink and receives the uplink; pepa the other way round.
    assert lab_plan.link_table(geo, "down") == {
        "interface": "sat0",
        "rtt": "600ms",
        "egress_rate": "20000000bit",
        "ingress_rate": "5000000bit",
    }
    assert lab_plan.link_table(geo, "up")["egress_rate"] == "5000000bit"  # type: ignore[index]
    assert lab_plan.link_table(PROFILES["lan"], "down") is None  # no delay, no rate
    assert lab_plan.link_table(geo.with_overrides(up_bps=0), "down") is None  # unlimited


def test_pep_config_is_accepted_by_pep_run(tmp_path) -> None:  # type: ignore[no-untyped-def]
    link = lab_plan.link_table(PROFILES["geo"], "down")
    text = lab_plan.pep_config_text("sat0", link, "/run/pep-lab/x/pepb.sock")
    path = tmp_path / "pepb.toml"
    path.write_text(text)
    cfg = config_mod.load(path, {})
    assert cfg.interfaces == ("sat0",)
    assert cfg.link is not None and cfg.link.egress_rate == 20_000_000
    assert (cfg.link.rtt, cfg.link.ingress_rate) == (0.6, 5_000_000)
    fields = {f.name for f in dataclasses.fields(config_mod.Config)}
    raw = tomllib.loads(text)
    assert raw.get("tcp_fastopen") is (True if "tcp_fastopen" in fields else None)
    assert ("fastopen_wait" in raw) == ("fastopen_wait" in fields)


def test_pep_config_without_fastopen_fields(monkeypatch) -> None:  # type: ignore[no-untyped-def]
    """An older pep (no TFO keys) gets a config it accepts: unknown keys would be refused."""
    real = dataclasses.fields

    def older(cls):  # type: ignore[no-untyped-def]
        newer = ("tcp_fastopen", "fastopen_wait", "drain_timeout", "status_socket", "link")
        return tuple(f for f in real(cls) if f.name not in newer)

    monkeypatch.setattr(lab_plan.dataclasses, "fields", older)
    link = lab_plan.link_table(PROFILES["geo"], "up")
    raw = tomllib.loads(lab_plan.pep_config_text("lan0", link, "/run/x/pepa.sock"))
    assert raw == {"interfaces": ["lan0"], "log_level": "info"}


def test_prefix_must_not_contain_a_dash() -> None:
    with pytest.raises(lab_plan.LabError, match="letters, digits or '_'"):
        lab_plan.LabSpec(PROFILES["geo"], prefix="lab-x")
    with pytest.raises(lab_plan.LabError, match="topology"):
        lab_plan.LabSpec(PROFILES["geo"], topology="ring")


def test_table_round_trips_through_its_parser() -> None:
    rows = [bench.Row(100_000, 2.41, 0.93), bench.Row(10_000_000, 9.1, 5.43)]
    text = report.format_table(rows)
    parsed = report.parse_table(text)
    assert [r["size"] for r in parsed] == ["100 KB", "10 MB"]
    assert parsed[0]["without_s"] == 2.41 and parsed[0]["with_s"] == 0.93
    assert parsed[0]["speedup"] == 2.6
    assert parsed[1]["goodput_with_mbit"] == pytest.approx(14.73)


def test_bench_rows_take_the_median() -> None:
    from pep.lab.workloads import Sample

    run = bench.BenchRun(PROFILES["leo"], "symmetric", ["single", "parallel"], 3)
    for rep, (w, wo) in enumerate(((1.0, 3.0), (9.0, 2.0), (2.0, 4.0))):
        for mode, t in (("with", w), ("without", wo)):
            trace = [(0.0, 0)] if mode == "with" else []
            run.samples.append(Sample("single", "1 KB", mode, rep, t, 0, {"size": 1000}, trace))
            par = {"median_s": t / 2, "slowest_s": t}
            run.samples.append(Sample("parallel", "6 x 1 MB", mode, rep, t, rep, par))
    [row] = run.rows()
    assert (row.with_s, row.without_s, row.speedup) == (2.0, 3.0, 1.5)
    assert run.trace("with") == [(0.0, 0)]
    doc = run.to_json()
    assert doc["summary"][0]["ratio"] == 1.5  # type: ignore[index]
    parallel = doc["summary"][1]  # type: ignore[index]
    assert parallel["case"] == "6 x 1 MB" and parallel["drops_with"] == 1
    assert len(doc["measurements"]) == 12  # type: ignore[arg-type]
    assert "6 x 1 MB" in report.format_summary(run.summaries())


def test_object_body_is_deterministic() -> None:
    assert objects.body(1000) == objects.body(1000)
    assert objects.body(1000) != objects.body(1001)[:1000]
    assert objects.body_sha256(5) == hashlib.sha256(objects.body(5)).hexdigest()


async def test_fetch_and_upload_over_loopback_check_every_byte() -> None:
    async with trio.open_nursery() as n:
        [listener] = await n.start(partial(trio.serve_tcp, objects.handle, 0, host="127.0.0.1"))
        port = listener.socket.getsockname()[1]
        with trio.fail_after(20):
            t = await objects.fetch(None, ("127.0.0.1", port), 3_000_000)
            assert t.size == 3_000_000 and t.samples[-1][1] == 3_000_000
            assert 0 < t.connect <= t.first_byte <= t.seconds
            u = await objects.upload(None, ("127.0.0.1", port), 2_000_000)
            assert u.size == 2_000_000
        n.cancel_scope.cancel()


async def test_keep_alive_session_serves_many_objects_on_one_connection() -> None:
    accepted = []

    async def counting(stream: trio.SocketStream) -> None:
        accepted.append(stream)
        await objects.handle(stream)

    async with trio.open_nursery() as n:
        [listener] = await n.start(partial(trio.serve_tcp, counting, 0, host="127.0.0.1"))
        port = listener.socket.getsockname()[1]
        with trio.fail_after(20):
            session = await objects.Session.open(None, ("127.0.0.1", port))
            sizes = [5_000, 200_000, 1, 70_000]
            got = [await session.get(size) for size in sizes]  # sha256 checked by each get
            session.close()
        assert [t.size for t in got] == sizes
        assert len(accepted) == 1
        n.cancel_scope.cancel()


async def test_fetch_refuses_corrupt_data() -> None:
    async def liar(stream: trio.SocketStream) -> None:
        await stream.receive_some(4096)
        data = bytearray(objects.body(100_000))
        data[5000] ^= 1
        await stream.send_all(b"HTTP/1.0 200 OK\r\nContent-Length: 100000\r\n\r\n" + data)
        await stream.aclose()

    async with trio.open_nursery() as n:
        [listener] = await n.start(partial(trio.serve_tcp, liar, 0, host="127.0.0.1"))
        port = listener.socket.getsockname()[1]
        with trio.fail_after(10), pytest.raises(objects.FetchError, match="sha256 mismatch"):
            await objects.fetch(None, ("127.0.0.1", port), 100_000)
        n.cancel_scope.cancel()


def test_cli_bad_value_is_a_usage_error_before_anything_is_built() -> None:
    r = subprocess.run(
        [sys.executable, "-m", "pep.ops.cli", "lab", "up", "--rtt", "soon", "--prefix", "nolab"],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert r.returncode == 2
    assert "pep lab: RTT 'soon'" in r.stderr


@pytest.mark.parametrize(
    ("rest", "prefix", "cmd"),
    [
        (["--", "ip", "addr"], None, ["ip", "addr"]),
        (["ip", "addr"], None, ["ip", "addr"]),
        (["--prefix", "x1", "--", "ls", "-l"], "x1", ["ls", "-l"]),
        (["--prefix=x1", "ls", "--prefix", "y"], "x1", ["ls", "--prefix", "y"]),  # the command's
        (["--", "--prefix", "y"], None, ["--prefix", "y"]),
        ([], None, []),
    ],
)
def test_exec_takes_the_options_before_the_command(
    rest: list[str], prefix: str | None, cmd: list[str]
) -> None:
    """D7: `pep lab exec NODE --prefix X -- CMD` runs CMD in lab X, not `--prefix X -- CMD` in
    the default lab."""
    from pep.lab.exec_node import split_exec

    assert split_exec(rest) == (prefix, cmd)


@pytest.mark.parametrize(
    ("rest", "words"),
    [
        (["--bogus", "--", "ls"], "unknown option '--bogus' before the command"),
        (["-h"], "unknown option '-h'"),
        (["--prefix"], "--prefix needs a value"),
        (["--prefix", "../etc", "--", "ls"], "prefix '../etc': 1-24 letters"),
        (["--prefix=", "ls"], "prefix '': 1-24 letters"),
    ],
)
def test_exec_refuses_unclear_options(rest: list[str], words: str) -> None:
    from pep.lab.exec_node import split_exec

    with pytest.raises(ParseError) as e:
        split_exec(rest)
    assert words in str(e.value)


@pytest.mark.parametrize(
    ("args", "words"),
    [
        (["status", "--prefix", "../etc"], "argument --prefix: prefix '../etc': 1-24 letters"),
        (["status", "--prefix="], "argument --prefix: prefix '': 1-24 letters"),
        (["down", "--prefix", "../etc"], "argument --prefix: prefix '../etc'"),
        (["fade", "5", "--prefix", "a-b"], "argument --prefix: prefix 'a-b'"),
        (["exec", "client", "--prefix", "../etc", "--", "ls"], "exec: --prefix: prefix '../etc'"),
        (["exec", "client", "--bogus", "--", "ls"], "exec: unknown option '--bogus'"),
        (["exec", "--prefix", "b1", "client", "--prefix", "a1", "ls"], "two prefixes, 'b1'"),
        (["exec", "client", "--prefix", "a1"], "exec: no command (usage: pep lab exec NODE"),
    ],
)
def test_every_subcommand_refuses_a_bad_prefix_before_anything_else(
    args: list[str], words: str
) -> None:
    """D8: exec and status refuse what down refuses (a prefix that is a path, or empty), as
    usage errors (exit 2), before the root check or any lookup."""
    r = subprocess.run(
        [sys.executable, "-m", "pep.ops.cli", "lab", *args],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert r.returncode == 2, r.stderr
    assert words in r.stderr, r.stderr
