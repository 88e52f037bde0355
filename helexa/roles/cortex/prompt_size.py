"""What a prompt can cost at most, from its size alone (pure): the bound the portals
reserve against and the one a peer's reported usage is held to."""

from __future__ import annotations

import json

from helexa.protocol import GenerateRequest

MESSAGE_ALLOWANCE = 8
"""Tokens a chat template may add per message (role markers, separators)."""
PROMPT_ALLOWANCE = 16
"""Tokens a template may add once (the assistant's turn, a BOS token)."""


def prompt_bytes(request: GenerateRequest) -> tuple[int, int]:
    """``(UTF-8 bytes of the prompt, messages)``: text parts counted as text, anything else
    (images, tool calls) as its JSON; the tools offered (``tools``, or ``extra["tools"]``
    from older cortexes) and a structured-output schema count too, as their JSON."""
    if request.prompt is not None:
        return len(request.prompt.encode()), 1
    total = 0
    for m in request.messages:
        for name, value in m.items():
            if isinstance(value, str):
                total += len(value.encode())
            elif name == "content" and isinstance(value, list):
                for part in value:
                    text = part.get("text") if isinstance(part, dict) else None
                    total += len(text.encode()) if isinstance(text, str) else len(json.dumps(part).encode())
            elif value is not None:
                total += len(json.dumps(value).encode())
    # Tools are rendered into the prompt by the chat template; a schema may be too.
    for tool in request.tools:
        total += len(json.dumps([tool.name, tool.description, tool.parameters]).encode())
    if request.response_format is not None and request.response_format.schema is not None:
        total += len(json.dumps(request.response_format.schema).encode())
    tools = request.extra.get("tools")  # where older cortexes sent them
    if tools:
        total += len(json.dumps(tools).encode())
    return total, len(request.messages)


def prompt_upper_bound(request: GenerateRequest) -> int:
    """The prompt's tokens at most, as the portals reserve them: an exact count where the
    edge made one, else its bytes (a tokenizer makes at most about one token per byte)
    plus the template's allowances."""
    size, messages = prompt_bytes(request)
    return request.prompt_tokens or size + MESSAGE_ALLOWANCE * messages + PROMPT_ALLOWANCE
