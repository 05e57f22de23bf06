"""A stand-in for Slack's incoming webhook on loopback: records what the alerts post."""
from __future__ import annotations

import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


class Receiver:
    """Webhook stand-in: records every post and when it came; answers with queued statuses,
    then 200 (429s with ``Retry-After: retry_after_s``)."""

    def __init__(self) -> None:
        self.posts: list[str] = []
        self.times: list[float] = []
        self.statuses: list[int] = []
        self.delay_s = 0.0
        self.retry_after_s = 1
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers["Content-Length"]))
                receiver.posts.append(json.loads(body)["text"])
                receiver.times.append(time.monotonic())
                time.sleep(receiver.delay_s)
                status = receiver.statuses.pop(0) if receiver.statuses else 200
                self.send_response(status)
                if status == 429:
                    self.send_header("Retry-After", str(receiver.retry_after_s))
                self.end_headers()
                self.wfile.write(b"ok" if status == 200 else b"error")

            def log_message(self, *args) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_port}/services/T0/B0/TOPSECRET0042"
        threading.Thread(target=self.server.serve_forever, args=(0.05,), daemon=True).start()

    def wait_for(self, count: int, timeout_s: float = 5.0) -> list[str]:
        deadline = time.monotonic() + timeout_s
        while len(self.posts) < count and time.monotonic() < deadline:
            time.sleep(0.01)
        return self.posts

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()
