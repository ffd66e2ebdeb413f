"""What a test asks of its satellite lab: the ``satlab`` marker's keywords, checked and expanded.

Pure (no pytest, no kernel), so every rule here has a unit test; the plugin (pep.testing.plugin)
reads the markers and the lab handle (pep.testing.satlab) builds what ``LabConfig`` says.

    @pytest.mark.satlab("geo", pep=["none", "peer"])           # the test runs twice
    @pytest.mark.satlab(profile="custom", rtt="300ms", down="10", up="2", loss="0.1")

A list as a value runs the test once per value (the product over every list, like stacked
``parametrize``); a tuple is a value, not a list of cases. Values go through the parsers of
``pep lab up`` (pep.lab.profiles), so ``rtt="600"`` means what ``--rtt 600`` means. A keyword
that is neither one of these nor a field of ``pep.lab.plan.LabSpec`` is refused with its name;
any other LabSpec field (a topology's own options, such as the star's) is passed through.
"""

from __future__ import annotations

import dataclasses
import itertools
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from pep.lab import profiles
from pep.lab.plan import LabError, LabSpec
from pep.lab.profiles import LinkProfile, ParseError
from pep.support.errors import describe

__all__ = [
    "DEFAULTS",
    "MODES",
    "TOPOLOGY_MODES",
    "LabConfig",
    "SatlabError",
    "cases",
    "lab_config",
    "merge",
]

# none: the lab's PEP nodes only route; direct: pep splits, each flow opens its own leg across
# the link; peer: pep with its pre-connected legs ([peer], the lab's default, pep lab split on).
MODES = ("none", "direct", "peer")
# What `pep lab up` builds when told nothing: the GEO profile, a PEP at each end, [peer].
DEFAULTS: dict[str, object] = {"profile": "geo", "topology": "symmetric", "pep": "peer"}
# The modes each topology can have (pep.lab.build: [peer] only with a PEP at the far end; the
# two-gateway labs' peps stay up, without [peer]); the first is the default where pep= is not
# given: peer where there is one, direct elsewhere.
TOPOLOGY_MODES: dict[str, tuple[str, ...]] = {
    "symmetric": ("peer", "direct", "none"),
    "star": ("peer", "direct", "none"),
    "one-ended": ("direct", "none"),
    "ha": ("direct",),
    "ecmp": ("direct",),
}
# A profile of its own: nothing impaired until rtt/down/up/loss say so.
CUSTOM = LinkProfile("custom", 0, None, None)

# keyword -> (LinkProfile.with_overrides argument, the `pep lab up` option's parser)
_OVERRIDES: dict[str, tuple[str, Callable[[str], object]]] = {
    "rtt": ("rtt_ms", profiles.parse_rtt),
    "down": ("down_bps", profiles.parse_rate),
    "up": ("up_bps", profiles.parse_rate),
    "loss": ("loss", profiles.parse_loss),
    "queue": ("queue_ms", profiles.parse_rtt),
    "handover": ("handover", profiles.parse_handover),
}
# LabSpec fields the keywords above decide, or the lab handle does (a fresh prefix per lab; the
# PEP nodes always get pep and [peer] where the topology allows it, so any mode can follow).
_DECIDED = {"profile", "topology", "pep", "prefix", "peer"}


class SatlabError(ValueError):
    """A marker keyword that cannot be used; ``str()`` names the keyword and the problem."""


@dataclass(frozen=True)
class LabConfig:
    """One lab as a test asked for it: hashable, so tests asking for the same link can share
    one lab (``key`` leaves the PEP mode out: switching it is cheap, building is not)."""

    profile: LinkProfile
    topology: str = "symmetric"
    pep: str = "peer"
    options: tuple[tuple[str, Any], ...] = ()  # further LabSpec fields, sorted by name

    @property
    def key(self) -> tuple[object, ...]:
        return (self.profile, self.topology, self.options)

    def spec(self, prefix: str) -> LabSpec:
        return LabSpec(self.profile, self.topology, True, prefix, peer=True, **dict(self.options))

    def marker_kwargs(self) -> dict[str, str]:
        """What the plugin marks a test with, for ``-m "satlab(profile='geo')"``."""
        return {"profile": self.profile.name, "topology": self.topology, "pep": self.pep}


