"""``excuse_stall``: silence a watchdog could not observe does not count against the watched."""

from helexa.watchdog import excuse_stall


def test_a_check_on_time_leaves_the_last_heard_time_alone():
    assert excuse_stall(10.0, now=12.0, last_check=11.5, max_gap=0.5) == 10.0


def test_a_late_check_excuses_only_the_lateness():
    # Checks every 0.5 s at most; this one came 8 s after the last: 7.5 s were a stall.
    assert excuse_stall(10.0, now=19.0, last_check=11.0, max_gap=0.5) == 17.5


def test_the_excuse_never_moves_the_last_heard_time_past_now():
    assert excuse_stall(18.9, now=19.0, last_check=11.0, max_gap=0.5) == 19.0
