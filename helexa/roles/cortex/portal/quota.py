"""Quotas, as a pure state machine fed the time (``now``, Unix seconds).

Every subject that has limits (an API key, a whole portal) has an :class:`Account`:

* ``rpm`` and ``tpm``: token buckets of a minute's worth, refilled evenly (``rpm / 60``
  requests a second), so a burst of a full minute's allowance is admitted at once and
  the rest as it refills;
* ``max_concurrent``: requests admitted and not yet settled;
* ``budget`` per ``period`` (a UTC day, a UTC calendar month, or ``total``), in money or
  in tokens: a hard stop.

A request is admitted against all its accounts at once (:func:`admit`) with its
**worst case** (:class:`Reservation`: the most tokens it could use and what they would
cost): one request token and the tokens are taken from the buckets, the concurrency slot
is held, and the cost is reserved against the budget. :meth:`Account.settle` replaces the
reservation with what the request really used: unused tokens go back to the bucket, the
real cost is spent. Since nothing is admitted that the worst case would not fit, any
number of concurrent requests stays within a budget. The shell (:mod:`.metering`) calls
these on the trio thread, so check-then-reserve is atomic without locks.

:func:`rate_headers` renders OpenAI's ``x-ratelimit-*`` headers from the accounts.
"""

from __future__ import annotations

import calendar
import math
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any

UNITS = ("money", "tokens")
PERIODS = ("day", "month", "total")
_EPS = 1e-9
_LEVEL_EPS = 1e-6
"""Bucket levels are compared with this slack: Unix times as floats resolve only about a
quarter of a microsecond, so refills carry errors far above ``_EPS``."""


@dataclass(frozen=True, slots=True)
class Limits:
    """The limits of one subject; None means unlimited (see the module docstring)."""

    rpm: int | None = None
    tpm: int | None = None
    max_concurrent: int | None = None
    budget: float | None = None
    budget_unit: str = "money"
    period: str = "month"

    def __post_init__(self) -> None:
        if self.budget_unit not in UNITS:
            raise ValueError(f"budget_unit must be one of {', '.join(UNITS)}")
        if self.period not in PERIODS:
            raise ValueError(f"period must be one of {', '.join(PERIODS)}")
        for name in ("rpm", "tpm", "max_concurrent"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise ValueError(f"{name} must be at least 1")
        if self.budget is not None and self.budget < 0:
            raise ValueError("budget must not be negative")

    @property
    def unlimited(self) -> bool:
        return self.rpm is None and self.tpm is None and self.max_concurrent is None and self.budget is None

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any] | None) -> "Limits":
        return cls(**{k: v for k, v in (data or {}).items() if k in cls.__dataclass_fields__})


def period_bounds(period: str, now: float) -> tuple[float, float]:
    """``[start, end)`` of the budget period holding ``now`` (UTC)."""
    if period == "total":
        return 0.0, math.inf
    t = time.gmtime(now)
    if period == "day":
        start = calendar.timegm((t.tm_year, t.tm_mon, t.tm_mday, 0, 0, 0))
        return float(start), float(start + 86400)
    start = calendar.timegm((t.tm_year, t.tm_mon, 1, 0, 0, 0))
    year, month = (t.tm_year + 1, 1) if t.tm_mon == 12 else (t.tm_year, t.tm_mon + 1)
    return float(start), float(calendar.timegm((year, month, 1, 0, 0, 0)))


class Bucket:
    """A token bucket of ``capacity`` refilled at ``rate`` a second; pure given ``now``.

    The level may go below zero when a request used more than it reserved: the debt
    delays the next admissions.
    """

    __slots__ = ("capacity", "rate", "level", "stamp")

    def __init__(self, capacity: float, rate: float, now: float) -> None:
        self.capacity = float(capacity)
        self.rate = rate
        self.level = float(capacity)
        self.stamp = now

    def at(self, now: float) -> float:
        """The level at ``now`` (refilling up to then). A ``now`` before the last one (the
        wall clock stepped back) refills nothing and becomes the stamp: the refill goes on
        from the clock's new time, instead of waiting for it to pass the old one again (an
        hour stepped back froze every bucket for an hour, its Retry-After saying a second)."""
        if now > self.stamp:
            self.level = min(self.capacity, self.level + (now - self.stamp) * self.rate)
        self.stamp = now
        return self.level

    def take(self, n: float, now: float) -> None:
        self.at(now)
        self.level -= n

    def give(self, n: float, now: float) -> None:
        self.at(now)
        self.level = min(self.capacity, self.level + n)

    def wait(self, n: float, now: float) -> float:
        """Seconds until ``n`` can be taken (inf if ``n`` is over the capacity)."""
        level = self.at(now)
        if level + _LEVEL_EPS >= n:
            return 0.0
        if n > self.capacity + _LEVEL_EPS:
            return math.inf
        return (n - level) / self.rate

    def full_in(self, now: float) -> float:
        """Seconds until the bucket is full again."""
        return max(0.0, (self.capacity - self.at(now)) / self.rate)


