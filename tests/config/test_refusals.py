"""Inputs that were silently taken, or taken at great cost, and are refused now, each with the
key and the problem named (issue 20: D3, D4, and the "silent" ones): no root needed."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from pep.config import ConfigError, build, read_file
from pep.config import settings as settings_mod
from pep.config.peer import load_key
from pep.ops.status.document import StatusError, decode
from pep.support.errors import describe


def test_a_queue_range_beyond_the_machine_names_the_key() -> None:
    with pytest.raises(ConfigError) as e:
        build({"interfaces": ["eth0"], "queues": "0-65535"})
    assert e.value.key == "queues" and "65536 queues" in str(e.value)
    assert "per CPU" in str(e.value)
    most = settings_mod.max_queues()
    build({"interfaces": ["eth0"], "queues": f"0-{most - 1}"})  # the most it allows: fine


@pytest.mark.parametrize("path", ["/dev/zero", "/dev/null", "/"])
def test_a_config_that_is_not_a_regular_file_is_refused_unread(path: str) -> None:
    with pytest.raises(ConfigError, match=path.replace("/", "\\/") + "'"):
        read_file(path)


def test_a_fifo_and_a_huge_file_are_refused(tmp_path: Path) -> None:
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    with pytest.raises(ConfigError, match="not a regular file"):
        read_file(fifo)  # without a writer: refused at once, not waited on
    big = tmp_path / "big.toml"
    big.write_text("# " + "x" * settings_mod.CONFIG_MAX_BYTES)
    with pytest.raises(ConfigError, match=r"is \d+ bytes: a configuration is at most"):
        read_file(big)


@pytest.mark.parametrize(
    ("settings", "key", "text"),
    [
        ({"interfaces": "eth0"}, "interfaces", "must be a list, e.g. ['eth0']"),
        (
            {"interfaces": ["eth0"], "policy": [{"action": "bypass", "dst": "10.0.0.0/8"}]},
            "policy[0].dst",
            "must be a list",
        ),
        (
            {"interfaces": ["eth0"], "policy": [{"action": "bypass", "interface": "eth1"}]},
            "policy[0].interface",
            "must be a list",
        ),
        (
            {"interfaces": ["eth0"], "policy": [{"action": "bypass", "dst": ["10.0.0.1/8"]}]},
            "policy[0].dst",
            "host bits set: write 10.0.0.0/8 for the network, or 10.0.0.1 for the host",
        ),
        (
            {"interfaces": ["eth0"], "upstream_override": [{"dst": ["fd00::1/64"]}]},
            "upstream_override[0].dst",
            "host bits set",
        ),
    ],
)
def test_silent_shapes_are_refused(settings: dict[str, object], key: str, text: str) -> None:
    with pytest.raises(ConfigError) as e:
        build(settings)
    assert e.value.key == key and text in str(e.value)


def test_a_bare_address_is_its_host_network() -> None:
    cfg = build({"interfaces": ["eth0"], "policy": [{"action": "bypass", "dst": ["10.0.0.1"]}]})
    assert str(cfg.policy[0].dst[0]) == "10.0.0.1/32"


def test_a_key_file_of_text_that_is_not_hex_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "peer.key"
    path.write_text("g" * 64 + "\n")
    os.chmod(path, 0o600)
    with pytest.raises(ConfigError) as e:
        load_key(str(path))
    assert e.value.key == "peer.key_file" and "text that is not hex" in str(e.value)
    path.write_bytes(bytes(range(200, 240)))  # raw bytes, not text: a key
    assert len(load_key(str(path))) == 40


@pytest.mark.parametrize(
    ("data", "text"),
    [
        (b'{"version":1}', "'pid' is missing"),
        (
            b'{"version":1,"pid":1,"state":"running","uptime":1,"queues":[],"config":[]}',
            "'config' is list",
        ),
        (b"[" * 100_000 + b"]" * 100_000, "not valid JSON"),
    ],
)  # fmt: skip
def test_a_malformed_status_document_is_refused_whole(data: bytes, text: str) -> None:
    with pytest.raises(StatusError, match=text):
        decode(data)


def test_every_exception_says_something() -> None:
    import errno

    import trio

    assert describe(trio.TooSlowError()) == "timeout"
    assert describe(OSError(errno.ECONNRESET, "")) == "ECONNRESET: Connection reset by peer"
    assert describe(Exception()) == "Exception"
    assert describe(ValueError("bad header")) == "bad header"


def test_every_file_a_setting_names_has_the_same_guard(tmp_path: Path) -> None:
    """The terminals file and the key file are read as the config is (pep.config.files): a
    FIFO is refused at once instead of hanging a start or a SIGHUP, and so is a huge file."""
    from pep.config.terminals import TERMINALS_MAX_BYTES

    fifo = tmp_path / "fifo"
    os.mkfifo(fifo, 0o600)
    link = {"interface": "sat0", "rtt": "600ms", "egress_rate": "20mbit", "ingress_rate": "5mbit"}
    with pytest.raises(ConfigError, match=r"link\.terminals_file.*not a regular file"):
        build({"interfaces": ["sat0"], "link": {**link, "terminals_file": str(fifo)}})
    with pytest.raises(ConfigError, match=r"peer\.key_file.*not a regular file"):
        load_key(str(fifo))
    big = tmp_path / "terminals.txt"
    with open(big, "wb") as f:
        f.truncate(TERMINALS_MAX_BYTES + 1)
    with pytest.raises(ConfigError, match="a terminals file is at most"):
        build({"interfaces": ["sat0"], "link": {**link, "terminals_file": str(big)}})
