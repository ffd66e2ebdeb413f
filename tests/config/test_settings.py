"""Config validation: every bad value names its key, the value and what is allowed."""

from __future__ import annotations

import dataclasses
import subprocess
import sys
from ipaddress import ip_network
from pathlib import Path

import pytest

from pep.config import Config, ConfigError, LegTuning, build, load
from pep.config.policy import Rule
from pep.config.schema import choice, key, reloadable, seconds, table
from pep.ops.reload import RELOADABLE


def write(tmp_path: Path, text: str) -> Path:
    p = tmp_path / "pep.toml"
    p.write_text(text)
    return p


def test_defaults_and_file_and_flag_precedence(tmp_path: Path) -> None:
    p = write(
        tmp_path,
        'interfaces = ["eth1"]\nlisten_port = 6000\nqueue = 3\n'
        "[upstream]\nsndbuf = 65536\nnodelay = false\n",
    )
    cfg = load(p, {"listen_port": 7000, "queue": None, "interfaces": None})
    assert cfg.interfaces == ("eth1",)
    assert cfg.listen_port == 7000  # flag beats file
    assert cfg.queue == 3  # file beats default
    assert cfg.upstream == LegTuning(nodelay=False, sndbuf=65536)
    assert cfg.client == LegTuning()
    assert Config().listen_port == 5000 and Config().queue == 0


@pytest.mark.parametrize(
    ("text", "key", "fragment"),
    [
        ('interfaces = ["eth1"]\nlisten_port = 70000', "listen_port", "between 1 and 65535"),
        ('interfaces = ["eth1"]\nlisten_port = "80"', "listen_port", "integer"),
        ('interfaces = ["eth1"]\nlisten_prot = 80', "listen_prot", "unknown key"),
        ('interfaces = ["eth1", "eth1"]', "interfaces", "twice"),
        ('interfaces = ["bad/name"]', "interfaces", "not a valid interface name"),
        # iptables reads '!' as negation: RuleSpec refused it after config.build had passed it
        ('interfaces = ["eth!1"]', "interfaces", "not a valid interface name"),
        (
            'interfaces = ["eth1"]\n[[policy]]\naction = "split"\ninterface = ["a b"]',
            "policy[0].interface",
            "not a valid interface name",
        ),
        ("interfaces = []", "interfaces", "non-empty"),
        ('interfaces = ["eth1"]\nlog_level = "loud"', "log_level", "one of"),
        ('interfaces = ["eth1"]\nconnect_timeout = -1', "connect_timeout", "between"),
        ('interfaces = ["eth1"]\nqueue = true', "queue", "integer"),
        ('interfaces = ["eth1"]\ntcp_fastopen = "yes"', "tcp_fastopen", "true or false"),
        ('interfaces = ["eth1"]\nmode = "nat"', "mode", "one of redirect, tproxy"),
        ('interfaces = ["eth1"]\nfamily = "ipv5"', "family", "one of ipv4, ipv6, both"),
        ('interfaces = ["eth1"]\ntransparent_source = true', "transparent_source", "tproxy"),
        ('interfaces = ["eth1"]\nmode = "tproxy"\ntproxy_mark = 0x1', "tproxy_mark", "overlap"),
        ('interfaces = ["eth1"]\nroute_table = 254', "route_table", "kernel's own"),
        ('interfaces = ["eth1"]\n[[policy]]\naction = "drop"', "policy[0].action", "one of"),
        (
            'interfaces = ["eth1"]\n[[policy]]\naction = "bypass"\ndport = 70000',
            "policy[0].dport",
            "1-65535",
        ),
        (
            'interfaces = ["eth1"]\n[[policy]]\naction = "bypass"\ndport = "9-3"',
            "policy[0].dport",
            "A <= B",
        ),
        (
            'interfaces = ["eth1"]\n[[policy]]\naction = "split"\ndst = ["10.0.0.0/33"]',
            "policy[0].dst",
            "not an IP network",
        ),
        (
            'interfaces = ["eth1"]\n[[policy]]\naction = "split"\nport = 80',
            "policy[0].port",
            "unknown key",
        ),
        ('interfaces = ["eth1"]\ndefault_action = "drop"', "default_action", "one of"),
        ('interfaces = ["eth1"]\nsyn_verdict = "later"', "syn_verdict", "one of"),
        (
            'interfaces = ["eth1"]\n[[upstream_override]]\ncongestion = "reno"',
            "upstream_override[0]",
            "dst",
        ),
        (
            'interfaces = ["eth1"]\n[[upstream_override]]\ndst = ["10.0.0.0/8"]\nsndbuf = 1',
            "upstream_override[0].sndbuf",
            "between",
        ),
        ('interfaces = ["eth1"]\nfastopen_wait = 11', "fastopen_wait", "between"),
        (
            'interfaces = ["eth1"]\n[upstream]\ncongestion = "nosuchcc"',
            "upstream.congestion",
            "not available",
        ),
        ('interfaces = ["eth1"]\n[client]\nsndbuf = 1', "client.sndbuf", "between"),
        ('interfaces = ["eth1"]\n[client]\nfoo = 1', "client.foo", "unknown key"),
        ('interfaces = ["eth1"]\nsplit_mark = 0x10000\nmark_mask = 0xffff', "split_mark", "within"),
        ("listen_port = 5000", "interfaces", "at least one"),
        ('interfaces = ["eth1"\n', "--config", "not valid TOML"),
    ],
)
def test_bad_values_name_key_value_and_rule(
    tmp_path: Path, text: str, key: str, fragment: str
) -> None:
    with pytest.raises(ConfigError) as exc:
        load(write(tmp_path, text), {})
    assert exc.value.key == key
    assert fragment in str(exc.value)
    assert str(exc.value).startswith(f"config: {key} = ")


