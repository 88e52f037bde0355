"""A serving cortex changes its prices while peers route by the announcement they hold."""

import pytest
import trio

from helexa.mesh import MemoryNetwork
from helexa.protocol.federation import OfferedModel
from helexa.roles.cortex.federation import AskPolicy, OutboundRefused
from helexa.roles.cortex.federation.announced_prices import AnnouncedPrices
from helexa.roles.cortex.federation.ledger import CONSUMED, SERVED

from conftest import FakeFleet
from test_federation_service import cortex, recorded, request, settle


def priced(price_output: float) -> OfferedModel:
    return OfferedModel("tiny", warm=True, price_input=1.0, price_output=price_output)


async def test_a_price_raised_after_the_asker_last_heard_is_not_billed_above_its_cap(nursery, autojump_clock):
    """B raises its price above A's ceiling; A, still holding B's last announcement, sends
    a request at the old price. Before, B billed the new price: above A's ceiling (which A
    enforces only against announcements), its receipt flagged on A's side and clean on
    B's. Now B bills what it announced until no peer can hold the old price."""
    net = MemoryNetwork()
    offer = [priced(2.0)]
    a = await cortex(nursery, net, "A", offer=(), ask_policy=AskPolicy(max_price_output=2.5))
    b = await cortex(nursery, net, "B", fleet=FakeFleet(), offer=offer)
    await settle()
    offer[0] = priced(3.0)  # B's reload: the next announcement carries it
    async with a.route(request("r1")) as frames:
        [f async for f in frames]
    consumed = a.ledger.get(CONSUMED, "r1")
    served = await recorded(b.ledger, SERVED, "r1")
    assert not consumed.flagged, consumed.flag_reason
    assert consumed.receipt == served.receipt
    assert served.receipt.price_output == 2.0
    # Once B's new price is announced, A's ceiling keeps A from asking at all.
    await trio.sleep(2)
    with pytest.raises(OutboundRefused):
        async with a.route(request("r2")):
            pass


def test_a_rise_applies_once_no_announcement_of_the_old_price_is_live_and_a_cut_at_once() -> None:
    prices = AnnouncedPrices()
    prices.record([priced(2.0)], expires_at=30)
    prices.record([priced(3.0)], expires_at=35)
    assert prices.honour(priced(3.0), now=10).price_output == 2.0
    assert prices.honour(priced(3.0), now=31).price_output == 3.0
    assert prices.honour(priced(1.0), now=31).price_output == 1.0
    unknown = OfferedModel("other", warm=True, price_input=5.0, price_output=5.0)
    assert prices.honour(unknown, now=10) is unknown
    for t in range(40, 100, 5):  # the same prices again and again: one entry
        prices.record([priced(3.0)], expires_at=t)
    assert len(prices._sent) == 1
