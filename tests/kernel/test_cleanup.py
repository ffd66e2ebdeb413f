"""pep/kernel/cleanup.py and the daemon's use of it: removal of pep's kernel state is best effort
(one failing kind does not keep another in place) and reports every failure."""

from __future__ import annotations

import pytest

from pep.config import Config
from pep.config.link import Link
from pep.kernel import cleanup, iptables_setup, link_routes, tproxy_routes
from pep.link import legs
from pep.ops import daemon


def failing(error: Exception, calls: list[str], name: str) -> cleanup.Remover:
    def remover(*args: object) -> int:
        calls.append(name)
        raise error

    return remover


def counting(n: int, calls: list[str], name: str) -> cleanup.Remover:
    def remover() -> int:
        calls.append(name)
        return n

    return remover


def test_every_step_runs_and_every_failure_is_reported() -> None:
    calls: list[str] = []
    rules_error = iptables_setup.RulesError("mangle: Too many links")
    bug = TypeError("a bug in a remover")
    steps = [
        ("netfilter rules", failing(rules_error, calls, "rules")),
        ("policy routing", counting(2, calls, "routes")),
        ("link metrics", failing(bug, calls, "metrics")),
    ]
    with pytest.raises(cleanup.KernelStateError) as exc:
        cleanup.remove(steps)
    assert calls == ["rules", "routes", "metrics"]
    assert exc.value.exceptions == (rules_error, bug)
    assert str(exc.value) == (
        "removing pep's kernel state failed: netfilter rules: mangle: Too many links; "
        "link metrics: a bug in a remover"
    )
    assert rules_error.__notes__ == ["(while removing pep's netfilter rules)"]


def test_counts_add_up_when_nothing_fails() -> None:
    calls: list[str] = []
    steps = [("a", counting(4, calls, "a")), ("b", counting(2, calls, "b"))]
    assert cleanup.remove(steps) == 6


def test_the_steps_cover_rules_and_routes() -> None:
    assert dict(cleanup.STEPS) == {
        "netfilter rules": iptables_setup.remove,
        "policy routing": tproxy_routes.remove,
        "link route metrics": link_routes.remove,
    }


def test_daemon_remove_rules_still_removes_routes_when_the_rules_fail(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Was ``iptables_setup.remove() + tproxy_routes.remove()``: a RulesError skipped the routes."""
    calls: list[str] = []
    error = iptables_setup.RulesError("nat: Permission denied")
    monkeypatch.setattr(
        cleanup,
        "STEPS",
        (
            ("netfilter rules", failing(error, calls, "rules")),
            ("policy routing", counting(2, calls, "routes")),
        ),
    )
    with pytest.raises(cleanup.KernelStateError):
        daemon.remove_rules()
    assert calls == ["rules", "routes"]


def test_install_rules_takes_its_routes_back_when_the_rules_fail(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    calls: list[str] = []
    error = iptables_setup.RulesError("cannot build rule `-t mangle -A PEP_SYN ...`")
    monkeypatch.setattr(link_routes, "remove", counting(0, calls, "no link"))
    monkeypatch.setattr(tproxy_routes, "install", lambda *a: calls.append("routes in"))
    monkeypatch.setattr(tproxy_routes, "remove", counting(2, calls, "routes out"))
    monkeypatch.setattr(iptables_setup, "install", failing(error, calls, "rules in"))
    cfg = Config(interfaces=("eth1",), mode="tproxy")
    with pytest.raises(iptables_setup.RulesError) as exc:
        daemon.install_rules(cfg)
    assert exc.value is error
    assert calls == ["no link", "routes in", "rules in", "routes out"]

    def refused() -> int:
        raise tproxy_routes.RoutingError("`ip -4 rule del ...`: Operation not permitted")

    monkeypatch.setattr(tproxy_routes, "remove", refused)
    with pytest.raises(iptables_setup.RulesError) as exc:
        daemon.install_rules(cfg)
    assert "removing the policy routes again also failed" in exc.value.__notes__[-1]


def test_install_rules_puts_the_link_routes_back_when_a_later_step_fails(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    calls: list[str] = []
    error = iptables_setup.RulesError("cannot build rule `-t nat -A PEP_REDIRECT ...`")
    monkeypatch.setattr(link_routes, "install", lambda *a: calls.append("link in"))
    monkeypatch.setattr(legs, "route_metrics", lambda link: {})  # sat0 is not here
    monkeypatch.setattr(link_routes, "remove", counting(1, calls, "link out"))
    monkeypatch.setattr(tproxy_routes, "remove", counting(0, calls, "no tproxy"))
    monkeypatch.setattr(iptables_setup, "install", failing(error, calls, "rules in"))
    link = Link("sat0", 0.6, 20_000_000, 5_000_000, None)
    with pytest.raises(iptables_setup.RulesError):
        daemon.install_rules(Config(interfaces=("eth1",), link=link))
    assert calls == ["link in", "no tproxy", "rules in", "link out"]
