"""A proxy on 127.0.0.1 in front of SeaweedFS through which a test changes how the store
answers (other ETags, a connection that ends mid-body). Subclasses override `answer`."""
from __future__ import annotations

import http.client
import threading
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import urlsplit


@dataclass
class Reply:
    status: int
    headers: list[tuple[str, str]]
    body: bytes
    cut_at: int | None = None  # send this many body bytes, then drop the connection


class S3Proxy:
    def __init__(self, upstream: str):
        port = urlsplit(upstream).port
        proxy = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args: Any) -> None:
                pass

            def _forward(self) -> None:
                length = int(self.headers.get("Content-Length") or 0)
                body = self.rfile.read(length) if length else None
                headers = dict(self.headers.items())
                conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
                conn.request(self.command, self.path, body=body, headers=proxy.upstream_headers(headers))
                resp = conn.getresponse()
                reply = Reply(resp.status, [(k, v) for k, v in resp.getheaders()
                                            if k.lower() not in ("transfer-encoding", "connection")], resp.read())
                conn.close()
                proxy.answer(self.command, self.path, headers, reply)
                self.send_response(reply.status)
                for k, v in reply.headers:
                    if k.lower() != "content-length":
                        self.send_header(k, v)
                length = dict((k.lower(), v) for k, v in reply.headers).get("content-length", "0") \
                    if self.command == "HEAD" else str(len(reply.body))
                self.send_header("Content-Length", length)
                self.end_headers()
                if self.command == "HEAD":
                    return
                self.wfile.write(reply.body[:reply.cut_at])
                if reply.cut_at is not None:
                    self.wfile.flush()
                    self.close_connection = True

            do_GET = do_HEAD = do_PUT = do_POST = do_DELETE = _forward

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.endpoint = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def upstream_headers(self, headers: dict[str, str]) -> dict[str, str]:
        """The request headers sent on to the store."""
        return headers

    def answer(self, method: str, path: str, request_headers: dict[str, str], reply: Reply) -> None:
        """Change the store's `reply` in place before it is sent."""

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()

    def __enter__(self) -> "S3Proxy":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
