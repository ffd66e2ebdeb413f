"""Everything pep is told: the settings file and flags, and every table in it.

``settings`` declares the top-level keys (``Config``) and loads a file; the tables have their
own modules: ``link`` ([link]: the satellite link and every number derived from it), ``peer``
([peer] and its key file), ``policy`` ([[policy]]: split or bypass). ``schema`` is the language
they are all declared in (a key, its default, its check, whether SIGHUP applies it); ``units``
parses rates and durations; ``paths`` says where runtime files go per network namespace.

Pure but for reading the file: every other package builds on a ``Config`` and takes its
values as valid. Nothing here imports the rest of pep (tests/test_layout.py checks it).
"""

from pep.config.schema import ConfigError
from pep.config.settings import (
    LOG_LEVELS,
    Config,
    LegTuning,
    build,
    load,
    log_level_number,
    read_file,
)

__all__ = [
    "LOG_LEVELS",
    "Config",
    "ConfigError",
    "LegTuning",
    "build",
    "load",
    "log_level_number",
    "read_file",
]
