"""The prices this cortex announced lately: what a peer may still hold (pure).

A peer routes by the announcement it holds, which may be one ``announce_interval`` (and
the gossip's delay) behind a price change here, and it held its outbound price ceiling
against that one. A request served at a price raised since would be billed above what the
asker agreed to, and above a ceiling it enforces (its receipt then flagged on one side and
not the other). So a request is billed at the lowest price among the current one and those
of every announcement still live (not yet past its ``ttl``): a rise applies once no peer
can hold an older price, a cut at once.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Iterable
from dataclasses import replace

from helexa.protocol.federation import OfferedModel


class AnnouncedPrices:
    """Record each announcement's prices (:meth:`record`); price a request by :meth:`honour`."""

    def __init__(self) -> None:
        self._sent: deque[tuple[float, dict[str, tuple[float, float]]]] = deque()
        """(expires_at, {model_id: (price_input, price_output)}), oldest first."""

    def record(self, models: Iterable[OfferedModel], expires_at: float) -> None:
        prices = {m.model_id: (m.price_input, m.price_output) for m in models}
        if self._sent and self._sent[-1][1] == prices:
            # the same prices again: one entry, its life extended (bounded by changes, not time)
            self._sent.pop()
        self._sent.append((expires_at, prices))

    def honour(self, model: OfferedModel, now: float) -> OfferedModel:
        """``model`` priced at the lowest of its current prices and those still announced."""
        while self._sent and self._sent[0][0] <= now:
            self._sent.popleft()
        price_in, price_out = model.price_input, model.price_output
        for _, prices in self._sent:
            old = prices.get(model.model_id)
            if old is not None:
                price_in, price_out = min(price_in, old[0]), min(price_out, old[1])
        if (price_in, price_out) == (model.price_input, model.price_output):
            return model
        return replace(model, price_input=price_in, price_output=price_out)
