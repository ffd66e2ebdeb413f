"""pep/kernel/iptables_setup.py: what RuleSpec checks (and leaves to the config), and the real rules
in
throwaway namespaces.

python-iptables acts on the network namespace of the calling process, so the code under test
runs in a subprocess started with ``ip netns exec`` (pep.testing.netenv.in_ns); the checks read the
kernel's view back with ``iptables-legacy -S`` (python-iptables writes the legacy backend).
"""

from __future__ import annotations

import shutil
import sys

import pytest

from pep import config
from pep.config import ConfigError
from pep.kernel.iptables_setup import RuleSpec, expected_rules
from pep.testing.netenv import in_ns, ipt, run_in

SPEC = "RuleSpec(('eth1',), (0, 0), 8888, 0x5E9, 0xFFFF)"

MANGLE_ETH1 = [
    "-N PEP_SYN",
    "-A PREROUTING -i eth1 -p tcp -m comment --comment pep -j PEP_SYN",
    "-A PEP_SYN -p tcp -m addrtype ! --dst-type LOCAL "
    "-m tcp --tcp-flags FIN,SYN,RST,ACK SYN -j NFQUEUE --queue-num 0 "
    "--queue-bypass",
]
NAT_ETH1 = [
    "-N PEP_REDIRECT",
    "-A PREROUTING -i eth1 -p tcp -m comment --comment pep -j PEP_REDIRECT",
    "-A PEP_REDIRECT -p tcp -m mark --mark 0x5e9/0xffff -j REDIRECT --to-ports 8888",
]


# ---------------------------------------------------------------------------------------------
# helpers (the ``netns`` fixture is tests/conftest.py's; in_ns and ipt are pep/testing/netenv.py's)


def rules(ns: str, table: str) -> list[str]:
    """``iptables-legacy -t TABLE -S`` without the built-in chains' policy lines."""
    return [line for line in ipt(ns, "-t", table, "-S") if not line.startswith("-P ")]


def pep_free(ns: str) -> bool:
    return not any("PEP" in line for table in ("mangle", "nat") for line in rules(ns, table))


# ---------------------------------------------------------------------------------------------
# RuleSpec (no privileges needed)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"interfaces": "eth1"}, "not the string"),
        ({"chain_prefix": ""}, "chain_prefix"),
        ({"chain_prefix": "P" * 20}, "chain_prefix"),
        ({"chain_prefix": "PEP X"}, "chain_prefix"),
    ],
)
def test_rulespec_rejects_bad_values(kwargs: dict[str, object], match: str) -> None:
    """What only RuleSpec sees: its own chain_prefix argument, and a string where its
    normalisation to a tuple would split the name into letters."""
    args: dict[str, object] = {
        "interfaces": ("eth1",),
        "queues": (0, 0),
        "listen_port": 8888,
        "split_mark": 0x5E9,
        "mark_mask": 0xFFFF,
    }
    args.update(kwargs)
    with pytest.raises(ValueError, match=match):
        RuleSpec(**args)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("settings", "key"),
    [
        ({"interfaces": []}, "interfaces"),
        ({"interfaces": ["eth1", "eth1"]}, "interfaces"),
        ({"interfaces": ["a-name-too-long-for-linux"]}, "interfaces"),
        ({"interfaces": ["eth 1"]}, "interfaces"),
        ({"queues": "3-0"}, "queues"),
        ({"queues": "0-70000"}, "queues"),
        ({"listen_port": 0}, "listen_port"),
        ({"split_mark": 0x10000}, "split_mark"),
        ({"split_mark": 0}, "split_mark"),
        ({"mark_mask": 0}, "mark_mask"),
        ({"mode": "tproxy", "tproxy_mark": 0x1}, "tproxy_mark"),
    ],
)
def test_config_refuses_the_values_rulespec_no_longer_checks(
    settings: dict[str, object], key: str
) -> None:
    """RuleSpec is built from a validated Config (pep.ops.daemon.rule_spec) and does not check
    these again: each one stops at the config, before any rule is planned."""
    with pytest.raises(ConfigError) as exc:
        config.load(None, {"interfaces": ["eth1"], **settings})
    assert exc.value.key == key


def test_rulespec_normalises_lists_to_tuples() -> None:
    spec = RuleSpec(["eth1", "eth2"], [1, 2], 8888, 0x5E9, 0xFFFF)  # type: ignore[arg-type]
    assert spec.interfaces == ("eth1", "eth2")
    assert spec.queues == (1, 2)
    hash(spec)  # frozen and hashable


