"""Everything pep changes in the kernel (rules, policy routes, route metrics) and its
removal; depends on pep.config only (the map: pep/__init__.py)."""
