"""The console's Mesh page: the peers this cortex hears (from their signed announcements,
with the verdict of this operator's outbound policy on each) and the federation ledger,
each receipt verified again as it is shown. "Mesh off" when the cortex runs without one."""

from __future__ import annotations

import dataclasses
import time
from typing import Any

import trio


def _peers(federation: Any) -> list[dict[str, Any]]:
    now = time.time()
    policy = federation.ask_policy
    out = []
    for ann in sorted(federation.table.peers(), key=lambda a: a.peer_id):
        allowed = policy.allows_peer(ann.peer_id, ann.operator)
        out.append({
            "peer_id": ann.peer_id, "operator": ann.operator, "addrs": list(ann.addrs),
            "spare": ann.spare_slots, "age": round(now - ann.issued_at, 1),
            "expires_in": round(ann.issued_at + ann.ttl - now, 1),
            "verdict": "may be asked" if allowed else "not asked (outbound policy)",
            "models": [{"id": m.model_id, "warm": m.warm, "price_input": m.price_input,
                        "price_output": m.price_output, "load_time": m.load_time_s,
                        "price_ok": policy.allows_price(m)} for m in ann.models],
        })
    return out


def _receipts(ledger: Any, limit: int = 200) -> list[dict[str, Any]]:
    from ..federation.receipts import verify_receipt

    rows = []
    for entry in ledger.entries()[-limit:]:
        r = entry.receipt
        problems = verify_receipt(r, server_peer_id=r.server_peer_id, client_peer_id=r.client_peer_id)
        rows.append({"direction": entry.direction, "peer_id": entry.peer_id, "request_id": r.request_id,
                     "model": r.model_id, "prompt": r.prompt_tokens, "completion": r.completion_tokens,
                     "cost": r.cost, "ended_at": r.ended_at, "outcome": r.outcome,
                     "verified": not problems, "problems": ", ".join(problems),
                     "flagged": entry.flag_reason if entry.flagged else ""})
    rows.reverse()
    return rows


async def mesh_context(mesh: Any) -> dict[str, Any]:
    """What ``mesh.html`` shows; ``mesh`` is ``(federation, ledger)`` or None (mesh off)."""
    if mesh is None:
        return {"mesh_on": False}
    federation, ledger = mesh
    receipts = await trio.to_thread.run_sync(_receipts, ledger) if ledger is not None else []
    summary = await ledger.asummary() if ledger is not None else []
    return {"mesh_on": True, "peer_id": federation.mesh.peer_id, "operator": federation.operator,
            "peers": _peers(federation), "receipts": receipts,
            "summary": [dataclasses.asdict(s) for s in summary]}
