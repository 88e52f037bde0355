"""The loaded llama.cpp server's own HTTP API on loopback: its properties, its chat
template applied, its tokenizer.

xllamacpp's server listens on a random loopback port behind a random API key (see
:mod:`.llama_cpp`); these calls are answered by its HTTP threads, never queued behind
generations. Every call blocks: run it off the trio thread.
"""

from __future__ import annotations

import logging
from typing import Any

import httpx

from helexa.protocol import GenerateRequest, Task

from . import openai_shapes
from .base import BackendError

log = logging.getLogger(__name__)

PROBE_TIMEOUT_S = 10.0
"""Deadline of a call to the loaded server's own HTTP API (props, template, tokenize)."""


class LoopbackApi:
    """A client of one loaded server's HTTP API (``base_url``, with its ``api_key``).

    Resource handling: the connection is opened at the first call; :meth:`close` it when
    the server goes."""

    def __init__(self, base_url: str, api_key: str) -> None:
        self._base_url = base_url
        self._api_key = api_key
        self._http: httpx.Client | None = None

    def call(self, path: str, body: dict[str, Any] | None = None) -> dict[str, Any]:
        """One call (``/props``, ``/apply-template``, ``/tokenize``): a GET without ``body``.

        Raises :class:`httpx.HTTPError`, :class:`ValueError` (not JSON) or the mapped
        :class:`~.base.BackendError` for an error envelope."""
        if self._http is None:
            self._http = httpx.Client(base_url=self._base_url, timeout=PROBE_TIMEOUT_S, verify=False,
                                      headers={"Authorization": f"Bearer {self._api_key}"})
        r = self._http.get(path) if body is None else self._http.post(path, json=body)
        answer = r.json()
        openai_shapes.raise_for_error(answer)
        return answer

    def props(self, slot_ctx: int) -> dict[str, Any]:
        """The server's ``/props``, or ``{}`` (logged, with the ``slot_ctx`` then assumed) when unreadable."""
        try:
            return self.call("/props")
        except (httpx.HTTPError, ValueError, BackendError) as exc:
            log.warning("llama.cpp /props unreadable (%s): assuming %d tokens per slot, no native tools",
                        exc, slot_ctx)
            return {}

    def count_prompt(self, request: GenerateRequest, body: dict[str, Any]) -> int:
        """The exact number of tokens llama.cpp will see for ``body`` (its chat template
        applied, tools included), counted by llama.cpp itself."""
        if request.task is Task.CHAT:
            prompt = self.call("/apply-template", {k: v for k, v in body.items()
                                                   if k in ("messages", "tools", "tool_choice")})["prompt"]
        else:
            prompt = body.get("prompt") or ""
        tokens = self.call("/tokenize", {"content": prompt, "add_special": True, "parse_special": True})["tokens"]
        return len(tokens)

    def close(self) -> None:
        if self._http is not None:
            self._http.close()
            self._http = None