def lab_config(*args: object, **kwargs: object) -> LabConfig:
    """The checked configuration for these marker arguments (one value per keyword); the one
    positional argument, if any, is the profile."""
    if len(args) > 1:
        raise SatlabError(f"satlab: one positional argument (the profile), not {len(args)}")
    if args:
        if "profile" in kwargs:
            raise SatlabError("satlab: the profile given twice (positional and profile=)")
        kwargs = {"profile": args[0], **kwargs}
    given = {**DEFAULTS, **kwargs}
    modes = TOPOLOGY_MODES.get(str(given["topology"]), MODES)
    if "pep" not in kwargs:
        given["pep"] = modes[0]
    profile = _profile(given.pop("profile"))
    changes = {}
    for name, (field, parse) in _OVERRIDES.items():
        if name in given:
            changes[field] = _parse(name, parse, given.pop(name))
    profile = profile.with_overrides(**changes)  # type: ignore[arg-type]
    topology, pep = given.pop("topology"), given.pop("pep")
    if pep not in MODES:
        raise SatlabError(f"satlab: pep={pep!r}: choose {', '.join(map(repr, MODES))}")
    if pep not in modes:
        raise SatlabError(
            f"satlab: pep={pep!r} with topology={topology!r}: it can have "
            f"{', '.join(map(repr, modes))}"
            + (" ([peer] needs a PEP at each end of the link)" if pep == "peer" else "")
        )
    fields = {f.name for f in dataclasses.fields(LabSpec)} - _DECIDED
    for name in given:
        if name not in fields:
            known = sorted([*DEFAULTS, *_OVERRIDES, *fields])
            raise SatlabError(f"satlab: unknown keyword {name!r} (known: {', '.join(known)})")
    config = LabConfig(profile, str(topology), str(pep), tuple(sorted(given.items())))
    try:
        config.spec("satlabcheck")  # what LabSpec itself checks (the topology's name, ...)
    except (LabError, TypeError, ValueError) as e:
        raise SatlabError(f"satlab: {describe(e)}") from None
    return config


def _profile(value: object) -> LinkProfile:
    if isinstance(value, LinkProfile):
        return value
    if value == "custom":
        return CUSTOM
    try:
        return profiles.profile(str(value))
    except ParseError as e:
        raise SatlabError(f"satlab: profile={value!r}: {describe(e)}; or 'custom'") from None


def _parse(name: str, parse: Callable[[str], object], value: object) -> object:
    try:
        return parse(str(value))
    except ParseError as e:
        raise SatlabError(f"satlab: {name}={value!r}: {describe(e)}") from None


def merge(markers: Sequence[tuple[Sequence[object], Mapping[str, object]]]) -> dict[str, object]:
    """One set of keywords from several markers (``(args, kwargs)``, farthest first: module,
    class, function): a nearer marker's keyword wins."""
    out: dict[str, object] = {}
    for args, kwargs in markers:
        if len(args) > 1:
            raise SatlabError(f"satlab: one positional argument (the profile), not {len(args)}")
        if args and "profile" in kwargs:
            raise SatlabError("satlab: the profile given twice (positional and profile=)")
        out.update({"profile": args[0]} if args else {})
        out.update(kwargs)
    return out


def cases(kwargs: Mapping[str, object]) -> list[tuple[str | None, LabConfig]]:
    """Every configuration the keywords ask for, each with its test id: None for a single one
    with no list in it; otherwise the listed keywords' values joined by '-' (``geo-none``)."""
    listed = [name for name, value in kwargs.items() if isinstance(value, list)]
    for name in listed:
        if not kwargs[name]:
            raise SatlabError(f"satlab: {name}=[]: an empty list runs nothing")
    if not listed:
        return [(None, lab_config(**kwargs))]
    out = []
    for values in itertools.product(*(kwargs[name] for name in listed)):  # type: ignore[call-overload]
        one = {**kwargs, **dict(zip(listed, values, strict=True))}
        label = "-".join(v.name if isinstance(v, LinkProfile) else str(v) for v in values)
        out.append((label, lab_config(**one)))
    return out
