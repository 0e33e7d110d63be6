"""A fake OpenAI-compatible chat endpoint, served for real on 127.0.0.1.

Tests that talk to chat models (simulated users, judges) use the
``chat_server`` fixture (registered in conftest.py): ``chat_server(replies,
fail_first=0, default="###STOP###")`` starts a server that answers each
request with the next of ``replies`` (a text, or a message dict with
``tool_calls``), then ``default``, after ``fail_first`` 503s, and returns it
with its ``/v1`` URL; ``server.requests`` holds every (path, body) received.
A reply that is ``bytes`` is sent as the whole body with status 200, and a
``(status, bytes)`` pair with that status (``(status, bytes, headers)``
with those headers too): answers that are not chat completions.
"""

from __future__ import annotations

import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest


class _ChatServer(ThreadingHTTPServer):
    def __init__(self, replies, fail_first=0, default="###STOP###"):
        super().__init__(("127.0.0.1", 0), _Handler)
        self.replies = list(replies)
        self.default = default
        self.requests = []
        self.fail_first = fail_first


class _Handler(BaseHTTPRequestHandler):
    def log_message(self, *args):
        pass

    def do_POST(self):
        server = self.server
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        server.requests.append((self.path, body))
        if server.fail_first > 0:
            server.fail_first -= 1
            self.send_response(503)
            self.send_header("Content-Type", "application/json")
            self.end_headers()
            self.wfile.write(b'{"error": {"message": "busy"}}')
            return
        reply = server.replies.pop(0) if server.replies else server.default
        if isinstance(reply, (bytes, tuple)):
            status, raw, *more = (200, reply) if isinstance(reply, bytes) else reply
            self.send_response(status)
            for name, value in (more[0] if more else {}).items():
                self.send_header(name, value)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(raw)))
            self.end_headers()
            self.wfile.write(raw)
            return
        message = {"role": "assistant", "content": reply}
        finish = "stop"
        if isinstance(reply, dict):  # a whole message: content and tool_calls
            reply = dict(reply)
            finish = reply.pop("finish_reason", finish)  # the choice's, not the message's
            message = {"role": "assistant", "content": None, **reply}
        out = {
            "id": "chatcmpl-1",
            "object": "chat.completion",
            "created": 0,
            "model": body["model"],
            "choices": [
                {
                    "index": 0,
                    "message": message,
                    "finish_reason": finish,
                }
            ],
            "usage": {"prompt_tokens": 1, "completion_tokens": 1, "total_tokens": 2},
        }
        data = json.dumps(out).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)


@pytest.fixture
def chat_server():
    servers = []

    def start(replies, fail_first=0, default="###STOP###"):
        srv = _ChatServer(replies, fail_first, default)
        threading.Thread(target=srv.serve_forever, daemon=True).start()
        servers.append(srv)
        return srv, f"http://127.0.0.1:{srv.server_address[1]}/v1"

    yield start
    for srv in servers:
        srv.shutdown()
        srv.server_close()
