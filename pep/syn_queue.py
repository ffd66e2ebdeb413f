"""The design card's name for the SYN reader; the module is pep.capture.syn_queue
(pep/__init__.py)."""

from pep.capture.syn_queue import *  # noqa: F403
from pep.capture.syn_queue import __all__ as __all__
