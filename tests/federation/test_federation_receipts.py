import dataclasses
import signal
import sqlite3
import subprocess
import sys

from hypothesis import given, settings
from hypothesis import strategies as st

from helexa.identity import verify_signature
from helexa.mesh import peer_id_from_ed25519
from helexa.protocol import decode, encode
from helexa.protocol.federation import Receipt, signed_payload
from helexa.roles.cortex.federation.ledger import CHECKPOINT_AFTER, CONSUMED, SERVED, Ledger, format_report
from helexa.roles.cortex.federation.receipts import receipt_payload, sign_receipt, verify_receipt

from conftest import new_identity

CLIENT = peer_id_from_ed25519(new_identity().public_bytes)


def receipt(ident, **kw):
    args = dict(request_id="r1", model_id="m", prompt_tokens=10, completion_tokens=20, price_input=1.0,
                price_output=2.0, started_at=100.0, ended_at=101.0, client_peer_id=CLIENT)
    args.update(kw)
    return sign_receipt(ident, **args)


def test_a_receipt_verifies_and_its_cost_is_tokens_times_prices():
    server = new_identity()
    r = receipt(server)
    assert r.cost == (10 * 1.0 + 20 * 2.0) / 1e6
    assert verify_receipt(r, server_peer_id=peer_id_from_ed25519(server.public_bytes), client_peer_id=CLIENT,
                          request_id="r1", model_id="m", completion_tokens_seen=20, price_input=1.0,
                          price_output=2.0) == []


def test_signatures_are_openssls_byte_for_byte_and_checked_strictly():
    # Signed and verified by libsodium (the cheaper of the two here); Ed25519 is
    # deterministic, so a receipt signed before the change verifies after, and back.
    ident = new_identity()
    for data in (b"", b"x", receipt_payload(receipt(ident)) * 3):
        sig = ident.sign(data)
        assert sig == ident.private_key.sign(data)
        assert verify_signature(ident.public_bytes, sig, data)
        assert not verify_signature(ident.public_bytes, sig, data + b"!")
        assert not verify_signature(ident.public_bytes, sig[:63], data)  # truncated
        assert not verify_signature(ident.public_bytes, sig + b"\0", data)
        assert not verify_signature(ident.public_bytes[:31], sig, data)
        assert not verify_signature(new_identity().public_bytes, sig, data)
        assert not verify_signature(bytes(32), sig, data)  # a small-order key


def test_tampered_or_misattributed_receipts_fail():
    server = new_identity()
    sid = peer_id_from_ed25519(server.public_bytes)
    r = receipt(server)
    assert "bad signature" in verify_receipt(dataclasses.replace(r, completion_tokens=2000), server_peer_id=sid,
                                             client_peer_id=CLIENT)
    assert verify_receipt(r, server_peer_id=peer_id_from_ed25519(new_identity().public_bytes), client_peer_id=CLIENT)
    assert "receipt names another client" in verify_receipt(r, server_peer_id=sid, client_peer_id="someone")
    assert "output price above the announced one" in verify_receipt(r, server_peer_id=sid, client_peer_id=CLIENT,
                                                                    price_output=1.0)
    greedy = receipt(server, completion_tokens=500)
    assert verify_receipt(greedy, server_peer_id=sid, client_peer_id=CLIENT, completion_tokens_seen=20)


def test_ledger_is_durable_and_keeps_flagged_receipts(tmp_path):
    server = new_identity()
    r = receipt(server)
    with Ledger(tmp_path / "ledger.sqlite") as ledger:
        assert ledger.record(SERVED, r)
        assert not ledger.record(SERVED, r)  # once per request and direction
        assert ledger.record(CONSUMED, dataclasses.replace(r, request_id="r2"), flagged=True, flag_reason="bad")
    with Ledger(tmp_path / "ledger.sqlite") as ledger:
        assert ledger.get(SERVED, "r1").receipt == r
        flagged = ledger.get(CONSUMED, "r2")
        assert flagged.flagged and flagged.flag_reason == "bad"
        summary = ledger.summary()
        assert [(s.direction, s.requests, s.completion_tokens, s.flagged) for s in summary] == [
            (CONSUMED, 1, 20, 1), (SERVED, 1, 20, 0)]
        assert "served" in format_report(summary)


async def test_an_async_record_is_in_the_file_when_it_returns(tmp_path):
    with Ledger(tmp_path / "l.sqlite") as ledger:
        assert await ledger.arecord(SERVED, receipt(new_identity()))
        assert len(await ledger.asummary()) == 1
        # Another connection (another process, after a kill -9) sees it already.
        other = sqlite3.connect(tmp_path / "l.sqlite")
        assert other.execute("SELECT request_id FROM receipts").fetchall() == [("r1",)]
        other.close()


def test_a_record_survives_kill_9_of_the_process_that_made_it(tmp_path):
    path = tmp_path / "l.sqlite"
    code = f"""
import os, signal, trio
from helexa.roles.cortex.federation.ledger import SERVED, Ledger
from helexa.roles.cortex.federation.receipts import sign_receipt
from helexa.identity import Identity
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
r = sign_receipt(Identity(Ed25519PrivateKey.generate()), request_id="r1", model_id="m", prompt_tokens=1,
                 completion_tokens=2, price_input=1.0, price_output=1.0, started_at=1.0, ended_at=2.0,
                 client_peer_id="c")
ledger = Ledger({str(path)!r})
trio.run(ledger.arecord, SERVED, r)
os.kill(os.getpid(), signal.SIGKILL)
"""
    proc = subprocess.run([sys.executable, "-c", code], timeout=60)
    assert proc.returncode == -signal.SIGKILL
    with Ledger(path) as ledger:
        assert ledger.get(SERVED, "r1") is not None