def test_expected_rules_full_mask_prints_bare_mark() -> None:
    spec = RuleSpec(("eth1",), (0, 0), 8888, 0x5E9, 0xFFFFFFFF, chain_prefix="X1")
    assert expected_rules(spec) == [
        "-t mangle -A PREROUTING -i eth1 -p tcp -m comment --comment x1 -j X1_SYN",
        "-t mangle -A X1_SYN -p tcp -m addrtype ! --dst-type LOCAL "
        "-m tcp --tcp-flags FIN,SYN,RST,ACK SYN -j NFQUEUE "
        "--queue-num 0 --queue-bypass",
        "-t nat -A PREROUTING -i eth1 -p tcp -m comment --comment x1 -j X1_REDIRECT",
        "-t nat -A X1_REDIRECT -p tcp -m mark --mark 0x5e9 -j REDIRECT --to-ports 8888",
    ]


# ---------------------------------------------------------------------------------------------
# the real rules, in a namespace


@pytest.mark.netns
def test_install_gives_exactly_the_expected_rules(netns: str) -> None:
    in_ns(netns, f"s.install({SPEC})")
    assert rules(netns, "mangle") == MANGLE_ETH1
    assert rules(netns, "nat") == NAT_ETH1


@pytest.mark.netns
def test_install_twice_keeps_one_set(netns: str) -> None:
    in_ns(netns, f"s.install({SPEC})\ns.install({SPEC})")
    in_ns(netns, f"s.install({SPEC})")  # and again from a new process
    assert rules(netns, "mangle") == MANGLE_ETH1
    assert rules(netns, "nat") == NAT_ETH1


@pytest.mark.netns
def test_stale_rules_from_a_crashed_run_are_replaced(netns: str) -> None:
    in_ns(netns, "s.install(RuleSpec(('eth9',), (3, 3), 9999, 0x5E9, 0xFFFF))")
    # the crashed run also left a jump of another shape at the bottom
    ipt(netns, "-t", "mangle", "-A", "PREROUTING", "-i", "eth7", "-j", "PEP_SYN")
    in_ns(netns, f"s.install({SPEC})")
    assert rules(netns, "mangle") == MANGLE_ETH1
    assert rules(netns, "nat") == NAT_ETH1


@pytest.mark.netns
def test_remove_counts_rules_then_is_a_noop(netns: str) -> None:
    counts = in_ns(
        netns,
        f"""
        s.install({SPEC})
        result = [s.remove(), s.remove(), s.show()]
        """,
    )
    assert counts == [4, 0, []]  # 2 tables x (1 jump + 1 rule in our chain)
    assert rules(netns, "mangle") == []
    assert rules(netns, "nat") == []
    assert pep_free(netns)


@pytest.mark.netns
def test_remove_on_a_fresh_namespace_returns_zero(netns: str) -> None:
    assert in_ns(netns, "result = [s.remove(), s.show()]") == [0, []]


@pytest.mark.netns
def test_remove_deletes_stale_jumps_and_an_emptied_chain(netns: str) -> None:
    in_ns(netns, f"s.install({SPEC})")
    ipt(netns, "-t", "mangle", "-A", "PREROUTING", "-i", "eth7", "-j", "PEP_SYN")
    ipt(netns, "-t", "nat", "-F", "PEP_REDIRECT")
    # mangle: 2 jumps + 1 rule; nat: 1 jump + empty chain
    assert in_ns(netns, "result = s.remove()") == 4
    assert pep_free(netns)


@pytest.mark.netns
def test_user_rules_and_chains_are_untouched(netns: str) -> None:
    for table in ("mangle", "nat"):
        ipt(netns, "-t", table, "-N", "USERCHAIN")
        ipt(netns, "-t", table, "-A", "USERCHAIN", "-p", "udp", "-j", "RETURN")
        ipt(netns, "-t", table, "-A", "PREROUTING", "-i", "eth1", "-p", "tcp", "-j", "ACCEPT")
        ipt(netns, "-t", table, "-A", "PREROUTING", "-j", "USERCHAIN")
        # a user rule that happens to carry our comment is still not ours: its target is not
        ipt(netns, "-t", table, "-A", "PREROUTING", "-m", "comment", "--comment", "pep",
            "-j", "RETURN")  # fmt: skip
    before = {table: rules(netns, table) for table in ("mangle", "nat")}

    in_ns(netns, f"s.install({SPEC})")
    # our jump sits at the top, above the user's ACCEPT; the user's rules follow in order
    mangle = rules(netns, "mangle")
    assert mangle[mangle.index("-A PREROUTING -i eth1 -p tcp -j ACCEPT") - 1] == MANGLE_ETH1[1]
    assert [line for line in mangle if line not in MANGLE_ETH1] == before["mangle"]
    nat = rules(netns, "nat")
    assert nat[nat.index("-A PREROUTING -i eth1 -p tcp -j ACCEPT") - 1] == NAT_ETH1[1]
    assert [line for line in nat if line not in NAT_ETH1] == before["nat"]

    in_ns(netns, f"s.install({SPEC})")
    assert in_ns(netns, "result = s.remove()") == 4
    assert {table: rules(netns, table) for table in ("mangle", "nat")} == before


