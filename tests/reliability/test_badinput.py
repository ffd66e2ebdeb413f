"""Bad input to the real daemon: odd packets injected into its queue, and invalid
configuration files. The same inputs without a daemon, structured fuzzing of the codec and
the verdict core: tests/capture/test_badpackets.py."""

from __future__ import annotations

import socket
import struct
from pathlib import Path

import pytest
import trio

from pep.testing.daemon import StartPep, kernel_queue, pep_cli, settle, status_json
from pep.testing.netenv import CLIENT_IP, GW_SERVER_IP, INGRESS, PORT, SERVER_IP, rules_in
from pep.testing.topology import Topology, in_netns, ns_socket
from pep.testing.traffic import request, serving
from tests.helpers.packets import (
    ACK,
    CWR,
    ECE,
    FIN,
    PSH,
    RST,
    SYN,
    URG,
    checksum,
    ipv4_packet,
    raw_sender,
    send_packets,
    tcp_segment,
)

ODD_PORT = 9999


def odd_tcp() -> tuple[list[bytes], int]:
    """Crafted TCP packets to ODD_PORT, and how many of them are SYNs pep may split."""
    c, s = CLIENT_IP, SERVER_IP

    def pkt(flags: int, sport: int, **kw: object) -> bytes:
        ip_opts = kw.pop("ip_options", b"")
        return ipv4_packet(c, s, tcp_segment(c, s, sport, ODD_PORT, flags, **kw),  # type: ignore[arg-type]
                           options=ip_opts, ident=sport)  # fmt: skip

    not_syns = [
        pkt(ACK, 20001),
        pkt(FIN | ACK, 20002),
        pkt(RST, 20003),
        pkt(SYN | ACK, 20004),
        pkt(SYN | FIN, 20005),
        pkt(SYN | RST, 20006),
        pkt(0, 20007),  # NULL scan
        pkt(FIN | PSH | URG, 20008),  # XMAS scan
        pkt(SYN, 20009, options=b"\x02\x01"),  # option length 1: malformed
        pkt(SYN, 20010, options=b"\x08\x0a\0\0\0\0", doff=15),  # options past the segment
    ]
    syns = [
        pkt(SYN | ECE | CWR, 20011),  # ECN setup SYN
        pkt(SYN | PSH | URG, 20012),
        pkt(SYN, 20013, ip_options=b"\x07\x07\x04" + b"\0" * 5),  # IP record-route option
    ]
    return not_syns + syns, len(syns)


def fragmented_syn(sport: int) -> list[bytes]:
    """One SYN (with 20 bytes of TCP options) as two IPv4 fragments."""
    opts = b"\x02\x04\x05\xb4" + b"\x01" * 16
    seg = tcp_segment(CLIENT_IP, SERVER_IP, sport, ODD_PORT, SYN, options=opts)
    first = ipv4_packet(CLIENT_IP, SERVER_IP, seg[:24], ident=777, frag=0x2000)
    second = ipv4_packet(CLIENT_IP, SERVER_IP, seg[24:], ident=777, frag=3)
    return [first, second]


PING_ID = 0x7E57


def icmp_socket(topo: Topology) -> socket.socket:
    with in_netns(topo.ns("client")):
        return socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_ICMP)


def echo_request(seq: int) -> bytes:
    body = struct.pack("!BBHHH", 8, 0, 0, PING_ID, seq) + b"pep-reliability"
    return body[:2] + struct.pack("!H", checksum(body)) + body[4:]


async def count_echo_replies(sock: trio.socket.SocketType, pongs: list[int]) -> None:
    with sock:
        while True:
            data = await sock.recv(2048)
            icmp = data[(data[0] & 0x0F) * 4 :]
            kind, _, _, ident, seq = struct.unpack_from("!BBHHH", icmp)
            if kind == 0 and ident == PING_ID:
                pongs.append(seq)


