"""Anthropic's model list pages, sans-IO."""

from __future__ import annotations

import pytest

from helexa.roles.cortex.anthropic_models import model_object, model_page, speaks_anthropic
from helexa.roles.cortex.errors import BadRequest

ENTRIES = [{"id": f"m{i}", "object": "model", "created": 0} for i in range(5)]


def ids(page: dict) -> list[str]:
    return [m["id"] for m in page["data"]]


def test_pages_walk_forward_by_after_id_and_back_by_before_id() -> None:
    first = model_page(ENTRIES, {"limit": "2"})
    assert ids(first) == ["m0", "m1"] and first["has_more"] and (first["first_id"], first["last_id"]) == ("m0", "m1")
    second = model_page(ENTRIES, {"limit": "2", "after_id": "m1"})
    assert ids(second) == ["m2", "m3"] and second["has_more"]
    last = model_page(ENTRIES, {"limit": "2", "after_id": "m3"})
    assert ids(last) == ["m4"] and not last["has_more"]
    back = model_page(ENTRIES, {"limit": "2", "before_id": "m4"})
    assert ids(back) == ["m2", "m3"] and back["has_more"]
    assert not model_page(ENTRIES, {"limit": "2", "before_id": "m2"})["has_more"]
    empty = model_page(ENTRIES, {"after_id": "m4"})
    assert empty == {"data": [], "has_more": False, "first_id": None, "last_id": None}


@pytest.mark.parametrize("query, param", [
    ({"limit": "0"}, "limit"), ({"limit": "1001"}, "limit"), ({"limit": "x"}, "limit"),
    ({"after_id": "nope"}, "after_id"), ({"before_id": "nope"}, "before_id"),
    ({"after_id": "m1", "before_id": "m3"}, "before_id"),
])
def test_a_bad_parameter_is_a_400_naming_it(query: dict, param: str) -> None:
    with pytest.raises(BadRequest) as err:
        model_page(ENTRIES, query)
    assert err.value.param == param


def test_a_model_is_anthropics_model_info() -> None:
    assert model_object({"id": "chat", "created": 86400}) == {
        "type": "model", "id": "chat", "display_name": "chat", "created_at": "1970-01-02T00:00:00Z",
        "lifecycle": "active"}


def test_anthropics_clients_are_told_by_their_headers() -> None:
    assert speaks_anthropic([(b"anthropic-version", b"2023-06-01")])
    assert speaks_anthropic([(b"x-api-key", b"k")])
    assert not speaks_anthropic([(b"authorization", b"Bearer k")])
