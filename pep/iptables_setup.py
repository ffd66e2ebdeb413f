"""The design card's name for the rules; the module is pep.kernel.iptables_setup
(pep/__init__.py)."""

from pep.kernel.iptables_setup import *  # noqa: F403
from pep.kernel.iptables_setup import __all__ as __all__
