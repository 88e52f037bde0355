"""The slot a llama.cpp request runs in: pure decisions over what each slot was sent."""

from helexa.runtime.slot_table import SlotTable, common_prefix, render_answer, render_chat

SYSTEM = {"role": "system", "content": "a long system prompt every conversation shares " * 20}


def turn(conversation: list[dict], question: str) -> list[dict]:
    return conversation + [{"role": "user", "content": question}]


def test_common_prefix_counts_the_shared_characters() -> None:
    assert common_prefix("abcdef", "abcxyz") == 3
    assert common_prefix("", "abc") == 0
    assert common_prefix("abc", "abc") == 3
    assert common_prefix("abc", "abcdef") == 3


def test_a_conversation_goes_back_to_its_own_slot_though_another_ran_since() -> None:
    table = SlotTable(2)
    a1 = render_chat(turn([SYSTEM], "document A"))
    b1 = render_chat(turn([SYSTEM], "document B"))
    assert table.choose(a1) == 0
    table.release(0, a1, render_answer("answer A"))
    assert table.choose(b1) == 1  # an empty slot before overwriting A's
    table.release(1, b1, render_answer("answer B"))
    a2 = render_chat(turn(turn([SYSTEM], "document A") + [{"role": "assistant", "content": "answer A"}], "more"))
    assert table.choose(a2) == 0
    table.release(0, a2, render_answer("x"))
    b2 = render_chat(turn(turn([SYSTEM], "document B") + [{"role": "assistant", "content": "answer B"}], "more"))
    assert table.choose(b2) == 1


def test_a_new_conversation_takes_the_least_recently_used_slot_when_none_is_empty() -> None:
    table = SlotTable(2)
    for slot, text in ((0, "conversation A"), (1, "conversation B")):
        assert table.choose(text) == slot
        table.release(slot, text)
    assert table.choose("conversation A, next turn") == 0  # A's slot used: A is now the newest
    table.release(0, "conversation A, next turn")
    assert table.choose("conversation C") == 1  # B's slot is the least recently used


def test_busy_slots_are_never_chosen_and_a_full_table_says_wait() -> None:
    table = SlotTable(2)
    assert table.choose("A") == 0
    assert table.choose("A and more") == 1  # A's slot is busy: the other one
    assert table.choose("B") is None
    table.release(1, "A and more")
    assert table.choose("B") == 1


def test_a_request_that_failed_leaves_its_slot_empty_and_an_edited_turn_goes_elsewhere() -> None:
    table = SlotTable(2)
    assert table.choose("system, question one") == 0
    table.release(0, "")  # failed before running: nothing known to be cached
    assert table.choose("another") == 0  # empty again: the first empty slot
    table.release(0, "system, question one")
    # A prompt that does not repeat the slot's whole last prompt (an edited turn) is not a
    # continuation there: it takes the empty slot rather than overwrite.
    assert table.choose("system, question 2") == 1


def test_tools_and_messages_render_so_that_a_next_turn_extends_the_last() -> None:
    tools = [{"type": "function", "function": {"name": "f"}}]
    first = [SYSTEM, {"role": "user", "content": [{"type": "text", "text": "hi"}]}]
    rendered = render_chat(first, tools)
    nxt = render_chat(first + [{"role": "assistant", "content": "hello"}, {"role": "user", "content": "and?"}], tools)
    assert nxt.startswith(rendered + render_answer("hello"))


def test_an_embedding_borrows_a_slot_never_used_first_and_gives_it_back_as_it_was() -> None:
    table = SlotTable(2)
    a1 = render_chat(turn([SYSTEM], "document A"))
    assert table.choose(a1) == 0
    table.release(0, a1, render_answer("answer A"))
    assert table.borrow() == 1  # never used: llama.cpp's least recently used
    a2 = render_chat(turn(turn([SYSTEM], "document A") + [{"role": "assistant", "content": "answer A"}], "more"))
    assert table.choose(a2) == 0  # the conversation goes on in its own slot meanwhile
    assert table.choose("another") is None  # every slot is busy: a generation waits
    table.give_back(1, kept=True)
    assert table.holding()[1] == 0 and table.choose("another") == 1


def test_an_embedding_takes_the_least_recently_used_slot_and_without_the_prompt_cache_empties_it() -> None:
    table = SlotTable(2)
    for slot, text in ((0, "conversation A"), (1, "conversation B")):
        assert table.choose(text) == slot
        table.release(slot, text)
    assert table.borrow() == 0
    table.give_back(0, kept=True)
    assert table.holding() == [len("conversation A"), len("conversation B")]  # restored by llama.cpp
    assert table.borrow() == 1  # slot 0 was used last now
    table.give_back(1, kept=False)
    assert table.holding() == [len("conversation A"), 0]
    assert table.choose("conversation C") == 1  # an empty slot before overwriting A's
    assert table.borrow() == 0 and table.borrow() is None


# --- cache scopes: one tenant never reuses a prefix computed for another ------------------

DOCUMENT = render_chat(turn([SYSTEM], "a confidential document " * 10))


def test_another_scopes_slot_is_no_continuation_and_its_prefix_is_not_reused() -> None:
    table = SlotTable(1, saves=False)
    assert table.choose(DOCUMENT, "b") == 0 and table.reuses(0)  # an empty slot: nothing to reuse
    table.release(0, DOCUMENT, render_answer("answer"))
    assert table.choose(DOCUMENT, "a") == 0  # the only slot, filled by b
    assert table.fields(0) == {"id_slot": 0, "cache_prompt": False}  # llama.cpp computes it all afresh
    table.release(0, DOCUMENT, render_answer("answer"))
    assert table.choose(DOCUMENT, "a") == 0 and table.fields(0) == {"id_slot": 0}  # a's own now: reused
    table.release(0, DOCUMENT, render_answer("answer"))
    assert table.choose(DOCUMENT, "b") == 0 and not table.reuses(0)


