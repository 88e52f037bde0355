"""A small OpenAI-style server that wants an API key, for the upstream key tests.

Usage: ``python keyed_server.py PORT [--api-key KEY] [--key-env NAME]``: the key is KEY, or
the value of the variable NAME in its environment (as vLLM takes ``--api-key`` or
``VLLM_API_KEY``). Every request, ``/health`` and ``/v1/models`` included, without
``Authorization: Bearer <key>`` gets 401 (stricter than vLLM, which leaves ``/health``
open). It prints its key at start, as servers that log their arguments do, and answers
chat completions with "ok" (one JSON answer, or a stream of two pieces).
"""

import argparse
import http.server
import json
import os


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("port", type=int)
    parser.add_argument("--api-key")
    parser.add_argument("--key-env")
    opts = parser.parse_args()
    key = opts.api_key or (os.environ.get(opts.key_env, "") if opts.key_env else "")
    if not key:
        raise SystemExit("keyed_server: no key")
    print(f"non-default args: {{'api_key': {key!r}}}", flush=True)
    expected = f"Bearer {key}"

    class Handler(http.server.BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def _authorized(self) -> bool:
            if self.headers.get("Authorization") == expected:
                return True
            self._send(401, {"error": {"message": "Unauthorized", "type": "invalid_request_error"}})
            return False

        def _send(self, status: int, body: dict) -> None:
            data = json.dumps(body).encode()
            self.send_response(status)
            self.send_header("content-type", "application/json")
            self.send_header("content-length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def do_GET(self) -> None:
            if self._authorized():
                self._send(200, {"object": "list", "data": [{"id": "keyed", "object": "model"}]})

        def do_POST(self) -> None:
            body = json.loads(self.rfile.read(int(self.headers.get("content-length", 0))) or b"{}")
            if not self._authorized():
                return
            usage = {"prompt_tokens": 3, "completion_tokens": 1, "total_tokens": 4}
            if not body.get("stream"):
                self._send(200, {"id": "c", "object": "chat.completion", "model": "keyed", "usage": usage,
                                 "choices": [{"index": 0, "finish_reason": "stop",
                                              "message": {"role": "assistant", "content": "ok"}}]})
                return
            self.send_response(200)
            self.send_header("content-type", "text/event-stream")
            self.send_header("transfer-encoding", "chunked")
            self.end_headers()
            pieces = [{"choices": [{"index": 0, "delta": {"content": "ok"}, "finish_reason": None}]},
                      {"choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}], "usage": usage}]
            for piece in [*(f"data: {json.dumps(p)}\n\n" for p in pieces), "data: [DONE]\n\n"]:
                data = piece.encode()
                self.wfile.write(b"%x\r\n%s\r\n" % (len(data), data))
            self.wfile.write(b"0\r\n\r\n")

        def log_message(self, *args: object) -> None:
            pass

    http.server.ThreadingHTTPServer(("127.0.0.1", opts.port), Handler).serve_forever()


if __name__ == "__main__":
    main()
