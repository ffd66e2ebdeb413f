"""The plugin's pure parts: the ``satlab`` marker's keywords, the commands run in a node and
their errors, the listening ports of a namespace. No root needed."""

from __future__ import annotations

import os
import subprocess
import time

import pytest
import trio

from pep.lab.plan import LabSpec
from pep.lab.profiles import PROFILES, LinkProfile
from pep.lab.state import pid_running
from pep.testing.node_commands import (
    NodeCommandError,
    NodeCommandTimeout,
    argv_in,
    arun_grouped,
    listening_ports,
    run_grouped,
)
from pep.testing.satlab_options import SatlabError, cases, lab_config, merge


def test_defaults_are_what_pep_lab_up_builds() -> None:
    c = lab_config()
    assert (c.profile, c.topology, c.pep, c.options) == (PROFILES["geo"], "symmetric", "peer", ())
    spec = c.spec("pfx")
    assert spec == LabSpec(PROFILES["geo"], "symmetric", True, "pfx", peer=True)
    assert c.marker_kwargs() == {"profile": "geo", "topology": "symmetric", "pep": "peer"}


def test_values_go_through_the_lab_parsers() -> None:
    c = lab_config("leo", rtt="300ms", down="10", up="512kbit", loss="0.5%", queue=100)
    p = c.profile
    assert (p.name, p.rtt_ms, p.down_bps, p.up_bps, p.loss, p.queue_ms) == (
        "leo", 300.0, 10_000_000, 512_000, 0.005, 100.0,
    )  # fmt: skip
    assert lab_config(profile="geo", down=0).profile.down_bps is None  # 0 = unlimited
    assert lab_config(handover="15s/100ms").profile.handover == (15.0, 0.1)


def test_custom_profile_and_a_profile_object() -> None:
    c = lab_config(profile="custom", rtt=250, down=8, up=2, loss=1)
    assert c.profile == LinkProfile("custom", 250.0, 8_000_000, 2_000_000, 0.01)
    mine = LinkProfile("mine", 100, 1_000_000, 1_000_000)
    assert lab_config(mine).profile is mine
    assert lab_config(mine).marker_kwargs()["profile"] == "mine"


@pytest.mark.parametrize(
    ("args", "kwargs", "words"),
    [
        ((), {"pep": "maybe"}, "pep='maybe': choose 'none', 'direct', 'peer'"),
        ((), {"profile": "mars"}, "profile='mars': unknown profile 'mars'"),
        ((), {"rtt": "soon"}, "rtt='soon': RTT 'soon'"),
        ((), {"loss": 100}, "loss=100: loss '100': must be below 100 %"),
        ((), {"topology": "ring"}, "topology 'ring': choose"),
        ((), {"colour": "blue"}, "unknown keyword 'colour' (known: "),
        ((), {"prefix": "mine"}, "unknown keyword 'prefix'"),
        (("geo", "leo"), {}, "one positional argument"),
        (("geo",), {"profile": "leo"}, "the profile given twice"),
    ],
)
def test_bad_keywords_are_named(args: tuple[object, ...], kwargs: dict, words: str) -> None:  # type: ignore[type-arg]
    with pytest.raises(SatlabError) as e:
        lab_config(*args, **kwargs)
    assert str(e.value).startswith("satlab: ") and words in str(e.value), str(e.value)


def test_a_mode_the_topology_cannot_have_is_refused_before_any_lab() -> None:
    for topology, pep, words in [
        ("one-ended", "peer", "pep='peer' with topology='one-ended': it can have 'direct', "
         "'none' ([peer] needs a PEP at each end of the link)"),
        ("ha", "none", "pep='none' with topology='ha': it can have 'direct'"),
        ("ecmp", "peer", "pep='peer' with topology='ecmp': it can have 'direct'"),
    ]:  # fmt: skip
        with pytest.raises(SatlabError) as e:
            lab_config(topology=topology, pep=pep)
        assert words in str(e.value), str(e.value)
    with pytest.raises(SatlabError, match="pep='peer' with topology='one-ended'"):
        cases(merge([((), {"topology": "one-ended", "pep": ["none", "peer"]})]))
    # Told no mode: peer where the topology has it, direct where it does not.
    assert [lab_config(topology=t).pep for t in ("symmetric", "star", "one-ended", "ha")] == [
        "peer", "peer", "direct", "direct",
    ]  # fmt: skip
    assert lab_config(topology="one-ended", pep="none").pep == "none"


def test_further_labspec_fields_pass_through() -> None:
    """A topology's own options (the star's terminals, plans, terminal_pep) are LabSpec fields:
    whatever LabSpec declares beyond what the plugin decides goes through, sorted, so the config
    stays a key."""
    c = lab_config("leo", topology="star", terminals=4, terminal_pep=False)
    assert c.options == (("terminal_pep", False), ("terminals", 4))
    spec = c.spec("pfx")
    assert (spec.topology, spec.terminals, spec.terminal_pep) == ("star", 4, False)
    assert hash(c) and c.key != lab_config("leo", topology="star").key


def test_lists_make_one_case_each_with_its_id() -> None:
    [(label, single)] = cases({"profile": "leo"})
    assert label is None and single.profile.name == "leo"
    got = cases({"profile": ["geo", "leo"], "pep": ["none", "peer"], "loss": "1"})
    assert [label for label, _ in got] == ["geo-none", "geo-peer", "leo-none", "leo-peer"]
    assert [(c.profile.name, c.pep, c.profile.loss) for _, c in got][1] == ("geo", "peer", 0.01)
    assert [label for label, _ in cases({"profile": [PROFILES["meo"]]})] == ["meo"]
    with pytest.raises(SatlabError, match=r"pep=\[\]: an empty list runs nothing"):
        cases({"pep": []})


