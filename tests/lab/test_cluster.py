"""The two-gateway labs' pure parts: the keepalived.conf pep.lab.cluster writes.

The namespace tests (test_cluster_lab.py) show keepalived acting on it; these check what it
says, and that keepalived's own parser (``keepalived -t``) accepts every keyword of it.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest

from pep.lab import cluster


def test_both_gateways_share_the_routers_and_differ_in_priority_only() -> None:
    a = cluster.keepalived_conf("gwa", "/run/x/gwa.sock", "/py")
    b = cluster.keepalived_conf("gwb", "/run/x/gwa.sock", "/py")
    assert re.findall(r"priority (\d+)", a) == ["150", "150"]
    assert re.findall(r"priority (\d+)", b) == ["100", "100"]
    differ = [(x, y) for x, y in zip(a.splitlines(), b.splitlines(), strict=True) if x != y]
    assert all("gwa" in x or "priority" in x for x, _ in differ), differ
    assert re.findall(r"virtual_router_id (\d+)", a) == ["51", "52"]
    assert "10.79.1.1/24 dev lan0" in a and "10.79.2.1/24 dev wan0" in a
    # Both instances in one sync group, both tracking pep: the addresses move together.
    assert a.count("pep_alive") == 3  # the script and its two uses
    assert re.search(r"group \{\s+LAN0\s+WAN0\s+\}", a)
    assert a.count("nopreempt") == 2 and a.count("state BACKUP") == 2  # nopreempt needs BACKUP
    assert 'script "/py -m pep.ops.cli status --socket /run/x/gwa.sock"' in a


def test_keepalived_parses_every_line(tmp_path: Path) -> None:
    if shutil.which("keepalived") is None:
        if os.environ.get("CI") == "true":
            pytest.fail("keepalived is not installed (deploy/setup.sh installs it)")
        pytest.skip("keepalived is not installed (deploy/setup.sh installs it)")
    conf = tmp_path / "keepalived.conf"
    conf.write_text(cluster.keepalived_conf("gwa", str(tmp_path / "pep.sock")))
    r = subprocess.run(
        ["keepalived", "-t", "-f", str(conf)], capture_output=True, text=True, timeout=30
    )
    # The interfaces exist only in the lab's namespaces; anything else is a real complaint
    # (an unknown keyword, a bad value).
    complaints = [
        line
        for line in (r.stdout + r.stderr).splitlines()
        if line.strip() and "doesn't exist" not in line and "Non-existent interface" not in line
    ]
    assert not complaints, complaints