@pytest.mark.netns
async def test_odd_packets_queued_to_the_daemon_are_each_verdicted_and_counted(
    topo: Topology, start_pep: StartPep
) -> None:
    pep = start_pep()
    # Extra rules (tests only) send what pep's own rule never queues to pep's queue: all of
    # UDP and ICMP, and TCP to ODD_PORT whatever its flags. They are inserted above pep's jump.
    extra = [
        ["-p", "udp"],
        ["-p", "icmp"],
        ["-p", "tcp", "--dport", str(ODD_PORT)],
    ]
    for match in extra:
        rule = ["-t", "mangle", "-I", "PREROUTING", "-i", INGRESS, *match, "-j", "NFQUEUE",
                "--queue-num", "0", "--queue-bypass"]  # fmt: skip
        r = topo.run("gw", ["iptables-legacy", *rule])
        assert r.returncode == 0, r.stderr
    before = kernel_queue(topo)
    assert before is not None
    udp_count, ping_count = 50, 10
    tcp_packets, tcp_syns = odd_tcp()
    # The reassembled SYN counts once (the lone fragment never arrives); each split SYN is
    # answered by pep's listener, and the client's kernel, which has no such connection,
    # answers with an RST to ODD_PORT: queued too.
    expected = udp_count + ping_count + len(tcp_packets) + 1 + (tcp_syns + 1)
    udp_got: list[bytes] = []
    pongs: list[int] = []

    async def udp_server(sock: trio.socket.SocketType) -> None:
        while True:
            udp_got.append(await sock.recv(2048))

    with trio.fail_after(30):
        async with serving(topo, (SERVER_IP, PORT)) as accepted, trio.open_nursery() as n:
            usrv = trio.socket.from_stdlib_socket(
                ns_socket(topo.ns("server"), socket.AF_INET, socket.SOCK_DGRAM)
            )
            await usrv.bind((SERVER_IP, 5353))
            n.start_soon(udp_server, usrv)
            ucli = trio.socket.from_stdlib_socket(
                ns_socket(topo.ns("client"), socket.AF_INET, socket.SOCK_DGRAM)
            )
            with ucli:
                for i in range(udp_count):
                    await ucli.sendto(b"datagram %d" % i, (SERVER_IP, 5353))
            pings = trio.socket.from_stdlib_socket(icmp_socket(topo))
            n.start_soon(count_echo_replies, pings, pongs)
            for seq in range(ping_count):
                await pings.sendto(echo_request(seq), (SERVER_IP, 0))
                await trio.sleep(0.01)
            raw = raw_sender(topo)
            with raw:
                send_packets(raw, tcp_packets, SERVER_IP)
                send_packets(raw, fragmented_syn(20100), SERVER_IP)
                # A lone first fragment never completes: the gateway's reassembly holds it
                # (and drops it after ipfrag_time); it never reaches the queue.
                send_packets(raw, fragmented_syn(20101)[:1], SERVER_IP)
            await settle(lambda: len(udp_got), lambda v: v >= udp_count, timeout=3)
            await settle(lambda: len(pongs), lambda v: v >= ping_count, timeout=3)
            want = before.last_id + expected
            after = await settle(
                lambda: kernel_queue(topo),
                lambda q: q is not None and q.last_id >= want and not q.waiting,
            )
            doc = await status_json(pep)
            # Still alive, still splitting.
            start = len(accepted)
            assert await request(topo, (SERVER_IP, PORT), b"still here") == b"STILL HERE"
            n.cancel_scope.cancel()
    assert after is not None
    queued = after.last_id - before.last_id
    syn = doc["syn"]
    print(f"injected: {queued} queued by the kernel; pep {syn}; echo replies {sorted(pongs)}")
    # Each was read, verdicted and counted by pep:
    assert queued == expected
    assert after.waiting == 0 and after.user_dropped == 0 and after.queue_dropped == 0
    assert syn["queued"] == after.last_id  # pep read every packet the kernel queued
    not_syns = udp_count + ping_count + len(tcp_packets) - tcp_syns + (tcp_syns + 1)
    assert syn["unparsable"] == not_syns  # accepted unsplit, counted
    assert syn["split"] == before.last_id + tcp_syns + 1  # odd-but-valid SYNs are split
    assert len(udp_got) == udp_count  # accepted means delivered
    assert len(pongs) == ping_count  # echo requests went through (accepted), were answered
    assert accepted[start][0] == GW_SERVER_IP
    assert pep.running
    assert "malformed" in syn and syn["malformed"] == 0


# --- invalid configuration files: exit 2, the key named, nothing installed ------------------