@pytest.mark.netns
def test_show_matches_the_installed_rules(netns: str) -> None:
    spec = "RuleSpec(('eth1', 'wg0'), (0, 0), 8888, 0x5E9, 0xFFFF)"
    shown, expected = in_ns(
        netns,
        f"""
        assert s.show() == []
        s.install({spec})
        result = [s.show(), s.expected_rules({spec})]
        """,
    )
    assert shown == expected
    assert shown == [
        "-t mangle -A PREROUTING -i eth1 -p tcp -m comment --comment pep -j PEP_SYN",
        "-t mangle -A PREROUTING -i wg0 -p tcp -m comment --comment pep -j PEP_SYN",
        MANGLE_ETH1[2].replace("-A", "-t mangle -A", 1),
        "-t nat -A PREROUTING -i eth1 -p tcp -m comment --comment pep -j PEP_REDIRECT",
        "-t nat -A PREROUTING -i wg0 -p tcp -m comment --comment pep -j PEP_REDIRECT",
        NAT_ETH1[2].replace("-A", "-t nat -A", 1),
    ]
    # every shown line is, minus its "-t TABLE", a line of iptables-legacy -S, in the same order
    for table in ("mangle", "nat"):
        mine = [
            line.removeprefix(f"-t {table} ") for line in shown if line.startswith(f"-t {table} ")
        ]
        assert mine == [line for line in rules(netns, table) if line.startswith("-A ")]


@pytest.mark.netns
def test_queue_range_uses_queue_balance(netns: str) -> None:
    in_ns(netns, "s.install(RuleSpec(('eth1',), (0, 3), 8888, 0x5E9, 0xFFFF))")
    assert rules(netns, "mangle")[2] == (
        "-A PEP_SYN -p tcp -m addrtype ! --dst-type LOCAL "
        "-m tcp --tcp-flags FIN,SYN,RST,ACK SYN -j NFQUEUE "
        "--queue-balance 0:3 --queue-bypass"
    )


@pytest.mark.netns
def test_two_prefixes_coexist_and_are_removed_separately(netns: str) -> None:
    result = in_ns(
        netns,
        f"""
        s.install({SPEC})
        s.install(RuleSpec(('eth2',), (5, 5), 9999, 0x100, 0xF00, chain_prefix='PEPB'))
        shown_b = s.show('PEPB')
        result = [shown_b, s.remove('PEPB'), s.show('PEPB'), s.show()]
        """,
    )
    shown_b, removed_b, after_b, after_default = result  # type: ignore[misc]
    assert "-t mangle -A PREROUTING -i eth2 -p tcp -m comment --comment pepb -j PEPB_SYN" in (
        shown_b
    )
    assert removed_b == 4
    assert after_b == []
    assert after_default == expected_rules(RuleSpec(("eth1",), (0, 0), 8888, 0x5E9, 0xFFFF))
    assert rules(netns, "mangle") == MANGLE_ETH1
    assert rules(netns, "nat") == NAT_ETH1


@pytest.mark.netns
def test_kernel_refusal_names_the_rule_and_rolls_back(netns: str) -> None:
    # Make the nat rule one the kernel refuses (TPROXY is valid in mangle only), after mangle
    # committed fine: install must name the rule, then remove what it had added.
    message = in_ns(
        netns,
        f"""
        import dataclasses
        from pep.kernel import rule_plan
        from pep.kernel.nfrule import ext
        s.install({SPEC})  # a previous good state: replaced, then rolled back to nothing
        real = rule_plan._redirect_rule
        tproxy = ext("TPROXY", on_port="1", tproxy_mark="0x1/0x1")
        rule_plan._redirect_rule = lambda *a: dataclasses.replace(real(*a), target=tproxy)
        try:
            s._install_family({SPEC}, 4)  # in this process, where the patch applies
        except RulesError as e:
            result = str(e)
        """,
    )
    assert isinstance(message, str)
    assert "-t nat -A PEP_REDIRECT" in message
    assert "can't commit" in message
    assert "b'" not in message  # python-iptables' bytes repr is cleaned up
    assert pep_free(netns)


@pytest.mark.netns
def test_without_cap_net_admin_errors_are_clear_and_nothing_changes(netns: str) -> None:
    if shutil.which("setpriv") is None:
        pytest.skip("setpriv (util-linux) is not installed")
    in_ns(netns, f"s.install({SPEC})")
    messages = in_ns(
        netns,
        f"""
        result = []
        for call in (lambda: s.install({SPEC}), s.remove, s.show):
            try:
                call()
            except RulesError as e:
                result.append(str(e))
        """,
        wrapper=["setpriv", "--bounding-set=-net_admin,-net_raw"],
    )
    assert isinstance(messages, list)
    assert len(messages) == 3
    for message in messages:
        assert "mangle" in message
        assert "Permission denied" in message
    assert rules(netns, "mangle") == MANGLE_ETH1  # a failure before any commit changes nothing
    assert rules(netns, "nat") == NAT_ETH1


