"""The design card's name for the listener; the module is pep.split.listener (pep/__init__.py)."""

from pep.split.listener import *  # noqa: F403
from pep.split.listener import __all__ as __all__
