"""The design card's name for the upstream leg; the module is pep.split.upstream
(pep/__init__.py)."""

from pep.split.upstream import *  # noqa: F403
from pep.split.upstream import __all__ as __all__
