"""Fakes for federation tests: identities and a local generation handler."""

from contextlib import asynccontextmanager

import pytest
import trio
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from helexa.identity import Identity
from helexa.protocol import EmbedResult, GenerateResult, TokenChunk, Usage


def new_identity() -> Identity:
    return Identity(Ed25519PrivateKey.generate())


class FakeFleet:
    """A local handler that streams fixed tokens, optionally slowly; records cancels."""

    def __init__(self, tokens=("Hel", "lo", " world"), delay=0.0, fail=None, stop_sequence=None, prompt_tokens=None):
        """``prompt_tokens``: the prompt's count the first chunk carries, as a neuron's does."""
        self.tokens = tokens
        self.prompt_tokens = prompt_tokens
        self.stop_sequence = stop_sequence
        self.delay = delay
        self.fail = fail
        self.requests = []
        self.closed_early = []

    @asynccontextmanager
    async def serve(self, request):
        self.requests.append(request)
        if self.fail is not None:
            raise self.fail
        done = False

        async def frames():
            nonlocal done
            for i, t in enumerate(self.tokens):
                await trio.sleep(self.delay)
                yield TokenChunk(request.request_id, t, prompt_tokens=None if i else self.prompt_tokens)
            done = True
            yield GenerateResult(request.request_id, "stop", Usage(7, len(self.tokens)),
                                 stop_sequence=self.stop_sequence)

        gen = frames()
        try:
            yield gen
        finally:
            await gen.aclose()
            if not done:
                self.closed_early.append(request.request_id)

    async def embed(self, request):
        return EmbedResult(request.request_id, 2, b"\0" * 8 * len(request.inputs), Usage(3, 0))


@pytest.fixture
def fleet():
    return FakeFleet()
