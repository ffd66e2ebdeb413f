"""Pre-connected legs between two PEPs (``[peer]``): the wire format, the near end's pool,
the far end's listener (the map: pep/__init__.py)."""
