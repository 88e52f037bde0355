"""The API key between a neuron and the OpenAI-style server behind an ``openai_proxy`` model.

A server the neuron supervises would otherwise run unauthenticated: any local account (or
anything that reaches its port) could use the GPU directly, past the cortex's keys, quotas,
metering and ledger. So at each start of the process the neuron draws a fresh key
(:func:`draw`) and hands it to the server the two ways such servers take one:

* ``metadata.api_key_env``: the name of a variable set to the key in the server's
  environment (``VLLM_API_KEY`` for vLLM, ``LLAMA_API_KEY`` for llama.cpp's server). The
  preferred way: a process's environment is readable by its own user only, its command
  line (``/proc/PID/cmdline``, ``ps``) by every local account.
* ``{api_key}`` in ``args``: replaced by the key (``--api-key {api_key}``, SGLang's
  ``--api-key``, or a server that takes it no other way).

The neuron then sends ``Authorization: Bearer <key>`` on every request to the server,
readiness probes included. Without ``command`` (a server the neuron does not start),
``metadata.api_key_env`` names a variable of the neuron's own environment that holds the
server's key, sent the same way.

Drawn keys start with ``hlx-up-``, which :func:`helexa.logs.redact` masks wherever one
shows up in a log line; the command line the neuron logs, and the lines the server
writes, are masked here as well (:func:`masked_command`, :func:`mask`).
"""

from __future__ import annotations

import os
import re
import secrets
import shlex
from collections.abc import Mapping, Sequence

PLACEHOLDER = "{api_key}"
PREFIX = "hlx-up-"
MASK = "***"
_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
_KEY = re.compile(r"[\x21-\x7e]+")


def draw() -> str:
    """A fresh key for one start of a supervised server."""
    return PREFIX + secrets.token_urlsafe(24)


def env_name(metadata: Mapping[str, object]) -> str | None:
    """``metadata.api_key_env``, or None. Raises :class:`ValueError` for one that is not a
    variable name."""
    name = metadata.get("api_key_env")
    if name is None:
        return None
    if not isinstance(name, str) or not _NAME.fullmatch(name):
        raise ValueError(f"metadata.api_key_env must be an environment variable name, not {name!r}")
    return name


def takes_key(args: Sequence[str], name: str | None) -> bool:
    """Whether a supervised server is given its key at all (a variable, or the placeholder)."""
    return name is not None or any(PLACEHOLDER in arg for arg in args)


def command(executable: str, args: Sequence[str], key: str) -> list[str]:
    """The argv to start: ``{api_key}`` replaced by ``key`` (a plain replace: other braces,
    such as JSON in an argument, stay as they are)."""
    return [executable, *(arg.replace(PLACEHOLDER, key) for arg in args)]


def child_env(base: Mapping[str, str], name: str | None, key: str) -> dict[str, str]:
    """``base`` with the key in variable ``name`` (over any value ``base`` had for it)."""
    return dict(base) if name is None else {**base, name: key}


def static_key(name: str | None, environ: Mapping[str, str] = os.environ) -> str | None:
    """The key of a server the neuron does not start: the value of ``name`` in the neuron's
    environment. Raises :class:`ValueError` when the variable is unset or empty."""
    if name is None:
        return None
    value = environ.get(name, "").strip()
    if not value:
        raise ValueError(f"metadata.api_key_env names {name}, which is not set in the neuron's environment")
    if not _KEY.fullmatch(value):  # the message never quotes it
        raise ValueError(f"the key in {name} holds a space or a control character")
    return value


def headers(key: str | None) -> tuple[tuple[str, str], ...]:
    """The header sent with every request to the server (none without a key)."""
    return () if key is None else (("authorization", f"Bearer {key}"),)


def mask(text: str, key: str | None) -> str:
    """``text`` with ``key`` masked."""
    return text.replace(key, MASK) if key else text


def masked_command(argv: Sequence[str], key: str) -> str:
    """The command line as a shell would read it, with the key masked: for the log."""
    return mask(shlex.join(argv), key)
