"""`pep lab`: an emulated satellite link in network namespaces, to show and measure what pep does.

Pieces, each usable alone:

- ``profiles``: link profiles (GEO, MEO, LEO, LAN) and the parsers for the command-line values;
- ``delayline``: the userspace delay line (this kernel has no netem), run as its own process;
  ``delay_schedule`` its pure scheduling core, ``timing`` its timer and real-time scheduling,
  ``link_rules`` the link's loss and queue rules, ``outages`` when the link delivers nothing
  (fades, handovers; pure), ``fade`` the command that fades a running lab's link;
- ``objects``: a small HTTP-like object server and a fetch client that checks every byte;
- ``plan``: what a lab is made of (nodes, links, routes, addresses, each node's settings and
  pep config), pure;
- ``build``: builds and removes a lab (namespaces, tc, sysctls, its processes started);
- ``state``: a lab that exists: its state file and its processes; ``status`` reports on it;
- ``workloads``: the traffic ``pep lab bench`` measures (``outage_workloads``: with the link
  going away);
- ``bench``: the with/without-PEP comparison behind ``pep lab demo`` and ``pep lab bench``;
  ``report`` its tables, JSON record and chart;
- ``cluster``: the two-gateway labs (``ha``, ``ecmp``), ``cluster_bench`` what they measure;
- ``star``: the hub's lab (a hub serving N terminals, each with its plan; pure),
  ``star_build`` builds it (the modem's htb) and changes a plan, ``star_bench`` what it measures,
  ``star_report`` its tables and JSON;
- ``cli``: the ``pep lab`` subcommands (``exec_node``: what ``pep lab exec`` runs where).
"""
