"""The design card's name for the relay; the module is pep.split.relay (pep/__init__.py)."""

from pep.split.relay import *  # noqa: F403
from pep.split.relay import __all__ as __all__
