"""The plugin's markers as a test sees them through ``satlab_config``: no lab is built, so
these run anywhere (pytest in-process on a small project, pytester)."""

from __future__ import annotations

import pytest


def run(pytester: pytest.Pytester, source: str, *args: str) -> pytest.RunResult:
    pytester.makepyfile(test_app=source)
    return pytester.runpytest_inprocess("-p", "no:cacheprovider", *args)


def test_the_fixture_returns_what_collection_decided(pytester: pytest.Pytester) -> None:
    """A module's LinkProfile object and a function's keyword together: the profile stays the
    object (not looked up again by its name, which the plugin's own marker carries)."""
    result = run(
        pytester,
        """
import pytest
from pep.lab.profiles import LinkProfile

MINE = LinkProfile("mine", 123, None, None)
GEO_OF_MY_OWN = LinkProfile("geo", 77, None, None)
pytestmark = pytest.mark.satlab(MINE)

@pytest.mark.satlab(pep="none")
def test_object_and_keyword(satlab_config):
    assert satlab_config.profile == MINE and satlab_config.pep == "none"

@pytest.mark.satlab(GEO_OF_MY_OWN, pep="direct")
def test_an_object_named_like_a_stock_profile(satlab_config):
    assert satlab_config.profile.rtt_ms == 77 and satlab_config.pep == "direct"
""",
    )
    result.assert_outcomes(passed=2)


def test_a_list_parametrizes_a_test_that_takes_only_the_config(
    pytester: pytest.Pytester,
) -> None:
    result = run(
        pytester,
        """
import pytest

@pytest.mark.satlab("leo", pep=["none", "peer"])
def test_modes(satlab_config):
    assert satlab_config.profile.name == "leo" and satlab_config.pep in ("none", "peer")
""",
        "-v",
        "-m",
        "satlab(pep='none')",
    )
    result.assert_outcomes(passed=1, deselected=1)
    result.stdout.fnmatch_lines(["*test_modes?none? PASSED*"])
