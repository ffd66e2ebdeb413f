"""The package's layers depend on each other one way only (pep/__init__.py draws the map).

Read from the source with ``ast``, no import needed: every ``import`` of a pep module, at any
depth of the file (a function's deferred import counts as much as one at the top), must go to
the importer's own subpackage or to one of the layers below it. A type-only import under
``if TYPE_CHECKING:`` counts too: the way up is a protocol the lower layer declares.
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

PEP = Path(__file__).resolve().parents[1] / "pep"
DESIGN = PEP.parent / "docs" / "DESIGN.md"

# Each part of pep and what it may import besides itself. Longest prefix wins.
_DATA_PATH = {"pep.support", "pep.config", "pep.capture", "pep.split"}
ALLOWED: dict[str, set[str]] = {
    "pep.support": set(),
    "pep.config": {"pep.support"},
    "pep.kernel": {"pep.support", "pep.config"},
    "pep.capture": {"pep.support", "pep.config"},
    "pep.split": {"pep.support", "pep.config", "pep.capture"},
    "pep.link": _DATA_PATH,
    "pep.peer": _DATA_PATH,
    "pep.ops": _DATA_PATH | {"pep.kernel", "pep.link", "pep.peer"},
    "pep.testing": {"pep.support", "pep.config", "pep.capture", "pep.ops"},
    "pep.lab": _DATA_PATH | {"pep.kernel", "pep.link", "pep.peer", "pep.ops", "pep.testing"},
    # The pytest plugin's lab (pep.testing.plugin builds on these) sits on top of the lab.
    "pep.testing.satlab": {"*"},
    "pep.testing.lab_prefix": {"*"},
    "pep.testing.satlab_options": {"*"},
    # The command line is the top: it wires `pep lab` in beside the daemon's commands.
    "pep.ops.cli": {"*"},
}
# The design card's names (pep/syn_queue.py, ...) and `python -m pep.cli`: one-line
# re-exports of the real modules, above everything.
SHIMS = {
    "pep.syn_queue",
    "pep.listener",
    "pep.upstream",
    "pep.relay",
    "pep.iptables_setup",
    "pep.cli",
}


def module_name(path: Path) -> str:
    parts = list(path.relative_to(PEP.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def imported(path: Path) -> set[str]:
    """Every pep module ``path`` imports (``from pep.x import y`` counts y when it is a
    module of x)."""
    name = module_name(path)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            out |= {a.name for a in node.names if a.name.split(".")[0] == "pep"}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                up = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(up + ([base] if base else []))
            if base.split(".")[0] != "pep":
                continue
            for alias in node.names:
                sub = f"{base}.{alias.name}"
                is_module = (PEP.parent / sub.replace(".", "/")).with_suffix(".py").exists() or (
                    PEP.parent / sub.replace(".", "/") / "__init__.py"
                ).exists()
                out.add(sub if is_module else base)
    return out


def part_of(module: str) -> str | None:
    """The most specific entry of ALLOWED that ``module`` belongs to."""
    best = None
    for part in ALLOWED:
        if (module == part or module.startswith(part + ".")) and (
            best is None or len(part) > len(best)
        ):
            best = part
    return best


def _top(part: str) -> str:
    return ".".join(part.split(".")[:2])


def violations() -> list[str]:
    out = []
    for path in sorted(PEP.rglob("*.py")):
        name = module_name(path)
        if name == "pep" or name in SHIMS:
            continue
        mine = part_of(name)
        assert mine is not None, f"{name} is in no part of the layout: add it to ALLOWED"
        allowed = ALLOWED[mine]
        for dep in sorted(imported(path)):
            theirs = part_of(dep)
            if dep in SHIMS:
                out.append(f"{name} imports {dep}: import the real module")
            elif theirs is None:
                out.append(f"{name} imports {dep}, which is in no part of the layout")
            elif not ("*" in allowed or _top(theirs) == _top(mine) or _top(theirs) in allowed):
                out.append(f"{name} ({mine}) imports {dep} ({theirs})")
    return out


def test_dependencies_run_one_way() -> None:
    assert violations() == []


@pytest.mark.parametrize(
    ("module", "part"),
    [
        ("pep.split.relay", "pep.split"),
        ("pep.ops.cli", "pep.ops.cli"),
        ("pep.ops.status.render", "pep.ops"),
        ("pep.lab.build", "pep.lab"),
    ],
)
def test_part_of(module: str, part: str) -> None:
    assert part_of(module) == part


def test_the_checker_can_fail(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A config module that imports the split layer is reported (the test is not vacuous)."""
    fake = tmp_path / "pep"
    (fake / "config").mkdir(parents=True)
    (fake / "split").mkdir()
    for f in ("__init__.py", "config/__init__.py", "split/__init__.py", "split/relay.py"):
        (fake / f).write_text("")
    (fake / "config" / "bad.py").write_text("from pep.split import relay\n")
    monkeypatch.setattr(__import__(__name__, fromlist=["PEP"]), "PEP", fake)
    assert violations() == ["pep.config.bad (pep.config) imports pep.split.relay (pep.split)"]


# --- the maps agree with the tree ---------------------------------------------------------------


def _docstring(path: Path) -> str:
    return ast.get_docstring(ast.parse(path.read_text())) or ""


def _design_map() -> str:
    """docs/DESIGN.md's "Module map" section."""
    return DESIGN.read_text().split("\n## Module map\n", 1)[1].split("\n## ", 1)[0]


def unmapped(design: str, package_doc: str, lab_doc: str) -> list[str]:
    """The modules a map leaves out, and the files docs/DESIGN.md's map names that do not exist.
    Each module is named in its package's map (pep/__init__.py's docstring as ``name``; the
    lab's modules in pep/lab/__init__.py's) and in the design notes' module map (`name.py`)."""
    out = []
    stems = set()
    for path in sorted(PEP.rglob("*.py")):
        name = module_name(path)
        if path.name == "__init__.py" or name in SHIMS:
            continue
        stems.add(path.stem)
        lab = name.startswith("pep.lab.")
        if f"``{path.stem}``" not in (lab_doc if lab else package_doc):
            out.append(f"{name}: not in {'pep/lab' if lab else 'pep'}/__init__.py's map")
        if f"`{path.stem}.py`" not in design:
            out.append(f"{name}: not in docs/DESIGN.md's module map")
    for named in sorted(set(re.findall(r"`([\w/]+)\.py`", design))):
        gone = named.startswith("pep/") and not (PEP.parent / f"{named}.py").exists()
        if gone or ("/" not in named and named not in stems):
            out.append(f"docs/DESIGN.md's module map names {named}.py, which does not exist")
    return out


def maps() -> tuple[str, str, str]:
    """The three maps as ``unmapped`` takes them."""
    return _design_map(), _docstring(PEP / "__init__.py"), _docstring(PEP / "lab" / "__init__.py")


def test_the_maps_name_every_module() -> None:
    """pep/__init__.py, pep/lab/__init__.py and docs/DESIGN.md draw the tree as it is."""
    assert unmapped(*maps()) == []


def test_the_map_check_can_fail() -> None:
    """A module missing from a map, and a map naming a module that is gone, are reported."""
    design, package_doc, lab_doc = maps()
    package_doc = package_doc.replace("``pacer``", "pacer")
    assert unmapped(design + " `linkshare.py`", package_doc, lab_doc) == [
        "pep.link.pacer: not in pep/__init__.py's map",
        "docs/DESIGN.md's module map names linkshare.py, which does not exist",
    ]
