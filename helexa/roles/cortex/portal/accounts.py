"""The quota accounts of keys and portals, kept by :class:`~.metering.Metering` (this is
its base): found or made for each request, their budgets' spending rebuilt from the ledger
at start and when a key's or portal's limits change, and what ``GET /v1/usage`` answers.

A money budget is in its portal's ``currency`` and counts only spending recorded in it:
rows of another currency (from before the operator changed the portal's currency) are
not added to it, at start as after a reload, and a request admitted before the change
settles its cost in its own currency, which the new budget does not count. Token
budgets count every token.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, TypeVar

from ..errors import Unauthorized
from .keys import ApiKey, Keyring
from .portal import Portal
from .quota import Account, Limits, Reservation, period_bounds, rate_headers

if TYPE_CHECKING:
    from .metered import MeteredGeneration
    from .metering import Caller
    from .store import Store

T = TypeVar("T")


class Admission:
    """A request admitted and not yet settled: its key's id, its worst case, and the accounts
    it will be settled on (a list that :meth:`AccountBook.count_running` may add to)."""

    __slots__ = ("key_id", "reservation", "accounts")

    def __init__(self, key_id: str, reservation: Reservation, accounts: list[Account]) -> None:
        self.key_id = key_id
        self.reservation = reservation
        self.accounts = accounts


class AccountBook:
    """Accounts by subject (``key:<id>``, ``portal:<id>``); see the module docstring."""

    store: Store
    clock: Callable[[], float]
    live: dict[str, set[MeteredGeneration]]

    def __init__(self) -> None:
        self._accounts: dict[str, Account] = {}
        self._currencies: dict[str, str] = {}
        """Each portal's currency (by id), as its accounts were last given it."""
        self._portal_of: dict[str, str] = {}
        """The portal of each key's account (by subject)."""
        self.keyring: Keyring | None = None
        """The keys as they are now (the gateway's), for :meth:`current`."""
        self.running: dict[str, set[Admission]] = {}
        """The requests admitted and not yet settled, by portal id (:meth:`count_running`)."""

    async def blocking(self, fn: Callable[..., T], *args: Any) -> T:
        raise NotImplementedError

    def _account(self, subject: str, label: str, limits: Limits, now: float, portal: Portal) -> Account:
        account = self._accounts.get(subject)
        if account is None:
            account = self._new_account(subject, label, limits, now, portal.id, portal.currency)
        elif account.limits is not limits and account.limits != limits:
            self._set_limits(subject, account, limits, now)
        return account

    def _new_account(self, subject: str, label: str, limits: Limits, now: float, portal_id: str,
                     currency: str) -> Account:
        account = self._accounts[subject] = Account(label, limits, now, currency=currency)
        self._portal_of[subject] = portal_id
        self.count_running(subject, account, now)
        return account

    def _set_limits(self, subject: str, account: Account, limits: Limits, now: float) -> bool:
        """:meth:`Account.set_limits`, and the requests running counted on a rate limit it
        did not have; returns what that does (the budget period changed)."""
        fresh = (account.requests is None and bool(limits.rpm), account.tokens is None and bool(limits.tpm))
        changed = account.set_limits(limits, now)
        if any(fresh):
            self.count_running(subject, account, now, fresh)
        return changed

    def admitted(self, caller: Caller, reservation: Reservation, accounts: list[Account]) -> Admission:
        """Note a request just admitted against ``accounts`` (the list it is settled on)
        until :meth:`settled`: a limit made while it runs counts it."""
        admission = Admission(caller.key_id, reservation, accounts)
        running = self.running.get(caller.portal.id)
        if running is None:
            running = self.running[caller.portal.id] = set()
        running.add(admission)
        return admission

    def settled(self, portal_id: str, admission: Admission) -> None:
        """``admission`` is settled (its accounts are, at once, with no await between)."""
        running = self.running.get(portal_id)
        if running is not None:
            running.discard(admission)
            if not running:
                del self.running[portal_id]

    def count_running(self, subject: str, account: Account, now: float,
                      fresh: tuple[bool, bool] = (True, True)) -> None:
        """Count the requests of ``subject`` (a key's, or all its portal's) that are running
        on ``account``, just made or given an ``rpm`` / ``tpm`` limit (``fresh``: which of
        those two buckets is new) by a reload or a key's update: a request admitted before
        it holds a concurrency slot of it, its worst case reserved and taken from its
        buckets, as if admitted against it, and is settled on it. Else a limit a reload
        adds (``max_concurrent = 2``) admitted two more requests beside those already
        running. On an account it was admitted against, only a new bucket takes its share."""
        portal_id = self._portal_of.get(subject)
        key_id = subject[4:] if subject.startswith("key:") else None
        for admission in self.running.get(portal_id or "", ()):
            if key_id is not None and admission.key_id != key_id:
                continue
            r = admission.reservation
            if all(a is not account for a in admission.accounts):
                account.reserve(r, now)
                admission.accounts.append(account)
                continue
            if fresh[0] and account.requests is not None and r.requests:
                account.requests.take(r.requests, now)
            if fresh[1] and account.tokens is not None:
                account.tokens.take(r.tokens, now)

    def current(self, caller: Caller, now: float) -> Caller:
        """``caller`` with its key's record as it is now. A request is authenticated when its
        head arrives, and admitted once its body has (up to ``body_timeout`` later) and its
        prompt was checked: a revoke, an expiry, new limits or models set in between apply
        to it, as they do to every request after them (it held the record of before).

        Raises:
            Unauthorized: the key was revoked (or removed) or expired since.
        """
        key = caller.key
        if key is None or self.keyring is None:
            return caller
        now_key = self.keyring.get(key.key_id)
        state = now_key.state(now) if now_key is not None else "revoked"
        if now_key is None or state != "active":
            raise Unauthorized(f"key {key.key_id} is {state}")
        return caller if now_key is key else dataclasses.replace(caller, key=now_key)

    def accounts(self, caller: Caller, now: float) -> list[Account]:
        """The accounts a request of ``caller`` is admitted against (key's, then portal's)."""
        out = []
        key = caller.key
        portal = caller.portal
        if key is not None and not key.limits.unlimited:
            out.append(self._account("key:" + key.key_id, f"key {key.key_id}", key.limits, now, portal))
        if not portal.limits.unlimited:
            out.append(self._account("portal:" + portal.id, f"portal {portal.id}", portal.limits, now, portal))
        return out

    def spend_unreserved(self, caller: Caller, admitted: list[Account], tokens: int, cost: float, currency: str,
                         now: float) -> None:
        """Count a settled request's use on its key's and portal's accounts that it was not
        admitted against: made, or given limits, while it ran (a budget set on a key with
        answers running). Else what those answers spend would count nowhere until a restart
        rebuilt the budget from the ledger, and the key could spend the budget again on top."""
        subjects = ["portal:" + caller.portal.id]
        if caller.key is not None:
            subjects.append("key:" + caller.key.key_id)
        for subject in subjects:
            account = self._accounts.get(subject)
            if account is not None and all(account is not a for a in admitted):
                account.spend(tokens, cost, now, currency)

    def rate_headers(self, caller: Caller) -> list[tuple[bytes, bytes]]:
        """OpenAI's ``x-ratelimit-*`` headers for ``caller`` now (empty without rpm/tpm limits),
        from its key's limits as they are now (an answer written after a change of them, or
        after a revoke, neither puts the old limits back on the key's account nor makes the
        revoked key an account again: it would stay in memory for good)."""
        try:
            caller = self.current(caller, self.clock())
        except Unauthorized:
            return []
        accounts = self.accounts(caller, self.clock())
        return rate_headers(accounts, self.clock()) if accounts else []

    async def restore(self, keys: list[ApiKey], portals: list[Portal]) -> None:
        """Rebuild every budget's spent amount from the ledger (at start, so a restart does
        not reset a budget), counting money in its portal's currency only."""
        now = self.clock()
        self._currencies.update({p.id: p.currency for p in portals})
        subjects: list[tuple[str, str, str, str, Limits, str]] = []
        for key in keys:
            if not key.limits.unlimited and key.revoked_at is None:  # a revoked key never spends again
                subjects.append(("key:" + key.key_id, f"key {key.key_id}", "key_id", key.key_id, key.limits,
                                 key.portal))
        for portal in portals:
            if not portal.limits.unlimited:
                subjects.append(("portal:" + portal.id, f"portal {portal.id}", "portal", portal.id, portal.limits,
                                 portal.id))
        starts = {(column, period_bounds(limits.period, now)[0]) for _, _, column, _, limits, _ in subjects}
        currencies = {column: {ident: self._currencies.get(pid, "") for _, _, c, ident, _, pid in subjects
                               if c == column} for column in ("key_id", "portal")}

        def query() -> dict[tuple[str, float], dict[str, tuple[float, int]]]:
            return {(column, start): self.store.spent_since(column, start, currencies[column])
                    for column, start in starts}

        spent = await self.blocking(query)
        for subject, label, column, ident, limits, pid in subjects:
            money, tokens = spent[(column, period_bounds(limits.period, now)[0])].get(ident, (0.0, 0))
            self._accounts[subject] = Account(label, limits, now, spent_money=money, spent_tokens=tokens,
                                              currency=self._currencies.get(pid, ""))
            self._portal_of[subject] = pid

    async def key_changed(self, key: ApiKey) -> None:
        """A key's limits changed (admin API): its account follows, its budget period's
        spending re-read from the ledger when the period changed. A key revoked (or expired)
        stops its generations still running (a stream at its next token, a whole answer or a request
        still waiting at once): a revoke stops at once."""
        subject = "key:" + key.key_id
        account = self._accounts.get(subject)
        now = self.clock()
        state = key.state(now)
        if state != "active":
            for run in self.live.get(key.key_id, ()):
                run.halt(Unauthorized(f"key {key.key_id} was {state} while this answer ran"))
        if key.revoked_at is not None:  # for good (no rotate, no update brings it back): its account goes
            self._accounts.pop(subject, None)
            self._portal_of.pop(subject, None)
            return
        if account is None or self._set_limits(subject, account, key.limits, now):
            currency = self._currencies.get(key.portal, "")
            start = period_bounds(key.limits.period, now)[0]
            spent = await self.blocking(self.store.spent_since, "key_id", start, {key.key_id: currency})
            money, tokens = spent.get(key.key_id, (0.0, 0))
            if account is None:
                if key.limits.unlimited:
                    return
                account = self._accounts.get(subject)  # made by a request during the read
                if account is None:
                    account = self._new_account(subject, f"key {key.key_id}", key.limits, self.clock(), key.portal,
                                                currency)
            account.restore(money, tokens)

    def portal_changed(self, portal: Portal) -> None:
        """A reload changed ``portal``'s settings: its account follows at once, and a budget
        it did not have, or a new budget period, counts what the portal spent in that period
        (from the ledger, as at start). A new currency: every budget of the portal and its
        keys counts what was spent in that currency alone from then on. Read on this thread:
        a reload is rare, and reads its files on it too."""
        subject, limits, now = "portal:" + portal.id, portal.limits, self.clock()
        if self._currencies.get(portal.id, portal.currency) != portal.currency:
            self._recount_currency(portal, now)
        self._currencies[portal.id] = portal.currency
        account = self._accounts.get(subject)
        if account is not None and not self._set_limits(subject, account, limits, now):
            return
        if account is None:
            if limits.unlimited:
                return
            account = self._new_account(subject, f"portal {portal.id}", limits, now, portal.id, portal.currency)
        start = period_bounds(limits.period, now)[0]
        money, tokens = self.store.spent_since("portal", start, {portal.id: portal.currency}).get(portal.id, (0.0, 0))
        account.restore(money, tokens)

    def _recount_currency(self, portal: Portal, now: float) -> None:
        """``portal``'s currency changed: its accounts' (and its keys') money budgets count
        what was spent in the new one in their period, from the ledger."""
        for subject, account in self._accounts.items():
            if self._portal_of.get(subject) != portal.id:
                continue
            account.currency = portal.currency
            column, ident = ("portal", portal.id) if subject.startswith("portal:") else ("key_id", subject[4:])
            start = period_bounds(account.limits.period, now)[0]
            money, tokens = self.store.spent_since(column, start, {ident: portal.currency}).get(ident, (0.0, 0))
            account.restore(money, tokens)

    def account_state(self, subject: str) -> dict[str, Any] | None:
        account = self._accounts.get(subject)
        return None if account is None else account.snapshot(self.clock())

    async def usage_of(self, caller: Caller) -> dict[str, Any]:
        """What ``GET /v1/usage`` answers a key holder: its limits, what it spent in the
        current budget period (money in the portal's currency), what is left, and its
        totals per model (and currency) in that period."""
        key = caller.key
        assert key is not None
        now = self.clock()
        currency = caller.portal.currency
        start, end = period_bounds(key.limits.period, now)
        rows = await self.blocking(lambda: self.store.report(by="model", key_id=key.key_id, since=start or None))
        state = self.account_state("key:" + key.key_id)
        spent_money = sum(r["cost"] for r in rows if r["currency"] == currency)
        spent_tokens = sum(r["total_tokens"] for r in rows)
        budget = key.limits.budget
        remaining = state["remaining_budget"] if state is not None else (
            None if budget is None else max(0.0, budget - (spent_money if key.limits.budget_unit == "money"
                                                           else spent_tokens)))
        return {"object": "usage", "key_id": key.key_id, "name": key.name, "portal": caller.portal.id,
                "currency": currency, "limits": key.limits.as_dict(),
                "period": {"name": key.limits.period, "start": start, "end": None if end == math.inf else end},
                "spent": {"money": spent_money, "tokens": spent_tokens}, "remaining_budget": remaining,
                "in_flight": state["in_flight"] if state is not None else 0,
                "models": [{k: r[k] for k in ("model", "requests", "prompt_tokens", "completion_tokens", "cost",
                                              "currency")} for r in rows]}
