"""The prefix index: block chains of rendered prompts, and where each neuron's cache likely is."""

from __future__ import annotations

from types import SimpleNamespace

from helexa.protocol import GenerateRequest, Task
from helexa.roles.cortex.prefix import PrefixIndex, answered_blocks, chain, prompt_blocks, session_of

SYSTEM = {"role": "system", "content": "You are terse. " * 40}


def chat(*messages: dict) -> GenerateRequest:
    return GenerateRequest("r", "m", Task.CHAT, messages=messages)


def test_equal_prefixes_give_equal_leading_blocks_and_a_block_stands_for_all_before_it() -> None:
    a = chain("x" * 100 + "abc" * 50, 32)
    b = chain("x" * 100 + "xyz" * 50, 32)
    assert len(a) == len(b) == 7  # 250 characters: seven whole blocks of 32, the rest left out
    assert a[:3] == b[:3] and a[3] != b[3]
    assert chain("y" + "x" * 99, 32)[2] != chain("x" * 100, 32)[2]  # chained: the first block counts


def test_a_conversations_next_turn_extends_the_chain_its_answer_left() -> None:
    turn1 = chat(SYSTEM, {"role": "user", "content": "What is 2+2? Explain at length please."})
    after = answered_blocks(turn1, "It is four, because two and two make four.", 16)
    turn2 = chat(*turn1.messages, {"role": "assistant", "content": "It is four, because two and two make four."},
                 {"role": "user", "content": "And what is 3+3, then? Tell me."})
    blocks2 = prompt_blocks(turn2, 16)
    assert blocks2[:len(after)] == after and len(blocks2) > len(after)


def test_matches_count_the_leading_blocks_each_neuron_holds() -> None:
    index = PrefixIndex()
    shared = chat(SYSTEM, {"role": "user", "content": "one " * 40})
    other = chat(SYSTEM, {"role": "user", "content": "two " * 40})
    index.record("n1", "m", prompt_blocks(shared, 32))
    index.record("n2", "m", prompt_blocks(other, 32))
    blocks = prompt_blocks(shared, 32)
    got = index.matches("m", blocks, ["n1", "n2", "n3"])
    assert got["n1"] == len(blocks) and 0 < got["n2"] < len(blocks) and got["n3"] == 0
    assert index.matches("other-model", blocks, ["n1"]) == {"n1": 0}


def test_the_index_is_bounded_and_keeps_a_shared_prefix_longest() -> None:
    index = PrefixIndex(capacity=10)
    system = chain("s" * 64, 16)  # 4 blocks every conversation shares
    for i in range(5):
        index.record("n1", "m", chain("s" * 64 + str(i) * 64, 16))
    assert index.held()[("n1", "m")] == 10
    assert index.matches("m", system, ["n1"])["n1"] == 4


def test_forgetting_a_model_or_a_neuron() -> None:
    index = PrefixIndex()
    blocks = chain("q" * 64, 16)
    index.record("n1", "a", blocks, session="s1")
    index.record("n1", "b", blocks)
    index.record("n2", "a", blocks)
    index.forget("n1", "a")
    assert index.matches("a", blocks, ["n1", "n2"]) == {"n1": 0, "n2": 4}
    assert index.session_node("a", "s1") is None
    index.forget("n1")
    assert index.matches("b", blocks, ["n1"]) == {"n1": 0}


def test_sessions_remember_where_they_went_last() -> None:
    index = PrefixIndex(sessions=2)
    index.record("n1", "m", (), session="s1")
    index.record("n2", "m", (), session="s1")
    assert index.session_node("m", "s1") == "n2" and index.session_node("m", None) is None
    index.record("n1", "m", (), session="s2")
    index.record("n1", "m", (), session="s3")
    assert index.session_node("m", "s1") is None  # the least recently used went


def test_the_session_comes_from_the_header_else_the_user_field() -> None:
    body = SimpleNamespace(model_extra={"user": "alice"})
    assert session_of([(b"X-Session-Id", b"abc")], body) == "abc"
    assert session_of([(b"content-type", b"x")], body) == "user:alice"
    assert session_of([], SimpleNamespace(model_extra={})) is None
    assert len(session_of([(b"x-session-id", b"z" * 5000)]) or "") == 256


