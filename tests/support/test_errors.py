"""pep.support.errors.describe, and the rule that makes it the one way a caught exception
becomes text (issue 20, D10: "handshake failed ()", "peer X: ; flows go direct"): found in the
source with ``ast``, so a new log line that formats an exception itself fails here."""

from __future__ import annotations

import ast
import errno
from pathlib import Path

import pytest
import trio

from pep.support.errors import describe

PEP = Path(__file__).resolve().parents[2] / "pep"

_LOG_METHODS = {"debug", "info", "warning", "error", "exception", "critical", "log"}


@pytest.mark.parametrize(
    ("exc", "text"),
    [
        (trio.TooSlowError(), "timeout"),
        (TimeoutError(), "timeout"),
        (TimeoutError("timed out"), "timed out"),
        (OSError(errno.ECONNRESET, ""), "ECONNRESET: Connection reset by peer"),
        (OSError(errno.ECONNREFUSED, "Connection refused"), "Connection refused"),
        (ConnectionResetError(errno.ECONNRESET, None), "ECONNRESET: Connection reset by peer"),
        (PermissionError(errno.EACCES, "Permission denied", "/run/pep"), "Permission denied"),
        (OSError("no errno, a sentence"), "no errno, a sentence"),
        (OSError(), "OSError"),
        (Exception(), "Exception"),
        (ValueError("  "), "ValueError"),
        (KeyError("state"), "'state'"),
        (ValueError("bad header"), "bad header"),
    ],
)
def test_describe_never_says_nothing(exc: BaseException, text: str) -> None:
    assert describe(exc) == text


def formats_exceptions_itself(source: str, where: str = "<test>") -> list[str]:
    """Places in ``source`` where a caught exception (``except ... as e``) becomes text
    without ``describe``: ``e`` or ``e.strerror`` in an f-string, in ``str()``, or as an
    argument of a logging call."""
    out = []
    for handler in ast.walk(ast.parse(source)):
        if not isinstance(handler, ast.ExceptHandler) or not handler.name:
            continue

        def raw(node: ast.AST, name: str = handler.name) -> bool:
            if isinstance(node, ast.Name):
                return node.id == name
            if isinstance(node, ast.Attribute) and node.attr == "strerror":
                return isinstance(node.value, ast.Name) and node.value.id == name
            if isinstance(node, ast.BoolOp):  # e.strerror or e
                return any(raw(v) for v in node.values)
            return False

        # str(e) inside a comparison ("host bits set" in str(e)) reads it, it does not show it
        compared = {
            id(n) for c in ast.walk(handler) if isinstance(c, ast.Compare) for n in ast.walk(c)
        }
        for statement in handler.body:
            for node in ast.walk(statement):
                if id(node) in compared:
                    continue
                if isinstance(node, ast.FormattedValue) and raw(node.value):
                    out.append(f"{where}:{node.lineno}: {{{ast.unparse(node.value)}}}")
                elif isinstance(node, ast.Call):
                    func = node.func
                    logged = isinstance(func, ast.Attribute) and func.attr in _LOG_METHODS
                    stringified = isinstance(func, ast.Name) and func.id == "str"
                    for arg in node.args[1:] if logged else node.args if stringified else []:
                        if raw(arg):
                            out.append(f"{where}:{node.lineno}: {ast.unparse(node)}")
    return out


def test_the_rule_can_fail() -> None:
    source = """
try:
    pass
except OSError as e:
    log.info("accept: %s", e.strerror)
    log.warning("peer: %s", e)
    raise Failed(f"handshake failed ({e})")
except ValueError as err:
    if "host bits" in str(err):
        pass
    print(str(err))
    log.info("fine: %s", describe(err))
    raise Failed(f"also fine: {describe(err)} {err.args[0]}")
"""
    found = formats_exceptions_itself(source)
    assert [line.split(":")[1] for line in found] == ["5", "6", "7", "11"], found


def test_every_caught_exception_becomes_text_through_describe() -> None:
    found = []
    for path in sorted(PEP.rglob("*.py")):
        found += formats_exceptions_itself(path.read_text(), str(path.relative_to(PEP.parent)))
    assert not found, "format these with pep.support.errors.describe:\n" + "\n".join(found)