async def test_the_log_is_checkpointed_off_the_loop_once_enough_records_were_written(tmp_path):
    ident = new_identity()
    with Ledger(tmp_path / "l.sqlite") as ledger:
        for i in range(CHECKPOINT_AFTER):
            await ledger.arecord(SERVED, receipt(ident, request_id=f"r{i}"))
        await ledger.acheckpoint()
        # The checkpoint moved every page of the log into the database file.
        busy, log_pages, moved = sqlite3.connect(tmp_path / "l.sqlite").execute(
            "PRAGMA wal_checkpoint(PASSIVE)").fetchone()
        assert busy == 0 and moved == log_pages
        assert len(ledger.entries(SERVED)) == CHECKPOINT_AFTER


@given(prompt=st.integers(0, 2**40), completion=st.integers(0, 2**40),
       price_in=st.one_of(st.integers(0, 10**6), st.floats(0, 1e6)),
       price_out=st.one_of(st.integers(0, 10**6), st.floats(0, 1e6)),
       started=st.one_of(st.integers(0, 2**33), st.floats(0, 2**33)), outcome=st.sampled_from(["ok", "error", "cancelled"]),
       request_id=st.text(max_size=40))
@settings(max_examples=200, deadline=None)
def test_receipt_payload_is_signed_payload(prompt, completion, price_in, price_out, started, outcome, request_id):
    """The one-encoding payload receipts are signed and verified over is, byte for byte,
    the protocol's encode-decode-encode one (an int given for a float field included):
    peers on either version verify each other's receipts."""
    server = new_identity()
    r = Receipt(request_id, "m", prompt, completion, price_in, price_out, 0, started, started, "server", CLIENT,
                server.public_bytes, outcome, b"sig")
    assert receipt_payload(r) == signed_payload(r)
    signed = receipt(server, request_id=request_id, prompt_tokens=prompt, completion_tokens=completion,
                     price_input=price_in, price_output=price_out, started_at=started, ended_at=started,
                     outcome=outcome)
    assert signed.signature and receipt_payload(signed) == signed_payload(signed)
    assert verify_signature(server.public_bytes, signed.signature, signed_payload(decode(encode(signed))))


def test_receipts_with_negative_counts_or_figures_that_are_not_numbers_are_flagged():
    server = new_identity()
    peer = peer_id_from_ed25519(server.public_bytes)
    for kw, problem in [
        (dict(prompt_tokens=-1_000_000), "negative token count"),
        (dict(completion_tokens=-5), "negative token count"),
        (dict(price_output=float("nan")), "price or cost negative or not a number"),
        (dict(price_input=float("inf")), "price or cost negative or not a number"),
    ]:
        problems = verify_receipt(receipt(server, **kw), server_peer_id=peer, client_peer_id=CLIENT,
                                  completion_tokens_seen=20)
        assert problem in problems, (kw, problems)


def test_receipts_dated_where_no_request_was_are_flagged_and_kept(tmp_path):
    # A peer signs what it likes: a receipt dated 1e300 verified, sorted after every other
    # for good and made the console's Mesh page a 500; one with NaN times (or cost) was
    # dropped by the ledger without a word (SQLite stores NaN as NULL in a NOT NULL column).
    server = new_identity()
    peer = peer_id_from_ed25519(server.public_bytes)
    window = (100.0, 102.0)  # when the asker asked, when the answer ended
    assert verify_receipt(receipt(server), server_peer_id=peer, client_peer_id=CLIENT, window=window) == []
    late = receipt(server, ended_at=101.0 + 29)  # within the clocks' skew
    assert verify_receipt(late, server_peer_id=peer, client_peer_id=CLIENT, window=window) == []
    cases = [
        (dict(request_id="far", started_at=1e300, ended_at=1e300), "times outside the request's"),
        (dict(request_id="early", started_at=10.0, ended_at=11.0), "times outside the request's"),
        (dict(request_id="nan", started_at=float("nan"), ended_at=float("nan")), "times not finite"),
        (dict(request_id="inf", ended_at=float("inf")), "times not finite"),
        (dict(request_id="cost", price_output=float("nan")), "price or cost negative or not a number"),
    ]
    with Ledger(tmp_path / "ledger.sqlite") as ledger:
        for kw, problem in cases:
            r = receipt(server, **kw)
            problems = verify_receipt(r, server_peer_id=peer, client_peer_id=CLIENT, window=window)
            assert problem in problems, (kw, problems)
            assert ledger.record(CONSUMED, r, flagged=True, flag_reason="; ".join(problems)), kw
        kept = {e.receipt.request_id: e for e in ledger.entries()}
        assert set(kept) == {"far", "early", "nan", "inf", "cost"} and all(e.flagged for e in kept.values())
        assert kept["nan"].receipt.signature == receipt(server, **cases[2][0]).signature  # as the peer signed it
        assert ledger.summary()[0].requests == 5 and ledger.summary()[0].flagged == 5
