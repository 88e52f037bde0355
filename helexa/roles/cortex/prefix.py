"""Where a prompt's prefix is most likely cached: block hashes of what the cortex sent where.

An engine such as llama.cpp keeps the KV cache of a slot's last prompt (and a host-memory
cache of earlier ones) and reuses its longest common prefix with the next prompt, so a
conversation's next turn costs only its new tokens on the neuron that served the last one,
and its whole history anywhere else. The cortex cannot see those caches, but it knows what
it sent where: :func:`prompt_blocks` cuts the rendered prompt (no tokenizer needed) into
fixed-size blocks and hashes them as a chain, so a block's hash stands for the whole prefix
up to it; :class:`PrefixIndex` remembers, per neuron and model, the chains it was given
(bounded, least recently used first out, the earliest blocks of a chain last) and answers
how many leading blocks of a new prompt each neuron holds. A chain starts from the
request's cache scope (:mod:`.cache_scope`), so the same prompt of two tenants is two chains:
routing never follows, and so never reveals, another tenant's cached prefix.

Session affinity is the simpler mode beside it: a request naming a session (the
``x-session-id`` header, or OpenAI's ``user`` field) goes back where that session last
went. :func:`session_of` reads it at the edge.

Everything here is pure: no clock, no I/O.
"""

from __future__ import annotations

import hashlib
from collections import OrderedDict
from collections.abc import Callable, Iterable, Mapping
from typing import Any

from helexa.protocol import GenerateRequest

_SEP = "\x1e"
MAX_SESSION_CHARS = 256


def render(request: GenerateRequest) -> str:
    """The text the prefix index hashes: a completion's prompt, or a chat's messages, each
    as ``role``, a newline, its text (and tool calls), then a record separator. Two
    requests whose first messages are equal render to text with an equal prefix."""
    if request.prompt is not None:
        return request.prompt
    return "".join(render_message(m) for m in request.messages)


def render_message(message: Any) -> str:
    """One chat message as :func:`render` writes it (an answer appended to a conversation
    renders as the next turn's copy of it will)."""
    if not isinstance(message, dict):
        return _SEP
    content = message.get("content")
    if isinstance(content, list):
        parts = []
        for part in content:
            if isinstance(part, dict):
                text = part.get("text")
                if isinstance(text, str):
                    parts.append(text)
                elif isinstance(part.get("image_url"), dict):
                    parts.append(f"<image {part['image_url'].get('url', '')}>")
        text = "".join(parts)
    else:
        text = content if isinstance(content, str) else ""
    calls = message.get("tool_calls")
    tail = repr(calls) if calls else ""
    return f"{message.get('role', '')}\n{text}{tail}{_SEP}"


def chain(text: str, block_chars: int, *, start: bytes = b"") -> tuple[bytes, ...]:
    """Hashes of the whole ``block_chars`` blocks of ``text``, each over the one before it
    (a trailing partial block is left out: the next turn extends it)."""
    out = []
    previous = start
    step = max(1, block_chars)
    for i in range(0, len(text) - step + 1, step):
        previous = hashlib.blake2b(previous + text[i:i + step].encode("utf-8", "surrogatepass"),
                                   digest_size=8).digest()
        out.append(previous)
    return tuple(out)


def prompt_blocks(request: GenerateRequest, block_chars: int) -> tuple[bytes, ...]:
    """The block chain of ``request``'s rendered prompt (see :func:`chain`), from its scope."""
    return chain(render(request), block_chars, start=request.cache_scope.encode())


def answered_blocks(request: GenerateRequest, answer: str, block_chars: int, *,
                    prompt: Prompt | None = None) -> tuple[bytes, ...]:
    """The block chain of ``request`` followed by its answer, as the next turn of the same
    conversation will render it (a chat's answer as an assistant message; a completion's
    appended to its prompt). ``prompt``: the request's :class:`Prompt` at the same
    ``block_chars``, when the caller has it: then only what follows its last whole block is
    hashed, not the whole conversation again."""
    more = answer if request.prompt is not None else render_message({"role": "assistant", "content": answer})
    if prompt is None:
        return chain(render(request) + more, block_chars, start=request.cache_scope.encode())
    blocks = prompt.blocks
    step = max(1, block_chars)
    start = blocks[-1] if blocks else request.cache_scope.encode()
    return blocks + chain(prompt.text[len(blocks) * step:] + more, block_chars, start=start)


class Prompt:
    """A request's rendered prompt (:func:`render`) and its block chain (:func:`chain`),
    kept together so that the answer's chain can start where the prompt's ended."""

    __slots__ = ("text", "blocks")

    def __init__(self, request: GenerateRequest, block_chars: int) -> None:
        self.text = render(request)
        self.blocks = chain(self.text, block_chars, start=request.cache_scope.encode())


def session_of(headers: Iterable[tuple[bytes, bytes]], body: Any = None) -> str | None:
    """The session a request names: its ``x-session-id`` header, else the body's ``user``
    field (OpenAI's end-user id), else None. Over-long values are cut, never refused."""
    for name, value in headers:
        if name.lower() == b"x-session-id" and value:
            return value.decode("latin-1")[:MAX_SESSION_CHARS]
    user = getattr(body, "user", None)  # a typed field, or kept among a lenient model's extras
    if user is None and isinstance(extra := getattr(body, "model_extra", None), dict):
        user = extra.get("user")
    if isinstance(user, str) and user:
        return "user:" + user[:MAX_SESSION_CHARS]
    return None


