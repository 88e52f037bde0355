"""An embedding sent to a peer and cut on the asking side (its client left, its key was
revoked) stops on the serving peer too, as a generation does: the serving side read no
``Cancel`` while it embedded, so the peer's neuron embedded on, and it billed the asker an
``ok`` receipt for an answer nobody read."""

import trio

from helexa.mesh import MemoryNetwork
from helexa.protocol import EmbedRequest, EmbedResult, Usage, Workload
from helexa.protocol.federation import OfferedModel
from helexa.roles.cortex.federation.ledger import CONSUMED, SERVED

from conftest import FakeFleet
from test_federation_service import cortex, recorded, settle

OFFER = (OfferedModel("emb", True, price_input=1.0, workloads=(Workload.EMBEDDING,)),)


class SlowEmbeddings(FakeFleet):
    """Embeds in ``embed_delay`` seconds; records the requests cancelled before their end."""

    def __init__(self, embed_delay: float) -> None:
        super().__init__()
        self.embed_delay = embed_delay
        self.cancelled: list[str] = []

    async def embed(self, request):
        try:
            await trio.sleep(self.embed_delay)
        except trio.Cancelled:
            self.cancelled.append(request.request_id)
            raise
        return EmbedResult(request.request_id, 2, b"\0" * 8 * len(request.inputs), Usage(3, 0))


async def test_an_embedding_cut_on_the_asking_side_stops_on_the_serving_peer(nursery, autojump_clock):
    net = MemoryNetwork()
    fleet = SlowEmbeddings(embed_delay=10.0)
    a = await cortex(nursery, net, "A", offer=())
    b = await cortex(nursery, net, "B", fleet=fleet, offer=OFFER)
    await settle()
    with trio.move_on_after(1.0):  # a revoke's halt, or the client leaving, cancels the wait
        await a.embed(EmbedRequest("e1", "emb", ("x",)))
    served = await recorded(b.ledger, SERVED, "e1")
    assert fleet.cancelled == ["e1"]
    assert served.receipt.outcome == "cancelled" and served.receipt.prompt_tokens == 0
    consumed = a.ledger.get(CONSUMED, "e1")
    assert consumed is not None and consumed.receipt == served.receipt and not consumed.flagged

    fleet.embed_delay = 0.5  # the peer serves the next one as before
    result = await a.embed(EmbedRequest("e2", "emb", ("x", "y")))
    assert result.dim == 2 and (await recorded(b.ledger, SERVED, "e2")).receipt.outcome == "ok"