@dataclass(frozen=True, slots=True)
class Reservation:
    """A request's worst case: ``tokens`` (prompt bound + completion limit) and ``cost``;
    ``requests``: what it takes from an ``rpm`` bucket (1; 0 for choices 1.. of OpenAI's
    ``n``, since OpenAI counts one request per call however many choices it asks for)."""

    tokens: int
    cost: float
    requests: int = 1
    lower: str = "max_tokens"
    """What a refusal tells the client to lower: ``max_tokens``; an embedding has only its input;
    empty: nothing (a model's load, which reserves one prompt token)."""

    def amount(self, unit: str) -> float:
        return self.cost if unit == "money" else float(self.tokens)


@dataclass(frozen=True, slots=True)
class Refusal:
    """Why a request was not admitted: ``code`` is ``requests`` (rpm), ``tokens`` (tpm),
    ``too_large`` (the worst case is over the tpm limit itself), ``concurrency`` or
    ``budget``; ``retry_after`` in seconds."""

    subject: str
    code: str
    message: str
    retry_after: float | None
    """None: waiting cannot help (the request is over the limit itself, or the budget never renews)."""


def _resized(bucket: Bucket | None, capacity: int | None, now: float) -> Bucket | None:
    """A bucket of a new ``capacity`` (a minute's worth; None: no limit) that keeps what the
    last minute took from ``bucket``: its level is the new capacity less what the old one
    lacked (below zero, a debt, when a lower limit was already used up). A new bucket full
    was a limit lowered live that handed a key which had spent its minute a whole new one."""
    if not capacity:
        return None
    out = Bucket(capacity, capacity / 60.0, now)
    if bucket is not None:
        out.level = capacity - (bucket.capacity - bucket.at(now))
    return out


