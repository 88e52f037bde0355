"""The quota state machine, fed exact times (no clock, no event loop)."""

from __future__ import annotations

import calendar
import math

import pytest

from helexa.roles.cortex.portal.quota import (
    Account,
    Bucket,
    Limits,
    Reservation,
    admit,
    duration,
    period_bounds,
    rate_headers,
)

T0 = float(calendar.timegm((2026, 3, 14, 12, 0, 0)))  # a Saturday noon, UTC


def headers(accounts, now) -> dict[str, str]:
    return {k.decode(): v.decode() for k, v in rate_headers(accounts, now)}


def test_a_token_bucket_refills_evenly_up_to_its_capacity() -> None:
    b = Bucket(60, 1.0, T0)
    b.take(60, T0)
    assert b.at(T0) == 0 and b.wait(1, T0) == 1.0 and b.wait(10, T0) == 10.0
    assert b.at(T0 + 2.5) == 2.5
    assert b.at(T0 + 1000) == 60 and b.full_in(T0 + 1000) == 0
    assert b.wait(61, T0 + 1000) == math.inf


def test_rpm_admits_a_minutes_worth_at_once_then_one_per_refill() -> None:
    key = Account("key k", Limits(rpm=3), T0)
    r = Reservation(10, 0.0)
    assert [admit([key], r, T0) for _ in range(3)] == [None, None, None]
    refusal = admit([key], r, T0)
    assert refusal.code == "requests" and refusal.retry_after == pytest.approx(20.0)
    assert headers([key], T0) == {"x-ratelimit-limit-requests": "3", "x-ratelimit-remaining-requests": "0",
                                  "x-ratelimit-reset-requests": "1m0s"}
    assert admit([key], r, T0 + 19.9).code == "requests"
    assert admit([key], r, T0 + 20.0) is None
    assert headers([key], T0 + 20)["x-ratelimit-reset-requests"] == "1m0s"


def test_tpm_reserves_the_worst_case_and_gives_back_what_was_not_used() -> None:
    key = Account("key k", Limits(tpm=1000), T0)
    big = Reservation(600, 0.0)
    assert admit([key], big, T0) is None
    assert headers([key], T0)["x-ratelimit-remaining-tokens"] == "400"
    refused = admit([key], big, T0)
    assert refused.code == "tokens" and refused.retry_after == pytest.approx(200 / (1000 / 60))
    key.settle(big, 100, 0.0, T0 + 1)  # used 100 of the 600 reserved: 500 come back
    assert key.tokens.at(T0 + 1) == pytest.approx(400 + 1000 / 60 + 500)
    assert admit([key], big, T0 + 1) is None


def test_a_request_larger_than_the_tpm_limit_is_refused_as_too_large() -> None:
    key = Account("key k", Limits(tpm=100), T0)
    refusal = admit([key], Reservation(101, 0.0), T0)
    assert refusal.code == "too_large" and "lower max_tokens" in refusal.message


def test_using_more_than_reserved_leaves_a_debt_that_delays_the_next_request() -> None:
    key = Account("key k", Limits(tpm=600), T0)  # 10 tokens a second
    r = Reservation(100, 0.0)
    assert admit([key], r, T0) is None
    key.settle(r, 700, 0.0, T0)  # 600 more than reserved: the bucket is at -100
    refusal = admit([key], r, T0)
    assert refusal.code == "tokens" and refusal.retry_after == pytest.approx(20.0)
    assert headers([key], T0)["x-ratelimit-remaining-tokens"] == "0"


def test_concurrency_counts_requests_until_they_settle() -> None:
    key = Account("key k", Limits(max_concurrent=2), T0)
    r = Reservation(1, 0.0)
    assert admit([key], r, T0) is None and admit([key], r, T0) is None
    refusal = admit([key], r, T0)
    assert refusal.code == "concurrency" and refusal.retry_after == 1.0
    key.settle(r, 1, 0.0, T0)
    assert admit([key], r, T0) is None


def test_a_budget_admits_no_more_worst_cases_than_it_can_pay_for() -> None:
    key = Account("key k", Limits(budget=1.0, period="day"), T0)
    r = Reservation(1000, 0.1)  # at most 0.1 each
    admitted = [admit([key], r, T0) is None for _ in range(100)]
    assert admitted.count(True) == 10 and admitted[:10] == [True] * 10
    refusal = admit([key], r, T0)
    assert refusal.code == "budget" and refusal.retry_after == 12 * 3600  # until UTC midnight
    for _ in range(10):  # each really cost a quarter of its worst case
        key.settle(r, 250, 0.025, T0 + 1)
    assert key.spent_money == pytest.approx(0.25) and key.remaining_budget(T0 + 1) == pytest.approx(0.75)
    assert sum(admit([key], r, T0 + 1) is None for _ in range(100)) == 7


def test_a_token_budget_counts_tokens() -> None:
    key = Account("key k", Limits(budget=1000, budget_unit="tokens", period="total"), T0)
    r = Reservation(400, 5.0)
    assert admit([key], r, T0) is None and admit([key], r, T0) is None
    refusal = admit([key], r, T0)
    assert refusal.code == "budget" and refusal.retry_after is None  # a total budget never renews
    assert "has 200 tokens left of 1000, and this request may use up to 400 tokens" in refusal.message
    key.settle(r, 100, 5.0, T0)
    assert admit([key], r, T0) is None and key.spent_tokens == 100


def test_a_budget_starts_again_with_its_period() -> None:
    key = Account("key k", Limits(budget=1.0, period="month"), T0)
    r = Reservation(1, 1.0)
    assert admit([key], r, T0) is None
    key.settle(r, 1, 1.0, T0)
    assert admit([key], r, T0).code == "budget"
    april = float(calendar.timegm((2026, 4, 1, 0, 0, 0)))
    assert admit([key], r, april - 0.001).code == "budget"
    assert admit([key], r, april) is None and key.spent_money == 0.0


