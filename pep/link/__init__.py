"""The satellite link as one shared resource: which legs face it, their pacing and shares,
whether it is up (the map: pep/__init__.py)."""