def test_policy_and_override_parse(tmp_path: Path) -> None:
    p = write(
        tmp_path,
        """interfaces = ["eth1"]
default_action = "bypass"
[[policy]]
name = "sat"
action = "split"
dst = ["198.51.100.0/24", "2001:db8::/32"]
dport = [80, "443", "8000-8100"]
[upstream]
sndbuf = 65536
[[upstream_override]]
dst = ["198.51.100.0/24"]
congestion = "reno"
""",
    )
    cfg = load(p, {})
    [rule] = cfg.policy
    assert (rule.name, rule.action, rule.dport) == (
        "sat",
        "split",
        ((80, 80), (443, 443), (8000, 8100)),
    )
    assert cfg.default_action == "bypass"
    sat = cfg.upstream_tuning("198.51.100.7")
    assert sat.congestion == "reno" and sat.sndbuf == 65536  # override merged over [upstream]
    assert cfg.upstream_tuning("192.0.2.1") == cfg.upstream


def test_build_refuses_what_the_rules_would_refuse() -> None:
    """config.build is the one check of interface names: what it passes, iptables takes."""
    for name in ("eth!1", "!eth1", "eth 1", "eth1:0", "a/b", "x" * 16, ""):
        with pytest.raises(ConfigError) as exc:
            build({"interfaces": [name]})
        assert exc.value.key == "interfaces" and exc.value.value == name
    with pytest.raises(ConfigError) as exc:
        load(None, {"interfaces": ["eth!1"]})  # --interface 'eth!1'
    assert exc.value.key == "interfaces"
    ok = ("eth1", "ppp+", "x" * 15)  # "+" is iptables' wildcard
    assert build({"interfaces": list(ok)}).interfaces == ok


def test_not_utf8_is_not_valid_toml(tmp_path: Path) -> None:
    """A file that is not UTF-8 was a UnicodeDecodeError traceback (exit 1)."""
    p = tmp_path / "bad.toml"
    p.write_bytes(b"\xff\xfe = 1\n")
    with pytest.raises(ConfigError) as exc:
        load(p, {})
    assert exc.value.key == "--config" and "is not valid TOML" in str(exc.value)
    for command in ("run", "status"):
        r = pep_cli(command, "--config", str(p))
        assert r.returncode == 2, r.stderr
        assert r.stderr.startswith(f"pep: config: --config = {str(p)!r}: is not valid TOML")
        assert r.stderr.endswith(": not UTF-8 (byte 0: invalid start byte)\n")


