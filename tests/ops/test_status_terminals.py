"""pep status, --json and the metrics per terminal ([link] plans): one source, the document's
link section (pep.link.plans rows), drawn as text, exported with a bounded label set, summed
over workers."""

from __future__ import annotations

from typing import Any

from pep.ops.status import document as status
from pep.ops.status import metrics
from pep.ops.status import render as status_render
from tests.helpers.status import sample_doc
from tests.ops.test_ops import metric_values


def terminal(name: str, legs: int, active: int, plan: int | None = 10_000_000) -> dict[str, Any]:
    return {
        "name": name,
        "egress_bps": plan,
        "ingress_bps": None if plan is None else plan // 5,
        "plan_capacity_bps": None if plan is None else round(plan * 0.956),
        "legs": legs,
        "legs_active": active,
        "share_bps": 4_780_000 * active,
        "send_rate_bps": 4_700_000 * active,
        "bytes_sent": 1000 * legs,
        "retransmits": 3,
        "lost": 1,
    }


def with_link(doc: dict[str, Any], rows: list[dict[str, Any]]) -> dict[str, Any]:
    doc["link"] = {
        "interface": "sat0",
        "rtt_s": 0.6,
        "egress_bps": 20_000_000,
        "ingress_bps": 5_000_000,
        "congestion": "bbr",
        "pacing_capacity_bps": 19_120_000,
        "flows": 4,
        "flows_active": 3,
        "flows_total": 9,
        "send_rate_bps": 18_000_000,
        "bytes_sent": 5000,
        "retransmits": 6,
        "congestion_restarts": 0,
        "ticks": 20,
        "tick_cpu_s": 0.001,
        "terminals": rows,
    }
    return doc


ROWS = [terminal("t1", 3, 2), terminal("t2", 0, 0), terminal("(other)", 1, 1, plan=None)]


def test_render_lists_the_terminals_that_have_legs() -> None:
    text = status_render.render(with_link(sample_doc(), ROWS))
    assert "terminals with link legs: 2 (of 3 seen)" in text
    row = next(line for line in text.splitlines() if line.strip().startswith("t1 "))
    assert row.split() == ["t1", "10", "Mbit/s", "/", "2", "Mbit/s", "9.56", "Mbit/s", "9.4",
                           "Mbit/s", "2/3", "active", "3", "1"]  # fmt: skip
    assert "(other)" in text and "none (no terminal)" in text
    assert not any(line.strip().startswith("t2 ") for line in text.splitlines())
    assert "terminals" not in status_render.render(with_link(sample_doc(), []))


def test_metrics_per_terminal_with_a_bounded_label_set() -> None:
    body, _ = metrics.exposition(with_link(sample_doc(), ROWS))
    v = metric_values(body.decode())
    assert v[("pep_terminal_share_bits", (("terminal", "t1"),))] == 9_560_000
    assert v[("pep_terminal_lost_total", (("terminal", "(other)"),))] == 1
    assert v[("pep_terminal_legs", (("state", "idle"), ("terminal", "t1")))] == 1
    assert v[("pep_terminal_plan_bits", (("direction", "egress"), ("terminal", "t2")))] == 10e6
    assert ("pep_terminal_plan_bits", (("direction", "egress"), ("terminal", "(other)"))) not in v
    labels = {dict(k[1]).get("terminal") for k in v if k[0].startswith("pep_terminal_")}
    assert labels == {"t1", "t2", "(other)"}


def test_workers_terminal_rows_add_up() -> None:
    a = with_link(sample_doc(0), [terminal("t1", 3, 2), terminal("t9", 1, 1)])
    b = with_link(sample_doc(1), [terminal("t1", 1, 1)])
    merged = status.merge(sample_doc(), [(0, a), (1, b)])
    rows = {r["name"]: r for r in merged["link"]["terminals"]}
    assert rows["t1"]["legs"] == 4 and rows["t1"]["legs_active"] == 3
    assert rows["t1"]["egress_bps"] == 10_000_000  # the plan, not twice it
    assert rows["t1"]["retransmits"] == 6 and rows["t9"]["legs"] == 1
    assert merged["link"]["flows"] == 8
