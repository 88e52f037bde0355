"""Portals: the gateway's branded front doors, with their API keys, quotas, prices and
the usage ledger that bills every token (``docs/portals.md``).

Modules: :mod:`.config` (a portal's configuration, ``[portals.NAME]``), :mod:`.portal` (a
portal's models, prices, routing and tenant; pure),
:mod:`.keys` (API keys and the key ring; pure), :mod:`.quota` (rate buckets, concurrency
and budgets as a state machine fed the time; pure), :mod:`.usage` (a ledger record),
:mod:`.store` (the storage interface and its SQLite default), :mod:`.writer` (durable
writes off the trio thread), :mod:`.metering` (the one metered path every model route
takes), :mod:`.accounts` (its quota accounts, their budgets rebuilt from the ledger, each
in its portal's currency), :mod:`.routing` (a portal's routing preferences for the federation),
:mod:`.admin` (the admin API).

Errors raised toward clients are the gateway's (:mod:`..errors`): ``Unauthorized`` (401,
a missing or bad key), ``ModelNotFound`` (404, a model the portal does not serve or the key
may not use: one answer for both), ``RateLimited`` / ``InsufficientQuota`` (429,
with ``Retry-After``); :class:`.writer.LedgerError` when a record cannot be made durable
(500: the answer is not finished without its record).
"""
