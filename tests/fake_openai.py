"""A local OpenAI-compatible server for tests: ``/v1/models`` and ``/v1/chat/completions``.

It answers like vLLM or llama.cpp's server would: a streamed reply comes as server-sent events
(``data: {chunk}`` lines, one word each, :attr:`FakeOpenAI.chunk_delay` apart, then a usage
chunk and ``data: [DONE]``); a ``response_format`` of type ``json_schema`` gets a JSON document
built from the schema (every required field, strings from :attr:`FakeOpenAI.words`, arrays at
their ``minItems``, the first ``enum`` value). Every request is kept in :attr:`requests`.
"""

from __future__ import annotations

import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

__all__ = ["FakeOpenAI"]

MODEL = "fake-instruct-1b"


class FakeOpenAI:
    def __init__(self, reply: str = "Rain taps the old roof, the garden drinks slowly, "
                 "and the cat dreams on.", chunk_delay: float = 0.25) -> None:
        self.reply = reply
        self.chunk_delay = chunk_delay
        self.words = "a lantern over the quiet harbour"
        self.requests: list[dict[str, Any]] = []
        self._lock = threading.Lock()
        fake = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args: Any) -> None:
                pass

            def do_GET(self) -> None:  # noqa: N802
                if self.path.rstrip("/").endswith("/models"):
                    self._json({"object": "list", "data": [
                        {"id": MODEL, "object": "model", "owned_by": "fake"}]})
                else:
                    self._json({"error": {"message": "not found"}}, status=404)

            def do_POST(self) -> None:  # noqa: N802
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                with fake._lock:
                    fake.requests.append({"path": self.path, "body": body,
                                          "auth": self.headers.get("Authorization")})
                if not self.path.rstrip("/").endswith("/chat/completions"):
                    self._json({"error": {"message": "not found"}}, status=404)
                elif body.get("model") != MODEL:
                    self._json({"error": {"message": f"model {body.get('model')!r} not found",
                                          "type": "invalid_request_error"}}, status=404)
                elif (body.get("response_format") or {}).get("type") == "json_schema":
                    schema = body["response_format"]["json_schema"]["schema"]
                    self._json(fake._completion(json.dumps(fake.instance(schema))))
                elif body.get("stream"):
                    self._stream(body)
                else:
                    self._json(fake._completion(fake.reply))

            def _json(self, payload: dict[str, Any], status: int = 200) -> None:
                data = json.dumps(payload).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def _stream(self, body: dict[str, Any]) -> None:
                self.send_response(200)
                self.send_header("Content-Type", "text/event-stream")
                self.send_header("Cache-Control", "no-cache")
                self.send_header("Transfer-Encoding", "chunked")
                self.end_headers()
                words = fake.reply.split(" ")
                for number, word in enumerate(words):
                    piece = word if number == 0 else " " + word
                    self._event({"id": "chatcmpl-fake", "object": "chat.completion.chunk",
                                 "created": int(time.time()), "model": MODEL,
                                 "choices": [{"index": 0, "delta": {"content": piece},
                                              "finish_reason": None}]})
                    time.sleep(fake.chunk_delay)
                self._event({"id": "chatcmpl-fake", "object": "chat.completion.chunk",
                             "created": int(time.time()), "model": MODEL,
                             "choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}]})
                if (body.get("stream_options") or {}).get("include_usage"):
                    self._event({"id": "chatcmpl-fake", "object": "chat.completion.chunk",
                                 "created": int(time.time()), "model": MODEL, "choices": [],
                                 "usage": {"prompt_tokens": 10, "completion_tokens": len(words),
                                           "total_tokens": 10 + len(words)}})
                self._chunk(b"data: [DONE]\n\n")
                self._chunk(b"")

            def _event(self, payload: dict[str, Any]) -> None:
                self._chunk(f"data: {json.dumps(payload)}\n\n".encode())

            def _chunk(self, data: bytes) -> None:
                self.wfile.write(f"{len(data):x}\r\n".encode() + data + b"\r\n")
                self.wfile.flush()

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self._server.server_address[1]}/v1"
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)

    def _completion(self, content: str) -> dict[str, Any]:
        return {"id": "chatcmpl-fake", "object": "chat.completion", "created": int(time.time()),
                "model": MODEL, "choices": [{"index": 0, "finish_reason": "stop",
                                             "message": {"role": "assistant",
                                                         "content": content}}],
                "usage": {"prompt_tokens": 10, "completion_tokens": 12, "total_tokens": 22}}

    def instance(self, schema: dict[str, Any], defs: dict[str, Any] | None = None) -> Any:
        """A small document that validates against ``schema`` (the subset our schemas use)."""
        defs = defs if defs is not None else schema.get("$defs", {})
        if "$ref" in schema:
            return self.instance(defs[schema["$ref"].rsplit("/", 1)[1]], defs)
        if "enum" in schema:
            return schema["enum"][0]
        if "const" in schema:
            return schema["const"]
        for key in ("anyOf", "oneOf", "allOf"):
            if key in schema:
                return self.instance(schema[key][0], defs)
        kind = schema.get("type")
        if kind == "object":
            return {name: self.instance(sub, defs)
                    for name, sub in schema.get("properties", {}).items()}
        if kind == "array":
            return [self.instance(schema.get("items", {}), defs)
                    for _ in range(max(1, int(schema.get("minItems", 1))))]
        if kind == "integer":
            return int(schema.get("minimum", 1))
        if kind == "number":
            return float(schema.get("minimum", 1))
        if kind == "boolean":
            return True
        text = self.words
        return text[: int(schema.get("maxLength", len(text)))]

    def chat_requests(self) -> list[dict[str, Any]]:
        with self._lock:
            return [r["body"] for r in self.requests if r["path"].endswith("/chat/completions")]

    def __enter__(self) -> FakeOpenAI:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._server.shutdown()
        self._server.server_close()
