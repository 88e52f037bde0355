"""The wire of earlier releases, for the tests that speak with one: a release's field lists
per frame kind (``tests/fixtures/wire_DATE.json``, :func:`kinds_of`) and a decoder that
refuses a frame as that release did, for a field it does not know (:func:`strict`)."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import msgpack

from helexa.protocol import DecodeError

FIXTURES = Path(__file__).resolve().parent / "fixtures"


def kinds_of(release: str) -> dict[str, list[str]]:
    """The fields of each frame kind in the release of ``release`` (its date)."""
    return json.loads((FIXTURES / f"wire_{release}.json").read_text())["kinds"]


def strict(decode: Callable[..., Any], kinds: dict[str, list[str]]) -> Callable[..., Any]:
    """``decode``, refusing first (:class:`DecodeError`) a frame of a kind in ``kinds`` that
    carries a field its list does not hold."""

    def strict_decode(data: bytes, **kw: Any) -> Any:
        body = msgpack.unpackb(data, raw=False)
        if isinstance(body, dict) and body.get("k") in kinds:
            extra = sorted(set(body) - {"k", "v"} - set(kinds[body["k"]]))
            if extra:
                raise DecodeError(f"{body['k']}: unknown field(s) {extra}")
        return decode(data, **kw)

    return strict_decode