def test_with_slots_known_a_neuron_holds_the_last_conversations_one_per_slot() -> None:
    index = PrefixIndex(slots=lambda model_id: 2)
    convs = {k: chat(SYSTEM, {"role": "user", "content": f"document {k} " * 30}) for k in "ABC"}
    blocks = {k: prompt_blocks(r, 32) for k, r in convs.items()}
    system_blocks = sum(1 for a, b in zip(blocks["A"], blocks["B"]) if a == b)
    assert 0 < system_blocks < len(blocks["A"])
    index.record("n1", "m", blocks["A"])
    index.record("n1", "m", blocks["B"])
    assert index.matches("m", blocks["A"], ["n1"]) == {"n1": len(blocks["A"])}
    assert index.room("m", blocks["C"], ["n1", "n2"]) == {"n1": False, "n2": True}  # two slots, two conversations
    # A's next turn extends A's chain: it goes on in A's slot, pushing nothing out.
    after = answered_blocks(convs["A"], "an answer " * 10, 32)
    assert index.room("m", after, ["n1"]) == {"n1": True}
    index.record("n1", "m", after)
    assert index.matches("m", blocks["B"], ["n1"]) == {"n1": len(blocks["B"])}  # B is still there
    # A third conversation pushes out the least recently used one (B), keeping A.
    index.record("n1", "m", blocks["C"])
    assert index.matches("m", blocks["B"], ["n1"]) == {"n1": system_blocks}
    assert index.matches("m", after, ["n1"]) == {"n1": len(after)}
    index.forget("n1", "m")
    assert index.matches("m", after, ["n1"]) == {"n1": 0} and index.room("m", after, ["n1"]) == {"n1": True}


def test_an_answers_chain_continued_from_the_prompts_equals_the_whole_chain_hashed_again() -> None:
    """Answered blocks from the kept :class:`Prompt` (hashing only what follows its last
    whole block) are the blocks of the whole conversation rendered and hashed anew, for
    chats and completions, prompts shorter than a block, exactly one block, and longer."""
    import random

    from helexa.roles.cortex.prefix import Prompt

    rng = random.Random(5)
    alphabet = "ab é😀\n\x1e"
    for _ in range(300):
        size = rng.choice([0, 1, 15, 16, 17, 31, 32, 33, 100, 700])
        block = rng.choice([1, 7, 16, 32, 256])
        text = "".join(rng.choice(alphabet) for _ in range(size))
        answer = "".join(rng.choice(alphabet) for _ in range(rng.choice([0, 1, 16, 50])))
        if rng.random() < 0.5:
            request = GenerateRequest("r", "m", Task.COMPLETION, prompt=text)
        else:
            request = GenerateRequest("r", "m", Task.CHAT, messages=(
                {"role": "system", "content": text[:size // 2]}, {"role": "user", "content": text[size // 2:]}))
        prompt = Prompt(request, block)
        assert prompt.blocks == prompt_blocks(request, block)
        assert answered_blocks(request, answer, block, prompt=prompt) == answered_blocks(request, answer, block)


def test_the_same_prompt_of_two_cache_scopes_is_two_chains_and_never_matches_the_other() -> None:
    ask = (SYSTEM, {"role": "user", "content": "a shared document " * 20})
    a = GenerateRequest("r", "m", Task.CHAT, messages=ask, cache_scope="a" * 32)
    b = GenerateRequest("r", "m", Task.CHAT, messages=ask, cache_scope="b" * 32)
    assert not set(prompt_blocks(a, 32)) & set(prompt_blocks(b, 32))
    index = PrefixIndex()
    index.record("n1", "m", answered_blocks(b, "an answer", 32))
    assert index.matches("m", prompt_blocks(b, 32), ["n1"]) == {"n1": len(prompt_blocks(b, 32))}
    assert index.matches("m", prompt_blocks(a, 32), ["n1"]) == {"n1": 0}  # b's cache neither used nor revealed
    slotted = PrefixIndex(slots=lambda model_id: 1)
    slotted.record("n1", "m", prompt_blocks(b, 32))
    assert slotted.matches("m", prompt_blocks(a, 32), ["n1"]) == {"n1": 0}
    assert slotted.room("m", prompt_blocks(a, 32), ["n1"]) == {"n1": False}  # a's request would push b's out
