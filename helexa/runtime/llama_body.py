"""The body of one llama.cpp request, made from a :class:`~helexa.protocol.GenerateRequest`, pure.

A model whose chat template has a tool syntax of its own (llama.cpp's "native" tools) gets
the request as OpenAI shapes it; any other takes tools through :mod:`.tool_grammar` (a
"generic" request: a JSON grammar, read back by :class:`~.llama_stream.LlamaStream`).
llama.cpp parses special tokens in the whole rendered prompt, so the control texts in the
chat's client text (and the tool instructions made of it) are neutralised
(:mod:`helexa.special_text`).
"""

from __future__ import annotations

from dataclasses import replace
from typing import Any

from helexa.protocol import GenerateRequest, Task
from helexa.special_text import ControlTexts

from . import openai_shapes, tool_grammar
from .base import InvalidRequest


def request_body(request: GenerateRequest, control: ControlTexts, *, native_tools: bool) -> tuple[dict[str, Any], bool]:
    """The llama.cpp body, and whether tools go through :mod:`.tool_grammar` (the model's
    template has no tool syntax of its own: ``native_tools`` false).

    Raises :class:`~.base.InvalidRequest` for tools through the grammar with structured output."""
    generic = request.task is Task.CHAT and request.wants_tools and not native_tools
    if not generic:
        if request.tools and not request.wants_tools:
            # tool_choice "none": nothing may be called, so nothing is offered (llama.cpp
            # also refuses logprobs with tools when streaming).
            request = replace(request, tools=(), tool_choice=None)
        body = control.chat_body(openai_shapes.request_body(request, dialect="llama.cpp"))
        if request.wants_tools and request.sampling.stop:  # llama.cpp's stops cut a call ("city" in
            for name in ("stop", "verbose"):  # its arguments): LlamaStream's cut_stops cut the text only
                body.pop(name, None)
        return body, False
    if request.wants_json:
        # (refused at the edge too; unnamed: a portal may serve it under another name)
        raise InvalidRequest("this model takes tools through a JSON grammar, so tools cannot be combined with "
                             "structured output (a JSON object or schema) in one request")
    body = openai_shapes.request_body(tool_grammar.plain_request(request), dialect="llama.cpp")
    body.pop("parallel_tool_calls", None)
    # Stops apply to a text answer once read (LlamaStream.result), never to the grammar's
    # JSON: llama.cpp would cut a call whose arguments hold one ("city"), losing it.
    for name in ("stop", "verbose"):
        body.pop(name, None)
    return control.chat_body(body), True