class PrefixIndex:
    """What each neuron was sent, per model, as block hashes (see the module docstring).

    Args:
        capacity: blocks remembered per (neuron, model); the least recently used go first.
        sessions: sessions remembered (least recently used go first).
        slots: a model's slots per neuron (0: unknown). A neuron's engine caches one prompt
            per slot (``llama_cpp`` puts a conversation back in its own slot, else in an
            empty one, else in the least recently used), so for such a model the index
            keeps, per neuron, the last ``slots`` prompt chains the same way: a prompt that
            extends a chain replaces it, any other pushes out the least recently used.
            :meth:`room` then says where a new conversation pushes out no other one.
    """

    def __init__(self, capacity: int = 8192, sessions: int = 65536,
                 slots: Callable[[str], int] | None = None) -> None:
        self.capacity = capacity
        self.session_capacity = sessions
        self._slots = slots or (lambda model_id: 0)
        self._blocks: dict[tuple[str, str], OrderedDict[bytes, None]] = {}
        self._chains: dict[tuple[str, str], OrderedDict[tuple[bytes, ...], None]] = {}
        self._sessions: OrderedDict[tuple[str, str], str] = OrderedDict()

    def record(self, node_id: str, model_id: str, blocks: tuple[bytes, ...], session: str | None = None) -> None:
        """``node_id`` was sent (or generated) ``blocks`` of ``model_id``: it now holds them."""
        if session is not None:
            key = (model_id, session)
            self._sessions[key] = node_id
            self._sessions.move_to_end(key)
            while len(self._sessions) > self.session_capacity:
                self._sessions.popitem(last=False)
        if not blocks or self.capacity <= 0:
            return
        if (slots := self._slots(model_id)) > 0:
            chains = self._chains.setdefault((node_id, model_id), OrderedDict())
            for held_chain in [c for c in chains if _extends(blocks, c)]:
                del chains[held_chain]  # the same conversation, in the same slot
            chains[blocks[:self.capacity]] = None
            while len(chains) > slots:
                chains.popitem(last=False)
            return
        held = self._blocks.setdefault((node_id, model_id), OrderedDict())
        # Newest last, and a chain's first blocks touched last of all: a shared prefix (a
        # system prompt) outlives the tails that hang off it.
        for h in reversed(blocks):
            held[h] = None
            held.move_to_end(h)
        while len(held) > self.capacity:
            held.popitem(last=False)

    def matches(self, model_id: str, blocks: tuple[bytes, ...], node_ids: Iterable[str]) -> dict[str, int]:
        """How many leading blocks of ``blocks`` each of ``node_ids`` holds (0 when none)."""
        out = {}
        if self._slots(model_id) > 0:
            for node_id in node_ids:
                chains = self._chains.get((node_id, model_id)) or ()
                out[node_id] = max((_common(c, blocks) for c in chains), default=0)
            return out
        for node_id in node_ids:
            held = self._blocks.get((node_id, model_id))
            n = 0
            if held:
                for h in blocks:
                    if h not in held:
                        break
                    n += 1
            out[node_id] = n
        return out

    def room(self, model_id: str, blocks: tuple[bytes, ...], node_ids: Iterable[str]) -> dict[str, bool]:
        """Whether sending ``blocks`` to each of ``node_ids`` keeps every other conversation
        cached there: it goes on with a chain held there, or a slot is free (always True
        for a model whose slots are unknown)."""
        slots = self._slots(model_id)
        out = {}
        for node_id in node_ids:
            chains = self._chains.get((node_id, model_id)) or ()
            out[node_id] = slots <= 0 or len(chains) < slots or any(_extends(blocks, c) for c in chains)
        return out

    def session_node(self, model_id: str, session: str | None) -> str | None:
        """Where ``session`` last went for ``model_id`` (None: nowhere known)."""
        if session is None:
            return None
        return self._sessions.get((model_id, session))

    def forget(self, node_id: str, model_id: str | None = None) -> None:
        """The neuron dropped its cache of ``model_id`` (unloaded), or of everything (left)."""
        for key in [k for k in self._blocks if k[0] == node_id and (model_id is None or k[1] == model_id)]:
            del self._blocks[key]
        for key in [k for k in self._chains if k[0] == node_id and (model_id is None or k[1] == model_id)]:
            del self._chains[key]
        for key in [k for k, n in self._sessions.items() if n == node_id and (model_id is None or k[0] == model_id)]:
            del self._sessions[key]

    def held(self) -> Mapping[tuple[str, str], int]:
        """Blocks remembered per (neuron, model)."""
        return {**{k: len(v) for k, v in self._blocks.items()},
                **{k: len({b for c in v for b in c}) for k, v in self._chains.items()}}


def _extends(chain: tuple[bytes, ...], head: tuple[bytes, ...]) -> bool:
    """``chain`` starts with the whole of ``head``."""
    return len(head) <= len(chain) and chain[:len(head)] == head


def _common(a: tuple[bytes, ...], b: tuple[bytes, ...]) -> int:
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n