class Account:
    """The quota state of one subject (see the module docstring).

    Args:
        subject: a name for messages (``key 3f9a...``, ``portal acme``).
        limits: its limits.
        now: Unix seconds.
        spent_money, spent_tokens: already spent in the current period (rebuilt from the
            ledger at start, so a restart does not reset a budget).
        currency: what a money budget is in (its portal's): only spending in it counts.
    """

    def __init__(self, subject: str, limits: Limits, now: float, *, spent_money: float = 0.0,
                 spent_tokens: float = 0.0, currency: str = "") -> None:
        self.subject = subject
        self.currency = currency
        self.in_flight = 0
        self.reserved_money = 0.0
        self.reserved_tokens = 0.0
        self.spent_money = spent_money
        self.spent_tokens = spent_tokens
        self.limits = limits
        self.period_start, self.period_end = period_bounds(limits.period, now)
        self.requests = Bucket(limits.rpm, limits.rpm / 60.0, now) if limits.rpm else None
        self.tokens = Bucket(limits.tpm, limits.tpm / 60.0, now) if limits.tpm else None

    def set_limits(self, limits: Limits, now: float) -> bool:
        """New limits; a bucket whose size changed keeps what the last minute took from it
        (:func:`_resized`). Returns True when the budget period changed (the caller then
        restores the spent amounts for the new period from the ledger with :meth:`restore`)."""
        old, self.limits = self.limits, limits
        if limits.rpm != old.rpm:
            self.requests = _resized(self.requests, limits.rpm, now)
        if limits.tpm != old.tpm:
            self.tokens = _resized(self.tokens, limits.tpm, now)
        if limits.period != old.period:
            self.period_start, self.period_end = period_bounds(limits.period, now)
            return True
        return False

    def restore(self, spent_money: float, spent_tokens: float) -> None:
        self.spent_money = spent_money
        self.spent_tokens = spent_tokens

    def _roll(self, now: float) -> None:
        if now >= self.period_end:
            self.period_start, self.period_end = period_bounds(self.limits.period, now)
            self.spent_money = self.spent_tokens = 0.0

    def spent(self, unit: str) -> float:
        return self.spent_money if unit == "money" else self.spent_tokens

    def reserved(self, unit: str) -> float:
        return self.reserved_money if unit == "money" else self.reserved_tokens

    def remaining_budget(self, now: float) -> float | None:
        """Budget left for new requests (what is reserved by those in flight excluded)."""
        if self.limits.budget is None:
            return None
        self._roll(now)
        unit = self.limits.budget_unit
        return max(0.0, self.limits.budget - self.spent(unit) - self.reserved(unit))

    def refusal(self, r: Reservation, now: float) -> Refusal | None:
        """Why ``r`` cannot be admitted now, or None. Changes nothing but the refill."""
        lim = self.limits
        if lim.max_concurrent is not None and self.in_flight >= lim.max_concurrent:
            return Refusal(self.subject, "concurrency",
                           f"{self.subject}: at most {lim.max_concurrent} concurrent requests", 1.0)
        if self.requests is not None and r.requests:
            wait = self.requests.wait(r.requests, now)
            if wait > 0:
                return Refusal(self.subject, "requests", f"{self.subject}: over {lim.rpm} requests per minute", wait)
        if self.tokens is not None:
            wait = self.tokens.wait(r.tokens, now)
            if wait == math.inf:
                lower = "max_tokens or the prompt" if r.lower == "max_tokens" else r.lower
                return Refusal(self.subject, "too_large",
                               f"{self.subject}: this request may use up to {r.tokens:.0f} tokens, over the limit of "
                               f"{lim.tpm} tokens per minute (lower {lower})", None)
            if wait > 0:
                return Refusal(self.subject, "tokens", f"{self.subject}: over {lim.tpm} tokens per minute", wait)
        if lim.budget is not None:
            self._roll(now)
            unit = lim.budget_unit
            used = self.spent(unit) + self.reserved(unit)
            # Nothing left refuses even what reserves nothing (a model's load, a free model):
            # a spent key causes no work.
            if used + r.amount(unit) > lim.budget * (1 + _EPS) + _EPS or used >= lim.budget * (1 - _EPS):
                left = max(0.0, lim.budget - self.spent(unit) - self.reserved(unit))
                if unit == "money":
                    what, ask = f"{left:.6g} left of {lim.budget:g}", f"cost up to {r.amount(unit):.6g}"
                else:
                    what, ask = f"{left:.0f} tokens left of {lim.budget:.0f}", f"use up to {r.amount(unit):.0f} tokens"
                renews = "" if lim.period == "total" else f", until the {lim.period}'s budget renews"
                if not r.amount(unit):
                    message = f"{self.subject}: the {lim.period} budget is spent ({what}{renews})"
                else:
                    lower = f"lower {r.lower}{renews}" if r.lower else renews.removeprefix(", ")
                    message = f"{self.subject}: the {lim.period} budget has {what}, and this request may {ask}" + (
                        f" ({lower})" if lower else "")
                retry = self.period_end - now if lim.period != "total" else None
                return Refusal(self.subject, "budget", message, retry)
        return None

    def reserve(self, r: Reservation, now: float) -> None:
        self.in_flight += 1
        if self.requests is not None and r.requests:
            self.requests.take(r.requests, now)
        if self.tokens is not None:
            self.tokens.take(r.tokens, now)
        self.reserved_money += r.cost
        self.reserved_tokens += r.tokens

    def settle(self, r: Reservation, tokens: int, cost: float, now: float, currency: str | None = None) -> None:
        """End a reservation with what the request really used; ``cost`` (in ``currency``:
        its admitted tariff's) is spent only where that is the account's currency (a money
        budget never adds amounts of two currencies: one admitted before a reload changed
        the portal's currency is not counted in the new one)."""
        self.in_flight -= 1
        self.reserved_money = max(0.0, self.reserved_money - r.cost)
        self.reserved_tokens = max(0.0, self.reserved_tokens - r.tokens)
        if self.tokens is not None:
            if tokens <= r.tokens:
                self.tokens.give(r.tokens - tokens, now)
            else:
                self.tokens.take(tokens - r.tokens, now)
        self.spend(tokens, cost, now, currency)

    def spend(self, tokens: int, cost: float, now: float, currency: str | None = None) -> None:
        """Count what a request used against the budget (``cost`` only in the account's
        currency): :meth:`settle`'s spending, and all of it for a request admitted before
        this account had limits (no reservation of it here to end)."""
        self._roll(now)
        if currency is None or currency == self.currency:
            self.spent_money += cost
        self.spent_tokens += tokens

    def snapshot(self, now: float) -> dict[str, Any]:
        """The account's state, for ``/v1/usage`` and the admin API."""
        self._roll(now)
        out: dict[str, Any] = {"limits": self.limits.as_dict(), "in_flight": self.in_flight,
                               "period_start": self.period_start,
                               "period_end": None if self.period_end == math.inf else self.period_end,
                               "spent": {"money": self.spent_money, "tokens": int(self.spent_tokens)},
                               "remaining_budget": self.remaining_budget(now)}
        if self.requests is not None:
            out["remaining_requests"] = max(0, math.floor(self.requests.at(now) + _LEVEL_EPS))
        if self.tokens is not None:
            out["remaining_tokens"] = max(0, math.floor(self.tokens.at(now) + _LEVEL_EPS))
        return out


