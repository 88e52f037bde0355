"""What a model can take, checked at the edge before a request costs a neuron anything.

:meth:`RequestLimits.check` refuses, each with a 400 in OpenAI's envelope naming the field:

* a feature the model's backend lacks (``response_format`` JSON, ``tools``, ``logprobs``;
  the catalogue declares them per backend, see :data:`.catalogue.BACKEND_FEATURES`);
* an image for a model that cannot see, naming the models here that can;
* a generation for a model that only embeds, and (:meth:`RequestLimits.check_workload`)
  an embeddings request for a model that does not embed (``param: model``);
* tools with structured output for a ``llama_cpp`` model whose template has no tool syntax
  (``param: response_format``, ``unsupported``): its tools are a JSON grammar already;
* ``max_tokens`` over the model's ``max_output`` (a request without ``max_tokens`` gets
  ``max_output``, when the catalogue sets one);
* a ``logit_bias`` key that is no token of the model's vocabulary (where the edge reads it);
* a prompt that does not fit the context one request gets (``context_length_exceeded``,
  param ``messages`` or ``prompt``): the prompt alone reaches the context, or the prompt
  and an explicit ``max_tokens`` pass it, as OpenAI counts. The context is the catalogue's
  ``max_context`` (made consistent with how the backend splits its context, see
  :mod:`.catalogue`), or for a model outside the catalogue what its neurons report.

A count that fits travels with the request (``GenerateRequest.prompt_tokens``) so that the
neuron need not count again: the exact count, or, for a prompt whose UTF-8 bytes already
fit (the bytes bound the tokens of the vocabularies counted exactly; most prompts), that
bound, with no tokenizing at all. A lower bound, or no count (:mod:`.token_counter` says
which models get one), leaves the exact check to the neuron.

Refusals name the model as the client named it (a portal's alias), never the model behind it.

Models outside the catalogue (loaded by hand, or a peer's) have no declared features here:
their neurons refuse what they cannot do, with the same 400.
"""

from __future__ import annotations

from dataclasses import replace

from helexa.protocol import Feature, GenerateRequest, ModelState, Task, Workload

from .catalogue import Catalogue, CatalogueEntry
from .errors import BadRequest
from .fleet import Fleet
from .token_counter import TokenCounter

_GENERATING = frozenset({Workload.CHAT, Workload.COMPLETION, Workload.VISION})
_FEATURE_FIELDS = {Feature.STRUCTURED_OUTPUT: "response_format", Feature.TOOLS: "tools", Feature.LOGPROBS: "logprobs"}


def context_exceeded(limit: int, prompt: int, max_tokens: int | None, param: str) -> BadRequest:
    """OpenAI's error for a request that does not fit ``limit`` tokens."""
    if max_tokens:
        message = (f"This model's maximum context length is {limit} tokens. However, you requested "
                   f"{prompt + max_tokens} tokens ({prompt} in the messages, {max_tokens} in the completion). "
                   "Please reduce the length of the messages or completion.")
    else:
        message = (f"This model's maximum context length is {limit} tokens. However, your messages resulted in "
                   f"{prompt} tokens. Please reduce the length of the messages.")
    return BadRequest(message, param=param, code="context_length_exceeded")


