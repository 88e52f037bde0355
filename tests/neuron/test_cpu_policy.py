"""The neuron's CPU scheduling policy (``cpu_policy``): set on the thread that starts it,
inherited by what that thread starts except what an engine starts, refused values named."""

from __future__ import annotations

import os
import threading

import pytest

from helexa.config import ConfigError, load_config
from helexa.roles.neuron.config import NeuronConfig
from helexa.runtime import cpu_policy
from helexa.runtime.cpu_policy import apply as apply_cpu_policy

linux_only = pytest.mark.skipif(not hasattr(os, "SCHED_BATCH"), reason="SCHED_BATCH is Linux's")


def _in_thread(fn):
    """Run ``fn`` in a thread of its own (a policy set there leaves the test's thread alone)."""
    out: list = []
    t = threading.Thread(target=lambda: out.append(fn()))
    t.start()
    t.join()
    return out[0]


def test_normal_changes_nothing() -> None:
    def check():
        before = os.sched_getscheduler(0)
        return apply_cpu_policy("normal"), before, os.sched_getscheduler(0)

    held, before, after = _in_thread(check)
    assert held and before == after


def test_the_default_is_normal() -> None:
    assert NeuronConfig().cpu_policy == "normal"


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


@linux_only
def test_what_an_engine_starts_runs_normal_and_the_thread_that_built_it_goes_back_to_batch() -> None:
    def check():
        apply_cpu_policy("batch")
        started = cpu_policy.engine(lambda: _in_thread(lambda: os.sched_getscheduler(0)))()
        return started, os.sched_getscheduler(0)

    started, after = _in_thread(check)
    assert started == os.SCHED_OTHER
    assert after == os.SCHED_BATCH


@linux_only
def test_an_engines_own_thread_leaves_batch() -> None:
    def check():
        apply_cpu_policy("batch")
        cpu_policy.engine_thread()
        return os.sched_getscheduler(0)

    assert _in_thread(check) == os.SCHED_OTHER


@linux_only
def test_current_names_the_calling_threads_policy() -> None:
    def check():
        before = cpu_policy.current()
        apply_cpu_policy("batch")
        return before, cpu_policy.current()

    assert _in_thread(check) == ("normal", "batch")


@linux_only
def test_normal_takes_a_thread_out_of_an_inherited_batch() -> None:
    """A worker is told its neuron's policy: ``normal`` holds even where the thread that
    forked it was under batch."""
    def check():
        apply_cpu_policy("batch")
        return apply_cpu_policy("normal"), os.sched_getscheduler(0)

    assert _in_thread(check) == (True, os.SCHED_OTHER)
