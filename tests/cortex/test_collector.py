"""The cortex's garbage-collector settings."""

from __future__ import annotations

import gc

from helexa.roles.cortex import collector


def test_tune_sets_the_thresholds_and_freezes_what_exists() -> None:
    before = gc.get_threshold()
    try:
        collector.tune()
        assert gc.get_threshold() == (collector.YOUNG_THRESHOLD, collector.MIDDLE_EVERY, collector.OLD_EVERY)
        assert gc.get_freeze_count() > 0
    finally:
        gc.unfreeze()
        gc.set_threshold(*before)
