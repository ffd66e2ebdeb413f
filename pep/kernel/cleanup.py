"""Everything pep puts into the kernel, as one list of removal steps run best effort.

pep owns its netfilter rules (:mod:`pep.kernel.iptables_setup`), in TPROXY mode its policy rules and
routes (:mod:`pep.kernel.tproxy_routes`), and with ``[link]`` the initial windows it set on the
link's routes (:mod:`pep.kernel.link_routes`: put back as they were, not deleted). On the way out
each must go even when another fails: a netfilter error must not leave the policy routes behind, nor
the other way round. :func:`remove` runs every step of :data:`STEPS` and then reports every failure
at once. Another kind of kernel state pep comes to own is one more entry.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

from pep.kernel import iptables_setup, link_routes, tproxy_routes
from pep.support.errors import describe

__all__ = ["STEPS", "KernelStateError", "remove"]

Remover = Callable[[], int]  # removes one kind of pep's state; returns how many items went

# In this order: the rules first, so no new flow is sent to pep while its routes go.
STEPS: tuple[tuple[str, Remover], ...] = (
    ("netfilter rules", iptables_setup.remove),
    ("policy routing", tproxy_routes.remove),
    ("link route metrics", link_routes.remove),
)


class KernelStateError(ExceptionGroup):
    """Some of pep's kernel state could not be removed. ``exceptions`` holds each failed step's
    own error (a note names the step); ``str()`` names them all, for one log line."""

    def __str__(self) -> str:
        return self.message


def remove(steps: Iterable[tuple[str, Remover]] | None = None) -> int:
    """Run every removal step (default :data:`STEPS`) whatever the others do; how many items
    went in all. Raises :class:`KernelStateError` once all were tried if any failed."""
    removed = 0
    failures: list[tuple[str, Exception]] = []
    for name, remover in STEPS if steps is None else steps:
        try:
            removed += remover()
        except Exception as e:  # best effort: even a bug in one step must not skip the next
            e.add_note(f"(while removing pep's {name})")
            failures.append((name, e))
    if failures:
        detail = "; ".join(f"{name}: {describe(e)}" for name, e in failures)
        message = f"removing pep's kernel state failed: {detail}"
        raise KernelStateError(message, [e for _, e in failures])
    return removed
