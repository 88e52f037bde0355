"""Helpers for the ExLlama backend tests: model directories and the GPU gate."""

from __future__ import annotations

import importlib.util
import json
import os
import socket
import subprocess
import sys
import textwrap
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
TINY_MODEL = REPO / "scripts" / "gpu" / "tiny_model.py"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def load_script(path: Path, name: str):
    """Import a helper script from ``scripts/`` as a module."""
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


def cuda_with(engine: str) -> bool:
    """torch with a visible CUDA GPU and ``engine`` installed (checked without importing it)."""
    if importlib.util.find_spec("torch") is None or importlib.util.find_spec(engine) is None:
        return False
    import torch

    return torch.cuda.is_available()


def gpu_model(engine: str, env: str) -> str | None:
    """Why a GPU test of ``engine`` cannot run here, or None when it can."""
    if not cuda_with(engine):
        return f"needs torch with CUDA, {engine} and a GPU (none here)"
    if not os.environ.get(env):
        return f"set {env} to a model directory (scripts/gpu_check.sh does)"
    return None


def model_dir(path: Path, *, quant: str | None = None, files: tuple[str, ...] = ("model.safetensors", "tokenizer.json"),
              **config: object) -> Path:
    """A directory that looks like a model to :func:`inspect_model_dir` (no real weights)."""
    path.mkdir(parents=True, exist_ok=True)
    body = {"architectures": ["LlamaForCausalLM"], "max_position_embeddings": 4096, "eos_token_id": 2, **config}
    if quant:
        body["quantization_config"] = {"quant_method": quant, "bits": 4.0}
    (path / "config.json").write_text(json.dumps(body))
    for name in files:
        (path / name).write_text("{}")
    return path


def load_in_subprocess(kind: str, path: str, *, stubs: Path | None = None) -> tuple[str, bool]:
    """Load a ``kind`` backend in a fresh interpreter (``stubs`` first on its path, to stand
    in for torch or an engine); returns the LoadFailed code and whether the engine module
    was imported."""
    engine = kind
    code = textwrap.dedent(f"""
        import sys, trio
        from helexa.protocol import ModelConfig
        from helexa.runtime import LoadFailed, create_backend

        async def main():
            backend = create_backend(ModelConfig("m", {kind!r}, metadata={{"path": {path!r}}}))
            try:
                await backend.load(lambda *args: None)
            except LoadFailed as exc:
                print(exc.code)
            else:
                print("loaded")
            print({engine!r} in sys.modules)

        trio.run(main)
    """)
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(stubs) if stubs else "", str(REPO)) if p)
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    code_line, imported = out.stdout.split()[-2:]
    return code_line, imported == "True"


def write_stubs(root: Path, *, cuda: bool, engine: str | None) -> Path:
    """A ``torch`` whose ``cuda.is_available()`` answers ``cuda`` and, if ``engine`` is
    given, a package of that name that fails if imported (the backends must not import an
    engine before they know a GPU and the model are there)."""
    (root / "torch").mkdir(parents=True, exist_ok=True)
    (root / "torch" / "__init__.py").write_text(textwrap.dedent(f"""
        class cuda:
            class OutOfMemoryError(RuntimeError):
                pass

            @staticmethod
            def is_available():
                return {cuda!r}
    """))
    if engine:
        (root / engine).mkdir(exist_ok=True)
        (root / engine / "__init__.py").write_text("raise RuntimeError('imported before the checks')\n")
    return root
