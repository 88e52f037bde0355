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