def test_typed_values() -> None:
    """Config.policy holds Rules, an override's dst holds networks: checked once, typed."""
    cfg = build(
        {
            "policy": [{"action": "bypass", "dst": ["10.0.0.0/8"]}],
            "upstream_override": [{"dst": ["2001:db8::/32"], "nodelay": False}],
        }
    )
    assert cfg.policy == (Rule(name="rule0", action="bypass", dst=(ip_network("10.0.0.0/8"),)),)
    assert cfg.upstream_override[0].dst == (ip_network("2001:db8::/32"),)
    assert cfg.upstream_override[0].changes == (("nodelay", False),)


def test_missing_file() -> None:
    with pytest.raises(ConfigError, match="does not exist"):
        load("/nonexistent/pep.toml", {})


def pep_cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "pep.ops.cli", *args], capture_output=True, text=True, timeout=30
    )


def test_cli_exits_2_with_message(tmp_path: Path) -> None:
    p = write(tmp_path, 'interfaces = ["eth1"]\nlisten_port = 0\n')
    r = pep_cli("run", "--config", str(p))
    assert r.returncode == 2
    assert "listen_port = 0" in r.stderr and "between 1 and 65535" in r.stderr


def test_cli_help_mentions_every_flag() -> None:
    r = subprocess.run(
        [sys.executable, "-m", "pep.ops.cli", "run", "--help"],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert r.returncode == 0
    for flag in ("--config", "--interface", "--listen-port", "--queue", "--log-level"):
        assert flag in r.stdout


def test_missing_interface_is_a_warning_at_start(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """`interfaces = ["nonexist0"]` started silently; it may come up later (ppp0), so pep
    still starts, but says so."""
    from pep.ops import daemon

    assert daemon.missing_interfaces(["eth1", "ppp0", "ppp+", "wg+"], ["lo", "eth1", "ppp1"]) == [
        "ppp0",
        "wg+",
    ]
    assert daemon.missing_interfaces(["lo"]) == []  # this namespace's own list
    installed = []
    monkeypatch.setattr(daemon.tproxy_routes, "remove", lambda: 0)
    monkeypatch.setattr(daemon.iptables_setup, "install", installed.append)
    with caplog.at_level("WARNING", logger="pep.ops.daemon"):
        daemon.install_rules(build({"interfaces": ["lo", "nonexist0"]}))
    assert [r.getMessage() for r in caplog.records] == [
        "interface nonexist0 does not exist (yet): its connections are split once it appears"
    ]
    assert installed[0].interfaces == ("lo", "nonexist0")  # the rule is installed all the same


def test_each_key_is_declared_once_with_its_check_and_reload_flag() -> None:
    """The fields are the declaration: build, the unknown-key message and RELOADABLE (the
    reload plan) all come from them, so none can drift from another."""
    for cls in (Config, LegTuning, Rule):
        for f in dataclasses.fields(cls):
            assert callable(f.metadata["check"]) and isinstance(f.metadata["reload"], bool)
    assert {f.name for f in dataclasses.fields(Config) if f.metadata["reload"]} == RELOADABLE
    assert {"policy", "client", "log_level"} <= RELOADABLE
    assert not {"interfaces", "listen_port", "status_socket", "queue"} & RELOADABLE
    with pytest.raises(ConfigError, match=r"unknown key \(allowed: backlog, client, "):
        build({"nosuch": 1})


def test_a_new_table_is_one_dataclass_and_one_field() -> None:
    """How a sub-table such as [client] is declared: a dataclass of key() fields, then
    ``table(cls)`` checks it, with the dotted names in errors and required keys enforced."""

    @dataclasses.dataclass(frozen=True)
    class Link:
        name: str = key(check=choice("sat", "lte"))  # required: no default
        rtt: float = key(0.6, seconds(0, 10), reload=True)

    check = table(Link)
    assert check("link", {"name": "sat"}) == Link("sat", 0.6)
    assert reloadable(Link) == {"rtt"}
    for raw, where in (({"name": "sat", "rtt": 99}, "link.rtt"), ({}, "link.name")):
        with pytest.raises(ConfigError) as exc:
            check("link", raw)
        assert exc.value.key == where
    with pytest.raises(ConfigError, match=r"link.mtu = 1: unknown key \(allowed: name, rtt\)"):
        check("link", {"name": "sat", "mtu": 1})
    with pytest.raises(ConfigError, match="must be a table with keys name, rtt"):
        check("link", 5)