def test_a_restart_keeps_what_was_spent() -> None:
    key = Account("key k", Limits(budget=1.0, period="day"), T0, spent_money=0.95)
    assert admit([key], Reservation(1, 0.1), T0).code == "budget"
    assert admit([key], Reservation(1, 0.05), T0) is None


def test_admission_is_all_or_nothing_across_key_and_portal() -> None:
    key = Account("key k", Limits(rpm=10), T0)
    portal = Account("portal p", Limits(max_concurrent=1), T0)
    r = Reservation(1, 0.0)
    assert admit([key, portal], r, T0) is None
    refusal = admit([key, portal], r, T0)
    assert refusal.subject == "portal p" and refusal.code == "concurrency"
    assert key.in_flight == 1 and key.requests.at(T0) == 9  # the refused one took nothing


def test_the_headers_report_the_tightest_account() -> None:
    key = Account("key k", Limits(rpm=100, tpm=10_000), T0)
    portal = Account("portal p", Limits(rpm=5), T0)
    admit([key, portal], Reservation(1000, 0.0), T0)
    assert headers([key, portal], T0) == {
        "x-ratelimit-limit-requests": "5", "x-ratelimit-remaining-requests": "4",
        "x-ratelimit-reset-requests": "12s", "x-ratelimit-limit-tokens": "10000",
        "x-ratelimit-remaining-tokens": "9000", "x-ratelimit-reset-tokens": "6s"}
    assert rate_headers([Account("x", Limits(budget=1), T0)], T0) == []


@pytest.mark.parametrize(("seconds", "text"), [(0.25, "250ms"), (0.0, "0ms"), (1.0, "1s"), (59.2, "1m0s"),
                                               (360.0, "6m0s"), (3723.0, "1h2m3s")])
def test_durations_are_written_as_openai_writes_them(seconds, text) -> None:
    assert duration(seconds) == text


def test_periods_are_utc_days_and_calendar_months() -> None:
    assert period_bounds("day", T0) == (calendar.timegm((2026, 3, 14, 0, 0, 0)), calendar.timegm((2026, 3, 15, 0, 0, 0)))
    dec = calendar.timegm((2026, 12, 31, 23, 59, 59))
    assert period_bounds("month", dec) == (calendar.timegm((2026, 12, 1, 0, 0, 0)), calendar.timegm((2027, 1, 1, 0, 0, 0)))
    assert period_bounds("total", T0) == (0.0, math.inf)


def test_new_limits_keep_the_spending_unless_the_period_changes() -> None:
    key = Account("key k", Limits(budget=1.0, period="day"), T0, spent_money=0.5)
    assert key.set_limits(Limits(budget=2.0, period="day", rpm=5), T0) is False
    assert key.spent_money == 0.5 and key.requests is not None
    assert key.set_limits(Limits(budget=2.0, period="month"), T0) is True


def test_limits_reject_nonsense() -> None:
    with pytest.raises(ValueError):
        Limits(period="week")
    with pytest.raises(ValueError):
        Limits(rpm=0)
    assert Limits.from_dict({"rpm": 3, "junk": 1}) == Limits(rpm=3)


def test_a_reservation_of_no_request_takes_nothing_from_rpm() -> None:
    # Choices 1.. of OpenAI's n: the call's one request is choice 0's.
    account = Account("key k", Limits(rpm=1, max_concurrent=3), 0.0)
    assert admit([account], Reservation(10, 0.0), 0.0) is None
    for _ in range(2):
        assert admit([account], Reservation(10, 0.0, requests=0), 0.0) is None
    assert account.in_flight == 3  # each choice still holds a concurrency slot
    refusal = admit([account], Reservation(10, 0.0), 0.0)
    assert refusal is not None and refusal.code == "concurrency"
    account.settle(Reservation(10, 0.0), 5, 0.0, 0.0)
    refusal = admit([account], Reservation(10, 0.0), 0.0)
    assert refusal is not None and refusal.code == "requests"


def test_a_clock_stepped_back_does_not_freeze_the_buckets() -> None:
    """The wall clock stepped back an hour (an NTP correction, a VM resumed): a bucket
    refilled only once the clock passed its old stamp again, so every key with an rpm
    limit that had used it waited an hour. It refills from the clock's new time."""
    key = Account("key k", Limits(rpm=60), T0)
    one = Reservation(tokens=0, cost=0.0)
    for _ in range(60):
        assert admit([key], one, T0) is None
    assert admit([key], one, T0).code == "requests"
    back = T0 - 3600
    assert admit([key], one, back).code == "requests"  # nothing refilled yet: no time went by
    assert admit([key], one, back + 2) is None  # two seconds later (at one a second): refilled


@pytest.mark.parametrize("budget,spent", [(0.0, 0.0), (1.0, 1.0), (1.0, 1.5)])
def test_a_spent_budget_refuses_even_a_request_that_costs_nothing(budget, spent) -> None:
    """Nothing left (a budget of 0, or spent to the last cent or past it): a request that
    reserves nothing (a model load, a free model) is refused too, so a spent key causes no work."""
    key = Account("key k", Limits(budget=budget, period="total"), T0, spent_money=spent)
    refusal = admit([key], Reservation(0, 0.0), T0)
    assert refusal is not None and refusal.code == "budget" and refusal.retry_after is None
    assert key.in_flight == 0
    assert admit([Account("key k", Limits(budget=1.0), T0, spent_money=0.5)], Reservation(0, 0.0), T0) is None
