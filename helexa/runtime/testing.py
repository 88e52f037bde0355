"""Test helpers for the runtime (like ``trio.testing``): a tiny random-weight llama GGUF.

For tests about the fabric, not about answers.

The tokenizer and chat template are copied from the SmolLM2 GGUF, so tokenization and
templating are real; the weights are random (2 layers, 64 hidden) and seeded, so outputs
are nonsense but deterministic under greedy decoding. The output rows of the first 17
(special) tokens are zero, so end-of-generation tokens are never sampled: generation runs
to ``max_tokens`` or a stop sequence, which is what tests about counts need.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from helexa.protocol import ModelConfig

HIDDEN, LAYERS, HEADS, KV_HEADS, FFN, CONTEXT = 64, 2, 4, 2, 128, 4096


def write_tiny_llama(source: Path, target: Path, *, seed: int = 0) -> Path:
    """Write the tiny model to ``target`` using ``source``'s tokenizer; returns ``target``."""
    import gguf  # a test extra: imported here so the package never needs it

    reader = gguf.GGUFReader(str(source))

    def field(name: str):
        return reader.fields[name].contents()

    tokens = field("tokenizer.ggml.tokens")
    vocab = len(tokens)
    rng = np.random.default_rng(seed)
    head_dim = HIDDEN // HEADS

    def rand(*shape: int, scale: float = 0.1) -> np.ndarray:
        return (rng.standard_normal(shape) * scale).astype(np.float16)

    w = gguf.GGUFWriter(str(target), "llama")
    w.add_name("helexa-tiny-llama")
    w.add_block_count(LAYERS)
    w.add_context_length(CONTEXT)
    w.add_embedding_length(HIDDEN)
    w.add_feed_forward_length(FFN)
    w.add_head_count(HEADS)
    w.add_head_count_kv(KV_HEADS)
    w.add_rope_dimension_count(head_dim)
    w.add_rope_freq_base(10000.0)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_vocab_size(vocab)
    w.add_file_type(gguf.LlamaFileType.MOSTLY_F16)
    w.add_tokenizer_model(field("tokenizer.ggml.model"))
    w.add_tokenizer_pre(field("tokenizer.ggml.pre"))
    w.add_token_list(tokens)
    w.add_token_types(field("tokenizer.ggml.token_type"))
    w.add_token_merges(field("tokenizer.ggml.merges"))
    w.add_bos_token_id(field("tokenizer.ggml.bos_token_id"))
    w.add_eos_token_id(field("tokenizer.ggml.eos_token_id"))
    w.add_unk_token_id(field("tokenizer.ggml.unknown_token_id"))
    w.add_pad_token_id(field("tokenizer.ggml.padding_token_id"))
    w.add_add_bos_token(False)
    w.add_add_space_prefix(False)
    w.add_chat_template(field("tokenizer.chat_template"))

    w.add_tensor("token_embd.weight", rand(vocab, HIDDEN, scale=1.0))
    w.add_tensor("output_norm.weight", np.ones(HIDDEN, dtype=np.float32))
    output = rand(vocab, HIDDEN, scale=1.0)
    output[:17] = 0
    w.add_tensor("output.weight", output)
    for i in range(LAYERS):
        b = f"blk.{i}"
        w.add_tensor(f"{b}.attn_norm.weight", np.ones(HIDDEN, dtype=np.float32))
        w.add_tensor(f"{b}.attn_q.weight", rand(HEADS * head_dim, HIDDEN))
        w.add_tensor(f"{b}.attn_k.weight", rand(KV_HEADS * head_dim, HIDDEN))
        w.add_tensor(f"{b}.attn_v.weight", rand(KV_HEADS * head_dim, HIDDEN))
        w.add_tensor(f"{b}.attn_output.weight", rand(HIDDEN, HEADS * head_dim))
        w.add_tensor(f"{b}.ffn_norm.weight", np.ones(HIDDEN, dtype=np.float32))
        w.add_tensor(f"{b}.ffn_gate.weight", rand(FFN, HIDDEN))
        w.add_tensor(f"{b}.ffn_up.weight", rand(FFN, HIDDEN))
        w.add_tensor(f"{b}.ffn_down.weight", rand(HIDDEN, FFN))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return target


def tiny_llama_config(path: Path, **metadata: object) -> ModelConfig:
    """A ``llama_cpp`` config for the tiny model: one thread (llama.cpp's spinning threads
    crawl when they share two cores with anything else), two slots."""
    md = {"path": str(path), "n_threads": 1, "n_parallel": 2, "n_ctx": 4096, **metadata}
    return ModelConfig("tiny-llama", "llama_cpp", metadata=md)