class RequestLimits:
    """The edge's checks of a generation against its model (see the module docstring).

    Args:
        catalogue: what the operator offers (features, context, output limit, workloads).
        fleet: the live fleet (the context neurons report for models outside the catalogue).
        counter: prompt token counts (built over ``catalogue`` when not given).
    """

    def __init__(self, catalogue: Catalogue, fleet: Fleet, counter: TokenCounter | None = None) -> None:
        self._catalogue = catalogue
        self._fleet = fleet
        self.counter = counter or TokenCounter(catalogue)

    def context_length(self, model_id: str) -> int | None:
        """The context one request for ``model_id`` gets: the catalogue's figure, else the
        largest any neuron with it loaded reports (the neuron checks exactly anyway)."""
        return self._context(model_id, self._catalogue.get(model_id))

    def _context(self, model_id: str, entry: CatalogueEntry | None) -> int | None:
        """:meth:`context_length`, with ``model_id``'s catalogue entry already looked up."""
        if entry is not None and entry.max_context:
            return entry.max_context
        reported = [s.context_length for link in self._fleet.usable()
                    if (s := link.models.get(model_id)) is not None and s.state is ModelState.LOADED
                    and s.context_length]
        return max(reported) if reported else None

    def seeing_models(self) -> list[str]:
        return sorted(e.id for e in self._catalogue if Workload.VISION in e.workloads)

    def check_image(self, model_id: str, image: str, *, named: str | None = None) -> None:
        """Refuse an image (its location ``image``) for a model that cannot see, naming the
        models that can; ``named`` is the model as the client named it (default ``model_id``)."""
        entry = self._catalogue.get(model_id)
        if entry is None or Workload.VISION not in entry.workloads:
            seeing = self.seeing_models()
            can = f"models that can: {', '.join(seeing)}" if seeing else "no model served here can"
            raise BadRequest(f"model {(named or model_id)!r} cannot see images ({can})", param=image,
                             code="image_not_supported")

    def check_workload(self, model_id: str, *, embedding: bool, named: str | None = None) -> None:
        """Refuse (400 ``unsupported``, ``param: model``) an embeddings request for a
        catalogued model without the ``embedding`` workload, and a generation for one that
        only embeds, before either cold-loads it on a neuron to be refused there; ``named``
        is the model as the client named it (default ``model_id``)."""
        entry = self._catalogue.get(model_id)
        if entry is None:  # outside the catalogue: its neurons refuse what it cannot do
            return
        name = named or model_id
        if embedding and Workload.EMBEDDING not in entry.workloads:
            raise BadRequest(f"model {name!r} does not do embeddings", param="model", code="unsupported")
        if not embedding and not _GENERATING & set(entry.workloads):
            raise BadRequest(f"model {name!r} only does embeddings (an embeddings request, not a generation)",
                             param="model", code="unsupported")

    async def _check_token_ids(self, model_id: str, bias: dict[str, object], name: str) -> None:
        """Refuse a ``logit_bias`` key that is no token of the model's vocabulary, where this
        cortex reads the vocabulary (:mod:`.token_counter`; elsewhere the keys are only
        checked to be token ids, :func:`.openai_requests.logit_biases`)."""
        tokenizer = await self.counter.tokenizer(model_id)
        if tokenizer is None:
            return
        size = tokenizer.vocab_size
        for key in bias:
            if not key.isdigit() or int(key) >= size:
                raise BadRequest(f"Invalid key in 'logit_bias': {key[:40]!r} is not a token of model {name!r}, "
                                 f"whose vocabulary holds token ids 0 to {size - 1}", param="logit_bias")

    async def _check_grammar_tools(self, model_id: str, name: str) -> None:
        """Refuse tools with structured output for a ``llama_cpp`` model whose template has no
        tool syntax (read from its GGUF here): its tools are a JSON grammar of their own
        (:mod:`helexa.runtime.tool_grammar`), which the backend cannot combine with another.
        Where the GGUF cannot be read here, the neuron refuses it with the same 400."""
        tokenizer = await self.counter.tokenizer(model_id)
        if tokenizer is not None and not tokenizer.renders_tool_calls:
            raise BadRequest(f"model {name!r} takes tools through a JSON grammar, so tools cannot be combined with "
                             "structured output (a JSON object or schema) in one request", param="response_format",
                             code="unsupported")

    async def check(self, request: GenerateRequest, *, image: str | None = None,
                    named: str | None = None) -> GenerateRequest:
        """Refuse what ``request``'s model cannot take (raises :class:`BadRequest`); return
        the request, with ``prompt_tokens`` when counted exactly.

        Args:
            image: where the request's first image part is (``messages[0].content[1]``), if any.
            named: the model as the client named it (a portal's alias), which the refusals
                name; default ``request.model_id``. The model behind an alias is never named.
        """
        entry = self._catalogue.get(request.model_id)
        name = named or request.model_id
        self.check_workload(request.model_id, embedding=False, named=name)
        if image is not None:
            self.check_image(request.model_id, image, named=name)
        if entry is not None:
            tools, json_out, logprobs = request.wants_tools, request.wants_json, request.sampling.logprobs
            if tools or json_out or logprobs:  # (most requests want none: no feature set, no walk)
                features = entry.feature_set
                for feature, on in ((Feature.TOOLS, tools), (Feature.STRUCTURED_OUTPUT, json_out),
                                    (Feature.LOGPROBS, logprobs)):
                    if on and feature not in features:
                        raise BadRequest(f"model {name!r} cannot do {_FEATURE_FIELDS[feature]} "
                                         f"(its backend {entry.backend!r} has no {feature.value.replace('_', ' ')})",
                                         param=_FEATURE_FIELDS[feature], code="unsupported")
                if tools and json_out and entry.backend == "llama_cpp":
                    await self._check_grammar_tools(request.model_id, name)
            max_tokens = request.sampling.max_tokens
            if entry.max_output and max_tokens and max_tokens > entry.max_output:
                raise BadRequest(f"max_tokens {max_tokens} is over model {name!r}'s limit of {entry.max_output}",
                                 param="max_tokens")
            if entry.max_output and max_tokens is None:
                request = replace(request, sampling=replace(request.sampling, max_tokens=entry.max_output))
        bias = request.extra.get("logit_bias")
        if isinstance(bias, dict) and bias:
            await self._check_token_ids(request.model_id, bias, name)
        limit = self._context(request.model_id, entry)
        if limit is None:
            return request
        param = "messages" if request.task is Task.CHAT else "prompt"
        max_tokens = request.sampling.max_tokens
        if max_tokens and max_tokens >= limit:
            raise BadRequest(
                f"max_tokens {max_tokens} leaves no room for the prompt in model {name!r}'s context "
                f"of {limit} tokens", param="max_tokens", code="context_length_exceeded")
        # Most prompts are far shorter than the context: their bytes already bound their
        # tokens under it, and tokenizing them (a cold tokenizer took ~0.3 ms of a
        # request's ~0.9 ms in the cortex before its frame went out) would only confirm it.
        room = min(limit - 1, limit - (max_tokens or 0))  # the most prompt tokens that fit
        count = await self.counter.count(request, room=room)
        if count is None:
            return request
        if count.bound:  # within the room: it fits
            return replace(request, prompt_tokens=count.tokens)
        if count.tokens >= limit or count.tokens + (max_tokens or 0) > limit:
            raise context_exceeded(limit, count.tokens, max_tokens, param)
        return replace(request, prompt_tokens=count.tokens) if count.exact else request