def admit(accounts: Sequence[Account], r: Reservation, now: float) -> Refusal | None:
    """Reserve ``r`` on every account, or on none: returns the first refusal (None: admitted)."""
    for account in accounts:
        refusal = account.refusal(r, now)
        if refusal is not None:
            return refusal
    for account in accounts:
        account.reserve(r, now)
    return None


def beyond(accounts: Sequence[Account], whole: Reservation, copies: int) -> Refusal | None:
    """Why a request of ``copies`` generations (OpenAI's ``n`` choices: one request against
    ``rpm``, as OpenAI counts it, but ``copies`` against ``max_concurrent``, since each runs
    as a generation of its own on a neuron; ``whole``: their worst case together, the
    prompt once and ``copies`` answers) can never be admitted whole, or None:
    more of them than an account's ``max_concurrent``, more tokens than its ``tpm`` holds,
    more than its whole budget. Each choice alone may fit, so :func:`admit` would refuse
    only the later ones, with a wait after which they are refused again; this refusal says
    no wait helps."""
    for account in accounts:
        lim, who = account.limits, account.subject
        if lim.max_concurrent is not None and copies > lim.max_concurrent:
            return Refusal(who, "concurrency", f"{who}: n={copies} choices run as {copies} concurrent requests, over "
                           f"the limit of {lim.max_concurrent} (lower n)", None)
        if lim.tpm is not None and whole.tokens > lim.tpm:
            return Refusal(who, "too_large", f"{who}: n={copies} choices may use up to {whole.tokens:.0f} "
                           f"tokens, over the limit of {lim.tpm} tokens per minute (lower n, max_tokens or the prompt)",
                           None)
        if lim.budget is not None and whole.amount(lim.budget_unit) > lim.budget * (1 + _EPS) + _EPS:
            return Refusal(who, "budget", f"{who}: n={copies} choices may cost up to "
                           f"{whole.amount(lim.budget_unit):.6g}, over the whole {lim.period} budget of "
                           f"{lim.budget:g} (lower n or max_tokens)", None)
    return None


def duration(seconds: float) -> str:
    """A reset time as OpenAI writes it: ``250ms``, ``1s``, ``6m0s``, ``1h2m3s``."""
    if seconds < 1:
        return f"{max(0, math.ceil(seconds * 1000))}ms"
    s = math.ceil(seconds - 1e-9)
    h, rest = divmod(s, 3600)
    m, sec = divmod(rest, 60)
    if h:
        return f"{h}h{m}m{sec}s"
    if m:
        return f"{m}m{sec}s"
    return f"{sec}s"


def rate_headers(accounts: Sequence[Account], now: float) -> list[tuple[bytes, bytes]]:
    """``x-ratelimit-{limit,remaining,reset}-{requests,tokens}`` for the tightest account
    of each kind (those with an rpm / tpm limit); empty when none has one."""
    out: list[tuple[bytes, bytes]] = []
    for kind, attr, limit in (("requests", "requests", "rpm"), ("tokens", "tokens", "tpm")):
        best: tuple[float, Account] | None = None
        for account in accounts:
            bucket = getattr(account, attr)
            if bucket is not None:
                level = bucket.at(now)
                if best is None or level < best[0]:
                    best = (level, account)
        if best is None:
            continue
        level, account = best
        bucket = getattr(account, attr)
        out += [(b"x-ratelimit-limit-" + kind.encode(), str(getattr(account.limits, limit)).encode()),
                (b"x-ratelimit-remaining-" + kind.encode(), str(max(0, math.floor(level + _LEVEL_EPS))).encode()),
                (b"x-ratelimit-reset-" + kind.encode(), duration(bucket.full_in(now)).encode())]
    return out
