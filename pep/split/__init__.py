"""The split connection: accept, admit, connect upstream, relay and close; what it needs of
the link and the peer pool above it, it declares as protocols (``hooks``; the map:
pep/__init__.py)."""
