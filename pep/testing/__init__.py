"""Namespace topologies, trio peers and the daemon under test, for pep's tests, its
benchmarks (bench/) and the lab (the map: pep/__init__.py)."""