def test_the_shared_lab_key_leaves_the_mode_out() -> None:
    assert lab_config("leo", pep="none").key == lab_config("leo", pep="peer").key
    assert lab_config("leo").key != lab_config("leo", loss=1).key
    assert hash(lab_config("leo"))  # a config is a dict key


def test_nearer_markers_win() -> None:
    module, function = ((), {"profile": "leo", "pep": "none"}), (("meo",), {"loss": 1})
    assert merge([module, function]) == {"profile": "meo", "pep": "none", "loss": 1}
    with pytest.raises(SatlabError, match="given twice"):
        merge([(("geo",), {"profile": "leo"})])


def test_commands_run_through_ip_netns_exec() -> None:
    assert argv_in("x-client", ["curl", "-s"]) == ["ip", "netns", "exec", "x-client", "curl", "-s"]
    assert argv_in("x-client", "echo $HOME") == [
        "ip", "netns", "exec", "x-client", "sh", "-c", "echo $HOME",
    ]  # fmt: skip
    for bad in ([], [1, 2]):
        with pytest.raises(ValueError, match="non-empty list of strings"):
            argv_in("x", bad)  # type: ignore[arg-type]


def test_a_failed_command_names_its_node_and_shows_its_stderr() -> None:
    stderr = "".join(f"line {i}\n" for i in range(30)) + "curl: (7) Failed to connect\n"
    e = NodeCommandError("client", "p-client", 7, ["curl", "http://x/"], "", stderr)
    assert isinstance(e, subprocess.CalledProcessError) and e.returncode == 7
    text = str(e)
    assert text.startswith("in node 'client' (p-client): `curl http://x/` exited with status 7")
    assert text.endswith("    curl: (7) Failed to connect") and "line 10" not in text
    killed = str(NodeCommandError("server", "p-server", -9, "sleep 9", None, b""))
    assert "was killed by signal 9; it wrote nothing to stderr" in killed
    slow = NodeCommandTimeout("link", "p-link", ["sleep", "99"], 2.5, None, b"started\n")
    assert isinstance(slow, subprocess.TimeoutExpired)
    assert str(slow) == (
        "in node 'link' (p-link): `sleep 99` did not finish within 2.5 s (killed); its stderr "
        "ends:\n    started"
    )


# A shell that starts a child, says its pid (stdout) and something on stderr, then waits.
FAMILY = ["sh", "-c", "sleep 300 & echo $!; echo waiting >&2; read x; sleep 300"]


def gone(pid: int) -> bool:
    """SIGKILL was sent: the process is gone within moments (not at once: it exits on its own)."""
    deadline = time.monotonic() + 5
    while pid_running(pid) and time.monotonic() < deadline:
        time.sleep(0.01)
    return not pid_running(pid)


def test_a_command_that_times_out_is_killed_with_what_it_started() -> None:
    with pytest.raises(subprocess.TimeoutExpired) as e:
        run_grouped(FAMILY, input="line\n", timeout=1, text=True)
    assert e.value.stderr == "waiting\n"
    assert gone(int(e.value.output))
    r = run_grouped(["sh", "-c", "cat; printf '\\377' >&2"], input="in", timeout=5, text=True)
    assert (r.returncode, r.stdout, r.stderr) == (0, "in", "\ufffd")
    r = run_grouped(["cat"], input="in", timeout=5, text=False)
    assert r.stdout == b"in"


def test_the_trio_variant_too() -> None:
    async def main() -> None:
        with pytest.raises(subprocess.TimeoutExpired) as e:
            await arun_grouped(FAMILY, input="line\n", timeout=1, text=True)
        assert e.value.stderr == "waiting\n"
        assert gone(int(e.value.output))
        cmd = ["sh", "-c", "cat; printf '\\377' >&2"]
        r = await arun_grouped(cmd, input="in", timeout=5, text=True)
        assert (r.returncode, r.stdout, r.stderr) == (0, "in", "\ufffd")

    trio.run(main)


def test_listening_ports_from_proc_net_tcp() -> None:
    # Two sockets from a real /proc/net/tcp: one listening on :8000 (0x1F40), one established.
    table = (
        "  sl  local_address rem_address   st tx_queue rx_queue tr tm->when retrnsmt   uid\n"
        "   0: 02044E0A:1F40 00000000:0000 0A 00000000:00000000 00:00000000 00000000     0\n"
        "   1: 02044E0A:0050 02014E0A:D2F0 01 00000000:00000000 00:00000000 00000000     0\n"
    )
    assert listening_ports(table) == {8000}
    assert listening_ports("header only\n") == set()


def test_a_lab_prefix_names_its_owner_and_is_one_the_lab_takes() -> None:
    from pep.lab.plan import check_prefix
    from pep.testing.lab_prefix import _OWNED, new_prefix

    prefix = new_prefix()
    check_prefix(prefix)  # what `pep lab down` accepts
    m = _OWNED.match(prefix)
    assert m is not None and int(m.group(1)) == os.getpid()
    check_prefix(prefix.replace(str(os.getpid()), "4194304"))  # the largest pid still fits
    assert new_prefix() != prefix