BAD_CONFIGS: list[tuple[str, str]] = [
    ("listen_port = 70000", "listen_port"),
    ('listen_port = "5000"', "listen_port"),
    ("listen_port = 0", "listen_port"),
    ("queue = -1", "queue"),
    ("queue = 65536", "queue"),
    ("interfaces = []", "interfaces"),
    ('interfaces = ["bad/name"]', "interfaces"),
    ('interfaces = ["eth0", "eth0"]', "interfaces"),
    ('interfaces = ["an-interface-name-too-long"]', "interfaces"),
    ("interfaces = 7", "interfaces"),
    ('mode = "nat"', "mode"),
    ('family = "ipv5"', "family"),
    ('transparent_source = "yes"', "transparent_source"),
    ("transparent_source = true", "transparent_source"),  # needs mode = "tproxy"
    ("tproxy_mark = 0", "tproxy_mark"),
    ('mode = "tproxy"\ntproxy_mark = 0x1', "tproxy_mark"),  # overlaps mark_mask
    ("route_table = 254", "route_table"),
    ("split_mark = 0x10000", "split_mark"),  # outside mark_mask
    ("mark_mask = 0", "mark_mask"),
    ('log_level = "loud"', "log_level"),
    ("queue_maxlen = 0", "queue_maxlen"),
    ("queue_rcvbuf = 1024", "queue_rcvbuf"),
    ("flow_ttl = 0", "flow_ttl"),
    ("flow_table_size = 1", "flow_table_size"),
    ("backlog = 0", "backlog"),
    ("connect_timeout = -1", "connect_timeout"),
    ('idle_timeout = "never"', "idle_timeout"),
    ("tcp_fastopen = 1", "tcp_fastopen"),
    ("fastopen_wait = 11", "fastopen_wait"),
    ("pipe_size = 100", "pipe_size"),
    ("drain_timeout = -5", "drain_timeout"),
    ('status_socket = "relative/pep.sock"', "status_socket"),
    ('metrics_listen = "localhost:99999"', "metrics_listen"),
    ("workers = 0", "workers"),
    ('queues = "3-1"', "queues"),
    ('default_action = "drop"', "default_action"),
    ("max_connections = -1", "max_connections"),
    ('syn_verdict = "later"', "syn_verdict"),
    ("syn_hold_max = 0", "syn_hold_max"),
    ("syn_hold_timeout = 0", "syn_hold_timeout"),
    ('mirror_tos = "no"', "mirror_tos"),
    ("mirror_mss = 2", "mirror_mss"),
    ("client = 5", "client"),
    ('[client]\nnodelay = "yes"', "client.nodelay"),
    ("[client]\nsndbuf = 1", "client.sndbuf"),
    ('[client]\ncongestion = "no-such-cc"', "client.congestion"),
    ("[client]\nnodlay = true", "client.nodlay"),
    ("[upstream]\nkeepcnt = 1000", "upstream.keepcnt"),
    ('[[policy]]\naction = "drop"', "policy[0].action"),
    ('[[policy]]\naction = "split"\ndst = ["10.0.0.0/33"]', "policy[0].dst"),
    ('[[policy]]\naction = "bypass"\ndport = 0', "policy[0].dport"),
    ('[[policy]]\naction = "bypass"\ncolour = "red"', "policy[0].colour"),
    ("[[upstream_override]]\nnodelay = false", "upstream_override[0]"),
    ('[[upstream_override]]\ndst = ["x"]\nnodelay = false', "upstream_override[0].dst"),
    ("listen_prot = 5000", "listen_prot"),
    ("listen_port = ", "--config"),  # not TOML
]


@pytest.mark.netns
async def test_each_invalid_config_exits_2_naming_the_key_and_installs_nothing(
    topo: Topology, tmp_path: Path
) -> None:
    run_dir = tmp_path  # status sockets would go here: none may appear
    failures: list[str] = []
    limiter = trio.CapacityLimiter(6)

    async def one(i: int, text: str, key: str) -> None:
        conf = tmp_path / f"bad{i}.toml"
        conf.write_text(text + "\n")
        sock = run_dir / f"s{i}.sock"
        args = ["run", "--config", str(conf)]
        # Flags override the file: give none for the key under test.
        if key != "interfaces":
            args += ["--interface", INGRESS]
        if key != "status_socket":
            args += ["--status-socket", str(sock)]
        async with limiter:
            r = await pep_cli(topo, "gw", *args)
        err = r.stderr.decode()
        if r.returncode != 2 or f"config: {key} " not in err or err.count("\n") != 1:
            failures.append(f"{text!r}: exit {r.returncode}, stderr {err!r}")
        if sock.exists():
            failures.append(f"{text!r}: the status socket was created")

    with trio.fail_after(120):
        async with trio.open_nursery() as n:
            for i, (text, key) in enumerate(BAD_CONFIGS):
                n.start_soon(one, i, text, key)
    assert not failures, "\n".join(failures)
    state = rules_in(topo, "gw")
    assert "PEP" not in state and "NFQUEUE" not in state and "proto 94" not in state
    assert kernel_queue(topo) is None  # no queue was ever bound
