"""Build and remove a lab: namespaces, links, routes, tc, sysctls, and start its processes.

What is built comes from pep.lab.plan; the lab is recorded as it is built (pep.lab.state),
so ``status`` and ``down`` see a half-built lab for what it is. ``down`` finds everything
from the prefix alone (every namespace is ``{prefix}-{node}``), also after a crash.
"""

from __future__ import annotations

import datetime as dt
import os
import shutil
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

from pep.config.link import default_congestion
from pep.config.peer import keygen
from pep.lab import cluster, star_build
from pep.lab.plan import (
    HOST_TCP_RMEM,
    HOST_TCP_WMEM,
    PEP_NODES,
    SERVER_PORT,
    TFO_SYSCTL,
    TLS_CERT,
    TLS_PORT,
    LabError,
    LabSpec,
    check_prefix,
    link_table,
    peer_table,
    pep_config_text,
    plan,
)
from pep.lab.state import Lab, exists, lab_namespaces, state_root
from pep.support.errors import describe
from pep.testing.node_commands import netns_unavailable

__all__ = ["check_environment", "delayline_argv", "down", "up"]


def check_environment() -> None:
    """LabError saying why no lab can be built here (what the pytest plugin checks too)."""
    reason = netns_unavailable()
    if reason is not None:
        raise LabError(reason + (": run it with sudo" if os.geteuid() != 0 else ""))


def up(spec: LabSpec, progress: Callable[[str], None] | None = None) -> Lab:
    """Build the lab and start its processes; on any failure remove what was built."""
    say = progress or (lambda msg: None)
    check_environment()
    if exists(spec.prefix):
        raise LabError(
            f"a lab with prefix {spec.prefix!r} already exists "
            f"({', '.join(lab_namespaces(spec.prefix))}); "
            f"remove it with `pep lab down --prefix {spec.prefix}`"
        )
    lab = Lab(
        prefix=spec.prefix,
        topology=spec.topology,
        profile=spec.profile,
        pep=spec.pep,
        peer=spec.peer and spec.pep and spec.topology in ("symmetric", "star"),
        created=dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
    )
    if spec.topology == "star":
        lab.star = star_build.settings(spec)
    shutil.rmtree(lab.dir, ignore_errors=True)  # a stale state dir without namespaces
    lab.dir.mkdir(parents=True)
    try:
        if lab.topology in cluster.CLUSTERS:
            cluster.build(lab, say)
        elif lab.topology == "star":
            star_build.build(lab, say)
        else:
            _build(lab, say)
    except BaseException as e:
        down(spec.prefix, lab)
        if isinstance(e, LabError | OSError | ValueError):
            raise LabError(f"building lab {spec.prefix!r} failed: {describe(e)}") from e
        raise
    return lab


