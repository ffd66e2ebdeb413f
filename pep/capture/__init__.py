"""A new connection's SYN, queued by netfilter: read, decided on, recorded until the
listener accepts the connection (the map: pep/__init__.py)."""
