"""The neuron's CPU scheduling policy (``cpu_policy``): set on the thread that starts it,
inherited by what that thread starts, refused values named."""

from __future__ import annotations

import os
import threading

import pytest

from helexa.config import ConfigError, load_config
from helexa.roles.neuron.config import NeuronConfig
from helexa.roles.neuron.node import apply_cpu_policy

linux_only = pytest.mark.skipif(not hasattr(os, "SCHED_BATCH"), reason="SCHED_BATCH is Linux's")


def _in_thread(fn):
    """Run ``fn`` in a thread of its own (a policy set there leaves the test's thread alone)."""
    out: list = []
    t = threading.Thread(target=lambda: out.append(fn()))
    t.start()
    t.join()
    return out[0]


def test_the_default_is_normal_and_changes_nothing() -> None:
    assert NeuronConfig().cpu_policy == "normal"

    def check():
        before = os.sched_getscheduler(0)
        return apply_cpu_policy("normal"), before, os.sched_getscheduler(0)

    held, before, after = _in_thread(check)
    assert held and before == after


@linux_only
def test_batch_puts_the_thread_and_the_threads_it_starts_under_sched_batch() -> None:
    def check():
        held = apply_cpu_policy("batch")
        child = _in_thread(lambda: os.sched_getscheduler(0))
        return held, os.sched_getscheduler(0), child

    held, own, child = _in_thread(check)
    assert held
    assert own == os.SCHED_BATCH
    assert child == os.SCHED_BATCH


def test_the_policy_comes_from_the_environment_and_a_wrong_one_is_named() -> None:
    assert load_config(NeuronConfig, file=None, environ={"HELEXA_CPU_POLICY": "batch"}).cpu_policy == "batch"
    with pytest.raises(ConfigError, match="cpu_policy"):
        load_config(NeuronConfig, file=None, environ={"HELEXA_CPU_POLICY": "fifo"})
