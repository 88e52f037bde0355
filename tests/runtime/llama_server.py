"""llama.cpp's own OpenAI server on a loopback port, for the openai_proxy tests.

Usage: ``python llama_server.py MODEL.gguf PORT`` — serves until killed. A real external
server (llama.cpp's HTTP server inside xllamacpp), run as a separate process exactly as an
operator would run one. With ``LLAMA_API_KEY`` in its environment it wants that key, as
llama.cpp's ``llama-server`` does.
"""

import os
import sys
import threading

import xllamacpp


def main() -> None:
    path, port = sys.argv[1], int(sys.argv[2])
    params = xllamacpp.CommonParams()
    params.model.path = path
    params.port = port
    params.n_ctx = 4096
    params.n_parallel = 2
    params.cpuparams.n_threads = 1
    params.cpuparams_batch.n_threads = 1
    if os.environ.get("LLAMA_API_KEY"):
        params.api_keys = [os.environ["LLAMA_API_KEY"]]
    server = xllamacpp.Server(params)
    print(f"listening on {server.listening_address}", flush=True)
    threading.Event().wait()


if __name__ == "__main__":
    main()
