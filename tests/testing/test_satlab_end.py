"""SatLab.end_test with a stand-in lab: every step runs however the others go. No root."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from pep.lab.plan import LabError
from pep.testing import satlab
from pep.testing.satlab_options import lab_config


class FakeLab:
    prefix, peer, pep = "fake", True, True

    def __init__(self, fail_stop: bool) -> None:
        self.fail_stop, self.saved = fail_stop, 0
        self.procs: dict[str, object] = {"client.sleep.1": {}}

    def stop(self, *names: str) -> None:
        if self.fail_stop:
            raise OSError("stop failed")

    def save(self) -> None:
        self.saved += 1

    def output(self, name: str) -> str:
        return ""


def ended(monkeypatch: pytest.MonkeyPatch, fail_stop: bool, fail_restore: bool) -> FakeLab:
    restored: list[str] = []

    def stop_fade(prefix: str) -> None:
        restored.append(prefix)
        if fail_restore:
            raise LabError("link not restored")

    monkeypatch.setattr(satlab.lab_fade, "stop_fade", stop_fade)
    lab = FakeLab(fail_stop)
    sat = satlab.SatLab(lab, lab_config())  # type: ignore[arg-type]
    sat._fading = True
    popen = SimpleNamespace(pid=1)
    sat._started = [satlab.NodeProcess(lab, "client.sleep.1", "client", popen)]  # type: ignore[arg-type]
    try:
        sat.end_test(say=lambda text: None)
    finally:
        assert restored == ["fake"] and lab.saved == 1 and not lab.procs
    return lab


def test_a_failed_stop_still_ends_the_fade_and_saves(monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(OSError, match="stop failed"):
        ended(monkeypatch, fail_stop=True, fail_restore=False)


def test_a_link_not_restored_is_an_error(monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(LabError, match="link not restored"):
        ended(monkeypatch, fail_stop=False, fail_restore=True)
    ended(monkeypatch, fail_stop=False, fail_restore=False)
