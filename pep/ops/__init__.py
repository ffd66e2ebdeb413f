"""The running daemon: the ``pep`` command, the wiring of every layer, signals, reload,
workers, systemd (the map: pep/__init__.py)."""
