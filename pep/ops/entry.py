"""How a command's run becomes its exit code, for every ``main`` in pep (one place, so the
three entry points cannot come to disagree): 0 when it ran to the end, 1 after ``report`` for
an error it names (its message is for the user: no traceback), and 0 on Ctrl-C before the
command's own signal handling (trio's) took over, as the user asked for it."""

from __future__ import annotations

from collections.abc import Callable

__all__ = ["exit_code"]


def exit_code(
    body: Callable[[], object],
    errors: tuple[type[BaseException], ...],
    report: Callable[[BaseException], None],
) -> int:
    try:
        body()
    except errors as e:
        report(e)
        return 1
    except KeyboardInterrupt:
        pass
    return 0
