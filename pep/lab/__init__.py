"""`pep lab`: an emulated satellite link in network namespaces, to show and measure what pep does.

Pieces, each usable alone:

- ``profiles``: link profiles (GEO, MEO, LEO, LAN) and the parsers for the command-line values;
- ``delayline``: the userspace delay line (this kernel has no netem), run as its own process;
  ``delay_schedule`` its pure scheduling core, ``link_rules`` the link's loss and queue rules;
- ``objects``: a small HTTP-like object server and a fetch client that checks every byte;
- ``lab``: builds, records, inspects and removes a lab (namespaces, tc, processes);
- ``bench``: the with/without-PEP comparison behind ``pep lab demo`` and ``pep lab bench``;
- ``cli``: the ``pep lab`` subcommands.
"""
