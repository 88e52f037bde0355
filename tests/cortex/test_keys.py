"""API keys: their shape, their hash, and authentication against the key ring."""

from __future__ import annotations

import base64
import dataclasses
import hashlib

import pytest

from helexa.roles.cortex.errors import Unauthorized
from helexa.roles.cortex.portal import keys
from helexa.roles.cortex.portal.keys import Keyring
from helexa.roles.cortex.portal.quota import Limits


def test_a_key_is_prefixed_carries_its_id_and_256_random_bits() -> None:
    secret, key = keys.create("acme", "ci", limits=Limits(rpm=5), now=100.0)
    assert secret.startswith("sk-hlx-") and keys.key_id_of(secret) == key.key_id
    random_part = secret[len("sk-hlx-") + 17:]  # after the 16-digit id and "_"
    assert len(base64.urlsafe_b64decode(random_part + "=")) == 32
    assert key.digest == hashlib.sha256(secret.encode()).digest()
    assert secret not in repr(key) and key.digest.hex() not in repr(key)
    assert "digest" not in key.public(100.0)
    other, _ = keys.create("acme", "ci", limits=Limits(), now=100.0)
    assert other != secret


@pytest.mark.parametrize("presented", [
    "", "sk-hlx-", "sk-hlx-0123456789abcdef", "sk-other-0123456789abcdef_" + "A" * 43,
    "sk-hlx-0123456789ABCDEF_" + "A" * 43, "sk-hlx-0123456789abcdef-" + "A" * 43,
    "sk-hlx-0123456789abcdef_" + "A" * 42 + "!", "sk-hlx-0123456789abcdef_" + "A" * 44,
])
def test_anything_not_shaped_like_a_key_has_no_key_id(presented) -> None:
    assert keys.key_id_of(presented) is None


def test_authentication_refuses_wrong_revoked_expired_and_foreign_keys() -> None:
    secret, key = keys.create("acme", "ci", limits=Limits(), now=100.0, expires_at=200.0)
    ring = Keyring([key])
    assert ring.authenticate("acme", secret, 150.0) is key
    forged = secret[:-1] + ("A" if secret[-1] != "A" else "B")
    cases = {
        "no key": (None, "acme", 150.0),
        "garbage": ("hello", "acme", 150.0),
        "wrong secret for the id": (forged, "acme", 150.0),
        "other portal": (secret, "beta", 150.0),
        "expired": (secret, "acme", 200.0),
    }
    for why, (presented, portal, now) in cases.items():
        with pytest.raises(Unauthorized) as err:
            ring.authenticate(portal, presented, now)
        assert err.value.status == 401, why
        assert secret not in str(err.value) and (forged not in str(err.value)), why
    ring.put(dataclasses.replace(key, revoked_at=120.0))
    with pytest.raises(Unauthorized, match="revoked"):
        ring.authenticate("acme", secret, 150.0)


def test_rotation_keeps_the_id_and_stops_the_old_secret() -> None:
    old, key = keys.create("acme", "ci", limits=Limits(), now=1.0)
    new, rotated = keys.rotate(key)
    assert rotated.key_id == key.key_id and keys.key_id_of(new) == key.key_id and new != old
    ring = Keyring([rotated])
    assert ring.authenticate("acme", new, 2.0) is rotated
    with pytest.raises(Unauthorized):
        ring.authenticate("acme", old, 2.0)
