"""pep: a transparent TCP split-connection Performance Enhancing Proxy.

General layout (read top-down along the data path; each package depends only on the ones
above it in this list, checked by tests/test_layout.py):

- ``pep.support``: small helpers every layer uses: ``memo`` (a remembered kernel lookup),
  ``ratelog`` (a log line at most every N seconds), ``netlink`` (the netlink message walker),
  ``errors`` (an exception in words, never empty). Imports nothing of pep.
- ``pep.config``: everything pep is told. ``settings`` (the top-level keys and the file),
  one module per table (``leg`` [client]/[upstream], ``link`` [link] and every number derived
  from it, ``terminals`` a hub's terminal plans, ``peer`` [peer] and its key file, ``policy``
  [[policy]]), ``schema`` (how a key is declared and checked), ``units`` (rates, durations),
  ``paths`` (runtime files per netns), ``files`` (the guard on every file a setting names).
- ``pep.capture``: a new connection's SYN, queued by netfilter. ``nfq_codec`` (the nfnetlink
  messages, sans-IO), ``nfq_socket`` (the bound queue), ``nfq_proc`` (the kernel's queue
  counters), ``syn`` (SYN parsing, pure), ``syn_queue`` (the SYN reader: ``Decider`` is its
  pure core), ``flows`` (what it learnt, until the listener accepts), ``fdbudget`` (room for
  one more connection), ``preconnect`` (strict mode's upstreams).
- ``pep.split``: the split connection. ``listener`` (accept), ``admission`` (served or
  refused, pure), ``origdst`` (where it was going), ``session`` (open, account, relay),
  ``upstream`` (the server-side leg), ``relay`` (the splice engine; ``relay_state`` its pure
  per-direction state), ``pipes``, ``sockopts`` and ``lifecycle`` (a leg's options, its
  close), ``connections`` (the live table), ``hooks`` (what it asks of the layers below, as
  protocols the daemon wires in).
- ``pep.link``: the satellite link as one shared resource. ``legs`` (which legs face it),
  ``pacer`` (the sharer's IO shell: tcp_info, SO_MAX_PACING_RATE), ``fairshare`` (max-min
  shares, pure), ``terminalshare`` (per terminal, then per flow, pure), ``plans`` (the
  terminals' caps and counts), ``slots`` (workers' shared counts), ``routequery``, ``tcpinfo``;
  ``state`` (is the link up, pure) and ``watch`` (its sampler).
- ``pep.peer``: pre-connected legs between two PEPs. ``wire`` (the format, sans-IO),
  ``pool`` (the near end), ``server`` (the far end's peer listener).
- ``pep.kernel``: everything pep changes in the kernel, and its removal. ``nfrule`` (a rule
  described once), ``rule_plan`` (pep's rules, pure), ``iptables_setup`` (install, remove),
  ``rule_show``, ``tproxy_routes`` (TPROXY's policy routing), ``link_routes`` ([link]'s
  initial windows; ``terminal_routes`` per terminal, pure), ``cleanup`` (all of it, best
  effort), ``owner`` (one pep owns it per namespace: a lock). Depends on config only.
- ``pep.ops``: the running daemon. ``cli`` (the ``pep`` command), ``daemon`` (wires the layers
  together for ``pep run``), ``runtime`` (signals, drain), ``reload``, ``services``,
  ``workers``, ``systemd``, ``entry``; ``pep.ops.status``: ``document``, ``render``,
  ``socket``, ``metrics``.
- ``pep.testing``: for pep's tests, its benchmarks (bench/) and the lab: ``topology``
  (namespace topologies), ``netenv`` (the tests' gateway topology, commands in a namespace),
  ``traffic`` (trio peers, byte-exact streams), ``daemon`` (the daemon under test); and pep's
  pytest plugin (``plugin``, ``satlab``, ``lab_prefix``, ``satlab_options``,
  ``node_commands``: the lab as a fixture for any project's tests), which sits above
  ``pep.lab``.
- ``pep.lab``: ``pep lab``, an emulated satellite link in network namespaces (its modules:
  pep/lab/__init__.py).

The design card's module names are one-line re-exports of the real modules, kept so that
``import pep.syn_queue`` and friends keep working: ``pep.syn_queue`` (pep.capture.syn_queue),
``pep.listener`` (pep.split.listener), ``pep.upstream`` (pep.split.upstream), ``pep.relay``
(pep.split.relay), ``pep.iptables_setup`` (pep.kernel.iptables_setup); ``pep.cli`` is
``python -m pep.cli`` (pep.ops.cli). Code inside pep imports the real modules.
"""
