"""Small helpers every layer of pep uses; imports nothing of pep (the map: pep/__init__.py)."""