def _build(lab: Lab, say: Callable[[str], None]) -> None:
    from pyroute2 import NetNS

    from pep.testing.topology import Topology

    profile = lab.profile
    nodes, links, routes = plan(lab.topology)
    topo = Topology(lab.prefix)
    say(f"building {lab.topology} lab {lab.prefix!r}: {profile.describe()}")
    for node in nodes:
        lab.nodes[node] = {}
        topo.add_node(node, forwarding=node in ("pepa", "link", "pepb"))
        lab.save()  # early: status/down see a half-built lab for what it is
    for a, b in links:
        topo.link(a.node, a.name, a.addr, b.node, b.name, b.addr)
        lab.nodes[a.node][a.name] = a.addr
        lab.nodes[b.node][b.name] = b.addr
    peps = [n for n in PEP_NODES if n in nodes] if lab.pep else []
    tables = {node: link_table(profile, PEP_NODES[node][1]) for node in peps}
    lab.congestion = default_congestion() if any(tables.values()) else None
    for node, node_routes in routes.items():
        lab.settings.setdefault(node, [])
        for text in node_routes:
            dst, _, gw = text.partition(" via ")
            topo.route(node, dst, gw)
    for node in nodes:
        node_sysctls(lab, node, host=node in ("client", "server"), pep=node in peps)
    if profile.loss > 0:
        # The senders into the link hand it GSO packets of up to 64 KB; `-m statistic` would
        # drop one of those as one packet, i.e. up to 45 segments at a time and far fewer
        # loss events than the profile says. Segmenting before the link makes loss per packet.
        for a, b in links:
            for near, far in ((a, b), (b, a)):
                if far.node == "link":
                    disable_segmentation_offload(lab.ns(near.node), near.name)
                    lab.settings[near.node].append(f"{near.name}: TSO/GSO off (loss per packet)")
    # Rate: tbf on each direction's egress from the link node.
    with NetNS(lab.ns("link")) as ipr:
        for ifname, direction in (("cl0", "down"), ("sv0", "up")):
            params = profile.tbf(direction)
            if params is None:
                continue
            index = ipr.link_lookup(ifname=ifname)[0]
            ipr.tc("add", "tbf", index, handle="1:", **params)
            lab.settings["link"].append(
                f"{ifname}: tbf rate {params['rate'] * 8} bit/s burst {params['burst']} "
                f"limit {params['limit']} ({direction}link)"
            )
    lab.save()
    # The processes start in parallel (each needs a second or so to import and bind).
    waits = []
    if profile.rtt_ms > 0 or profile.loss > 0:
        say(f"starting the delay line ({profile.rtt_ms / 2:g} ms each way)")
        lab.launch("delayline", "link", delayline_argv(lab))
        waits.append(("delayline", "ready:"))
    say("starting the object server")
    cert, key = make_certificate(lab.dir)
    server_argv = [
        *(sys.executable, "-m", "pep.lab.objects", "serve", "--port", str(SERVER_PORT)),
        *("--tls-port", str(TLS_PORT), "--cert", str(cert), "--key", str(key)),
    ]
    lab.launch("server", "server", server_argv)
    waits.append(("server", "listening on"))
    key_file = lab.dir / "peer.key"
    if lab.peer and peps:
        fd = os.open(key_file, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(keygen() + "\n")  # the same key for both ends, as an operator copies it
    for node in peps:
        interface = PEP_NODES[node][0]
        link = tables[node]
        sock = str(lab.dir / f"{node}.sock")
        peer = peer_table(lab.topology, node, str(key_file)) if lab.peer else None
        for path, table in ((lab.config(node), peer), (lab.config(node, direct=True), None)):
            path.write_text(pep_config_text(interface, link, sock, peer=table))
            _validate_config(path)
        if peer is not None:
            lab.settings[node].append(
                "[peer] "
                + " ".join(f"{k} {v}" for k, v in peer.items() if k != "key_file")
                + " (pre-connected legs; `pep lab split direct`: without)"
            )
        say(f"starting pep on {node} (splitting {interface})")
        lab.launch(node, node, lab.pep_argv(node))
        waits.append((node, "ready:"))
        if link is not None:
            lab.settings[node].append(
                "[link] "
                + " ".join(f"{k} {v}" for k, v in link.items())
                + " (pep: initcwnd/initrwnd on its routes, link-leg buffers and "
                + f"{lab.congestion or 'default'} congestion control, pacing)"
            )
    for name, marker in waits:
        lab.wait_ready(name, marker)
    for node in peps:
        lab.wait_pool(node)  # the first fetch times the pool, not its fallback
    lab.save()


def node_sysctls(lab: Lab, node: str, host: bool, pep: bool) -> None:
    """What the lab sets on a node (README "What the lab sets on the nodes"): an end ``host``
    gets the buffers' maximum raised, a ``pep`` node Fast Open without cookies."""
    from pep.testing.topology import sysctl

    ns, notes = lab.ns(node), lab.settings.setdefault(node, [])
    # A finished connection's cached ssthresh/RTT would shape the next one (the demo
    # fetches the same server again and again): every fetch starts from scratch.
    sysctl(ns, "net.ipv4.tcp_no_metrics_save", 1)
    if host:
        sysctl(ns, "net.ipv4.tcp_rmem", HOST_TCP_RMEM)
        sysctl(ns, "net.ipv4.tcp_wmem", HOST_TCP_WMEM)
        notes += [f"tcp_rmem {HOST_TCP_RMEM}", f"tcp_wmem {HOST_TCP_WMEM}"]
    elif pep:
        sysctl(ns, "net.ipv4.tcp_fastopen", TFO_SYSCTL)
        notes.append(f"tcp_fastopen {TFO_SYSCTL:#x}")


def make_certificate(directory: Path) -> tuple[Path, Path]:
    """A self-signed certificate for the object server's HTTPS (name "lab", ECDSA P-256, two
    days): the HTTPS workload checks it as its CA, so TLS is real, not skipped."""
    cert, key = directory / TLS_CERT, directory / "tls-key.pem"
    argv = [
        *("openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1"),
        *("-nodes", "-keyout", str(key), "-out", str(cert), "-days", "2", "-subj", "/CN=lab"),
        *("-addext", "subjectAltName=DNS:lab"),
    ]
    r = subprocess.run(argv, capture_output=True, text=True, timeout=30)
    if r.returncode != 0:
        raise LabError(f"openssl could not make the lab's certificate: {r.stderr.strip()}")
    return cert, key


def disable_segmentation_offload(ns: str, ifname: str) -> None:
    """``ethtool -K IF tso off gso off`` (pyroute2's ioctl ethtool; its socket must be made in
    the namespace, like ns_socket)."""
    from pyroute2.ethtool import Ethtool

    from pep.testing.topology import in_netns

    with in_netns(ns):
        ethtool = Ethtool()
    try:
        features = ethtool.get_features(ifname)
        for name, feature in features.features.items():
            if name == "tx-generic-segmentation" or (
                name.startswith("tx-tcp") and name.endswith("segmentation")
            ):
                feature.enable = False
        ethtool.set_features(ifname, features)
    finally:
        ethtool.close()


def delayline_argv(lab: Lab, up_if: str = "cl0", down_if: str = "sv0") -> list[str]:
    """The delay line's command; ``up_if``/``down_if``: where uplink and downlink packets
    arrive at the link node (the star's: br0 from the terminals, hub0 from the hub)."""
    p = lab.profile
    buffer_ms = max(p.queue_s * 1000, 1.0)  # the tbf queue behind the delay line
    return [
        sys.executable,
        "-m",
        "pep.lab.delayline",
        "--up-if",
        up_if,
        "--down-if",
        down_if,
        "--delay-ms",
        f"{p.rtt_ms / 2:g}",
        "--up-rate",
        str(p.up_bps or 0),
        "--down-rate",
        str(p.down_bps or 0),
        "--buffer-ms",
        f"{buffer_ms:g}",
        "--loss",
        f"{p.loss:g}",
        "--stats",
        str(lab.dir / "delayline.json"),
        "--control",
        str(fade_control(lab)),
        *(["--handover", f"{p.handover[0]:g}s/{p.handover[1] * 1000:g}ms"]
          if p.handover is not None else []),
    ]  # fmt: skip


def fade_control(lab: Lab) -> Path:
    """Where `pep lab fade` asks the delay line for a fade (pep.lab.outages)."""
    return lab.dir / "fade.json"


def _validate_config(path: Path) -> None:
    from pep import config as config_mod

    try:
        config_mod.load(path, {})
    except config_mod.ConfigError as e:
        raise LabError(f"the lab's pep config {path} is refused: {describe(e)}") from e


def down(prefix: str, lab: Lab | None = None) -> list[str]:
    """Remove every namespace of the lab (killing its processes first) and its state dir.

    Works from the prefix alone, so it also cleans up a half-built or crashed lab.
    """
    from pep.testing.topology import destroy_prefix

    check_prefix(prefix)
    removed = destroy_prefix(prefix)
    if lab is not None:
        lab.reap_all()
    shutil.rmtree(state_root() / prefix, ignore_errors=True)
    return removed
