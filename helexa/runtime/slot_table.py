"""Which llama.cpp slot a request should run in, so that a conversation finds its prefix.

llama.cpp keeps, per slot, the KV cache of the last prompt it ran (and the answer it
generated) and reuses the longest common prefix with the next prompt that slot gets. Left
to itself, the server gives a request the idle slot whose cached prompt is most *similar*
(above ``slot_prompt_similarity``), else the least recently used one. Conversations that
share a long system prompt are all similar, so under light load every request lands on
the slot used last: each conversation overwrites the one before it and the other slots
stay empty (measured with SmolLM2 and 2 slots: the second turn of a conversation
prefilled 134 tokens after another conversation's turn, 15 when sent back to its own slot).

:class:`SlotTable` chooses the slot itself (the request's ``id_slot``), from what it sent
to each slot:

1. an idle slot whose whole last prompt the new prompt repeats (the conversation goes on
   there), the longest such;
2. else an empty idle slot (spare cache: nothing is lost);
3. else the least recently used idle slot.

It is pure: the backend renders the prompt to text (:func:`render_chat`), asks
:meth:`~SlotTable.choose` (None: every slot is busy, wait), and tells
:meth:`~SlotTable.release` what the slot holds afterwards.

Embeddings take a slot too, but llama.cpp chooses it itself (it ignores ``id_slot`` for
them: by prompt similarity, else the least recently used idle slot). :meth:`~SlotTable.borrow`
marks busy the slot it most likely takes (the least recently used idle one), so that no
generation is sent to wait behind it while another slot is free, and
:meth:`~SlotTable.give_back` returns it, with what it held (llama.cpp's host-memory prompt
cache saves and restores the conversation's state) or emptied (that cache off).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

__all__ = ["SlotTable", "common_prefix", "render_chat"]

_SEP = "\x1e"


def render_chat(messages: Any, tools: Any = None) -> str:
    """A chat body's prompt as text whose prefixes follow the prompt's: each message's
    role and text in order (tools first: a template puts them before the messages)."""
    out = [json.dumps(tools, sort_keys=True) + _SEP] if tools else []
    for m in messages or ():
        out.append(render_answer(m.get("content"), m.get("role", "")) if isinstance(m, dict) else _SEP)
        if isinstance(m, dict) and m.get("tool_calls"):
            out[-1] = out[-1][:-1] + json.dumps(m["tool_calls"], sort_keys=True) + _SEP
    return "".join(out)


def render_answer(content: Any, role: str = "assistant") -> str:
    """One message as :func:`render_chat` writes it (an answer, as the next turn repeats it)."""
    if isinstance(content, list):
        content = "".join(p.get("text", "") for p in content if isinstance(p, dict) and isinstance(p.get("text"), str))
    return f"{role}\n{content if isinstance(content, str) else ''}{_SEP}"


def common_prefix(a: str, b: str) -> int:
    """Length of the longest common prefix of ``a`` and ``b`` (slice comparisons, in C)."""
    lo, hi = 0, min(len(a), len(b))
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if a[:mid] == b[:mid]:
            lo = mid
        else:
            hi = mid - 1
    return lo


@dataclass(slots=True)
class _Slot:
    held: str = ""  # what its cache holds: the last prompt, then its answer
    prompt: int = 0  # characters of ``held`` that were prompt (the next turn repeats them)
    used: int = -1  # when it was last chosen (a counter): least recently used goes first
    busy: bool = False


class SlotTable:
    """The slots of one loaded model (see the module docstring)."""

    def __init__(self, slots: int) -> None:
        self._slots = [_Slot() for _ in range(max(1, slots))]
        self._clock = 0

    def choose(self, prompt: str) -> int | None:
        """Mark the best idle slot for ``prompt`` busy and return its id; None when all are busy."""
        idle = [i for i, s in enumerate(self._slots) if not s.busy]
        if not idle:
            return None
        best: tuple[int, int] | None = None  # (characters shared, slot)
        for i in idle:
            s = self._slots[i]
            if s.prompt and (shared := common_prefix(s.held, prompt)) >= s.prompt:
                if best is None or shared > best[0]:
                    best = (shared, i)
        if best is not None:
            chosen = best[1]
        else:
            empty = [i for i in idle if not self._slots[i].held]
            chosen = empty[0] if empty else min(idle, key=lambda i: self._slots[i].used)
        self._clock += 1
        slot = self._slots[chosen]
        slot.busy, slot.used = True, self._clock
        return chosen

    def release(self, slot_id: int, prompt: str, answer: str = "") -> None:
        """The request in ``slot_id`` ended: the slot holds ``prompt`` then ``answer`` (an
        answer cut short leaves what was generated; a request that failed before running,
        pass ``prompt=""``: nothing is known to be cached)."""
        slot = self._slots[slot_id]
        slot.busy = False
        slot.held, slot.prompt = prompt + answer, len(prompt)

    def borrow(self) -> int | None:
        """Mark busy the idle slot llama.cpp gives a request that names none (an embedding):
        the least recently used (one never used first); None when all are busy."""
        idle = [i for i, s in enumerate(self._slots) if not s.busy]
        if not idle:
            return None
        chosen = min(idle, key=lambda i: self._slots[i].used)
        self._clock += 1
        slot = self._slots[chosen]
        slot.busy, slot.used = True, self._clock
        return chosen

    def give_back(self, slot_id: int, *, kept: bool) -> None:
        """The embedding in ``slot_id`` ended; ``kept``: the slot still holds what it held
        (restored from llama.cpp's prompt cache), else it holds nothing known."""
        slot = self._slots[slot_id]
        slot.busy = False
        if not kept:
            slot.held, slot.prompt = "", 0

    def holding(self) -> list[int]:
        """Characters each slot is known to hold (for logs and tests)."""
        return [len(s.held) for s in self._slots]