@pytest.mark.netns
def test_remove_refuses_a_chain_another_chain_still_uses(netns: str) -> None:
    in_ns(netns, f"s.install({SPEC})")
    ipt(netns, "-t", "mangle", "-N", "USERCHAIN")
    ipt(netns, "-t", "mangle", "-A", "USERCHAIN", "-j", "PEP_SYN")
    message = in_ns(
        netns,
        """
        try:
            s.remove()
        except RulesError as e:
            result = str(e)
        """,
    )
    assert isinstance(message, str)
    assert "PEP_SYN" in message
    assert "still jumps to PEP_SYN" in message
    # mangle was left whole (one commit per table); nat was still cleaned up
    assert sorted(rules(netns, "mangle")) == sorted(
        [*MANGLE_ETH1, "-N USERCHAIN", "-A USERCHAIN -j PEP_SYN"]
    )
    assert rules(netns, "nat") == []


@pytest.mark.netns
def test_show_prints_odd_shaped_jumps_like_iptables_save(netns: str) -> None:
    """A hand-made or stale jump to our chain (negations, goto, quoting) shows as -S prints it."""
    in_ns(netns, f"s.install({SPEC})")
    ipt(netns, "-t", "mangle", "-A", "PREROUTING", "-s", "10.0.0.0/8", "!", "-d", "192.168.1.1",
        "!", "-i", "eth3", "!", "-p", "udp", "-m", "comment", "--comment", "crashed run",
        "-g", "PEP_SYN")  # fmt: skip
    ipt(netns, "-t", "mangle", "-A", "PREROUTING", "-p", "tcp", "-m", "tcp", "!", "--dport", "22",
        "-m", "mark", "!", "--mark", "0x1", "-j", "PEP_SYN")  # fmt: skip
    shown = in_ns(netns, "result = s.show()")
    assert isinstance(shown, list)
    mangle = [line.removeprefix("-t mangle ") for line in shown if line.startswith("-t mangle ")]
    assert mangle == [line for line in rules(netns, "mangle") if line.startswith("-A ")]
    assert mangle[1] == (
        "-A PREROUTING -s 10.0.0.0/8 ! -d 192.168.1.1/32 ! -i eth3 ! -p udp -m comment --comment "
        '"crashed run" -g PEP_SYN'
    )
    # ownership is by jump target: a fresh install replaces them
    in_ns(netns, f"s.install({SPEC})")
    assert rules(netns, "mangle") == MANGLE_ETH1


@pytest.mark.netns
def test_one_process_sees_changes_made_behind_its_back(netns: str) -> None:
    """python-iptables caches table handles per process: every call must re-read the kernel."""
    result = in_ns(
        netns,
        f"""
        import subprocess
        s.install({SPEC})
        first = len(s.show())
        subprocess.run(
            ["iptables-legacy", "-t", "mangle", "-A", "PREROUTING", "-i", "eth7", "-j", "PEP_SYN"],
            check=True,
        )
        result = [first, s.show()[1], s.remove(), s.show()]
        """,
    )
    assert result == [4, "-t mangle -A PREROUTING -i eth7 -j PEP_SYN", 5, []]
    assert pep_free(netns)


@pytest.mark.netns
def test_rules_remove_takes_the_routes_even_when_the_rules_fail(netns: str) -> None:
    """`pep rules remove` (the daemon's remove_rules): a refused netfilter removal leaves
    its table as it was but no longer keeps the policy routes in place; both are reported."""
    run_in(netns, ["ip", "link", "set", "lo", "up"])
    in_ns(
        netns,
        """
        from pep.kernel import tproxy_routes
        tproxy_routes.install(0x10000, 1513, (4, 6))
        s.install(RuleSpec(('eth1',), (0, 0), 8888, 0x5E9, 0xFFFF, mode='tproxy'))
        """,
    )
    ipt(netns, "-t", "mangle", "-N", "USERCHAIN")
    ipt(netns, "-t", "mangle", "-A", "USERCHAIN", "-j", "PEP_SYN")
    proc = run_in(netns, [sys.executable, "-m", "pep.ops.cli", "rules", "remove"])
    assert proc.returncode == 1
    assert in_ns(netns, "from pep.kernel import tproxy_routes\nresult = tproxy_routes.show()") == []
    assert "netfilter rules: removing pep's rules failed" in proc.stderr
    assert "still jumps to PEP_SYN" in proc.stderr
    assert any("PEP_SYN" in line for line in rules(netns, "mangle"))  # refused: left whole