def test_a_conversation_goes_back_to_its_scopes_slot_never_to_another_scopes_copy_of_its_prompt() -> None:
    table = SlotTable(2, saves=False)
    assert table.choose(DOCUMENT, "b") == 0
    table.release(0, DOCUMENT, render_answer("answer"))
    assert table.choose(DOCUMENT, "a") == 1 and table.reuses(1)  # the empty slot, not b's
    table.release(1, DOCUMENT, render_answer("answer"))
    for scope, slot in (("b", 0), ("a", 1)):  # each scope's next turn finds its own prefix
        nxt = render_chat(turn(turn([SYSTEM], "a confidential document " * 10)
                               + [{"role": "assistant", "content": "answer"}], "more"))
        assert table.choose(nxt, scope) == slot and table.fields(slot) == {"id_slot": slot}
        table.release(slot, nxt)


def test_with_the_prompt_cache_a_state_another_scope_left_anywhere_forbids_reuse_where_it_shares_more() -> None:
    # llama.cpp saves a slot's state when a request takes the slot, and hands a request the
    # saved state sharing more of its prompt than its slot does, whoever computed it.
    table = SlotTable(1)
    assert table.choose(DOCUMENT, "b") == 0
    table.release(0, DOCUMENT, render_answer("answer"))
    own = render_chat(turn([SYSTEM], "a's own question"))
    assert table.choose(own, "a") == 0 and not table.reuses(0)  # b's slot (b's state is saved now)
    table.release(0, own, render_answer("hi"))
    assert table.choose(DOCUMENT, "a") == 0  # a's slot shares the system prompt; b's saved state all of it
    assert table.fields(0) == {"id_slot": 0, "cache_prompt": False}
    table.release(0, DOCUMENT, render_answer("answer"))
    nxt = render_chat(turn(turn([SYSTEM], "a confidential document " * 10)
                           + [{"role": "assistant", "content": "answer"}], "more"))
    assert table.choose(nxt, "a") == 0 and table.reuses(0)  # a's own turn shares more than b's state


def test_a_scope_repeating_its_prompt_reuses_it_though_another_scope_holds_the_same() -> None:
    table = SlotTable(2)
    for scope, slot in (("b", 0), ("a", 1)):
        assert table.choose(DOCUMENT, scope) == slot and not (scope == "a" and table.reuses(slot))
        table.release(slot, DOCUMENT, render_answer("answer"))
    assert table.choose(DOCUMENT, "b") == 0 and table.reuses(0)  # nothing can share more than all of it
    assert table.choose(DOCUMENT, "a") == 1 and table.reuses(1)


def test_without_slot_affinity_a_request_reuses_only_while_every_state_is_its_scopes() -> None:
    table = SlotTable(2, pinned=False)
    assert table.choose(DOCUMENT, "b") == 0 and table.fields(0) == {}
    table.release(0, DOCUMENT)
    assert table.choose(DOCUMENT, "b") == 0 and table.reuses(0)
    table.release(0, DOCUMENT)
    assert table.choose("other", "a") == 1 and table.fields(1) == {"cache_prompt": False}


def test_a_failed_request_or_an_embedding_leaves_its_slot_reusable_by_no_scope() -> None:
    table = SlotTable(2, saves=False)
    assert table.choose(DOCUMENT, "b") == 0
    table.release(0, "")  # failed: llama.cpp may still hold what it held
    assert table.choose(DOCUMENT, "b") == 0 and not table.reuses(0)
    table.release(0, DOCUMENT)
    assert table.borrow() == 1
    table.give_back(1, kept=False, inputs=[DOCUMENT])
    assert table.choose(DOCUMENT, "a") == 1 and not table.reuses(1)  # the embedding's text is no one's


def test_an_embedded_text_may_be_in_the_prompt_cache_and_no_prompt_sharing_more_with_it_reuses() -> None:
    table = SlotTable(1)
    assert table.choose("a's conversation", "a") == 0
    table.release(0, "a's conversation")
    assert table.borrow() == 0
    table.give_back(0, kept=True, inputs=[DOCUMENT])  # llama.cpp restores a's conversation from its cache
    assert table.choose("a's conversation goes on", "a") == 0 and table.reuses(0)
    table.release(0, "a's conversation goes on")
    assert table.choose(DOCUMENT + " and a question", "a") == 0 and not table.reuses(0)


def test_a_fresh_server_forgets_every_slot_and_saved_state() -> None:
    table = SlotTable(1)
    assert table.choose(DOCUMENT, "b") == 0
    table.release(0, DOCUMENT)
    assert table.choose("x", "a") == 0
    table.release(0, "x")
    table.clear()
    assert table.holding() == [0] and table.choose(DOCUMENT, "a") == 0 and table.reuses(0)


def test_the_saved_states_answer_as_a_scan_of_every_state_saved_would() -> None:
    import random

    from helexa.runtime.slot_table import _SavedStates

    rng = random.Random(7)
    saved, every = _SavedStates(), []
    for _ in range(2000):
        text = "".join(rng.choice("ab") for _ in range(rng.randint(1, 12)))
        scope = rng.choice("xyz")
        saved.add(scope, text)
        every.append((scope, text))
        head = "".join(rng.choice("ab") for _ in range(rng.randint(1, 6)))
        asker = rng.choice("xyz")
        assert saved.foreign(head, asker) == any(s != asker and t.startswith(head) for s, t in every)
    assert len(saved._sorted) < len(set(every))  # a state its scope extended was dropped
    assert saved.only("x") is False and _SavedStates().only("x")
