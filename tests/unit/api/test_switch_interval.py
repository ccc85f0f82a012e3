"""`--gil-switch-interval-ms` sets the interpreter's thread switch interval; unset, Python's stays."""

from __future__ import annotations

import sys
from collections.abc import Iterator

import pytest

from server.settings import Settings, apply_switch_interval


@pytest.fixture
def restore_interval() -> Iterator[float]:
    before = sys.getswitchinterval()
    yield before
    sys.setswitchinterval(before)


def test_the_flag_sets_the_interval(restore_interval: float) -> None:
    apply_switch_interval(Settings(gil_switch_interval_ms=0.25))
    assert sys.getswitchinterval() == pytest.approx(0.00025)


def test_unset_leaves_pythons_interval(restore_interval: float) -> None:
    apply_switch_interval(Settings())
    assert sys.getswitchinterval() == restore_interval


def test_out_of_range_is_refused() -> None:
    with pytest.raises(ValueError, match="gil_switch_interval_ms"):
        Settings(gil_switch_interval_ms=0)
