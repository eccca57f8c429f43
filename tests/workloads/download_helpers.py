"""Test servers and helpers for the downloader tests.

`FaultyServer`: an HTTP/1.1 server on 127.0.0.1 (optionally HTTPS with a self-signed
certificate made at test time) serving in-memory objects with ranges, ETags and
If-Match, and a per-path script of faults consumed one per GET:

    "ok"            serve normally
    "500" "503" "429" "404" "403"   that status (429/503 with Retry-After: 0)
    "reset"         headers and half the body, then a TCP reset
    "truncate"      headers promising the whole body, half of it, then a clean close
    "stall"         half the body, then silence longer than the client's timeout
    "slow"          silence before the headers longer than the client's timeout
    "corrupt"       one byte of the body flipped
    "ignore-range"  a 200 with the whole body even when a range was asked for
    "to-the-end"    a 206 from the start of the range asked for to the end of the object
    "page"          a 200 with a short HTML page instead of the object (a hub's error page)
    "early-start"   a 206 starting 100 bytes before the range asked for
    "chunked-longer"  a 200 without Content-Length (chunked) carrying 64 MiB more than the object
    "<fault>+change"  that fault, then the object's data becomes its `changed_to` (a new version)

HEAD requests have their own script, under the key "HEAD <path>": "429" and "503" answer
with Retry-After: 1, "500" without.

An object added with `encoding="gzip"` is sent compressed with `Content-Encoding: gzip`
whatever the client asks for (a misconfigured proxy); HEAD reports the identity length.

Every request is logged (method, path, range, status, bytes sent) so tests can assert
what was (not) fetched again. A response is logged when it ends, which can be after the
client has given up on it (a part cancelled mid-body, its bytes still in socket buffers):
`clear_log` first waits for every response in progress to end, so none of them is counted
against the next run.
"""
from __future__ import annotations

import base64
import contextlib
import datetime as dt
import gzip
import hashlib
import ipaddress
import random
import socket
import ssl
import struct
import threading
import time
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any, Iterator


@dataclass
class ServedObject:
    data: bytes
    etag: str = ""
    content_md5: str = ""  # base64, sent on whole-object responses
    repr_digest: str = ""  # "sha-256=:<b64>:" sent on every response
    accept_ranges: bool = True
    head_allowed: bool = True
    flapping_etag: bool = False  # a new ETag on every request (CDN nodes that disagree)
    encoding: str = ""  # Content-Encoding forced on every GET
    stored_encoding: str = ""  # Content-Encoding of data stored compressed: on HEAD and GET, bytes as stored
    last_modified: str = "Sun, 01 Nov 2026 00:00:00 GMT"  # "": no Last-Modified header
    changed_to: bytes = b""  # the data after a "+change" fault
    served: int = 0


@dataclass
class LoggedRequest:
    method: str
    path: str
    range: str
    status: int
    bytes_sent: int
    condition: str = ""  # the If-Match or If-Unmodified-Since sent


@dataclass
class FaultyServer:
    stall_s: float = 3.0
    rate_bytes_per_s: float = 0.0  # 0: unthrottled
    get_retry_after: str = "0"  # the Retry-After of a GET's 429 or 503
    objects: dict[str, ServedObject] = field(default_factory=dict)
    scripts: dict[str, list[str]] = field(default_factory=dict)
    log: list[LoggedRequest] = field(default_factory=list)  # appended when a response ends
    started: list[str] = field(default_factory=list)  # GET paths, appended when a request arrives
    proxied: list[str] = field(default_factory=list)  # absolute URLs of requests sent to it as a proxy
    cert_file: Path | None = None
    _lock: threading.Lock = field(default_factory=threading.Lock)
    _active: int = 0  # requests being answered (not yet logged)
    _httpd: Any = None
    _thread: Any = None

    # -- setup --------------------------------------------------------------------------

    def add(self, path: str, data: bytes, *, etag: bool = True, content_md5: bool | str = False,
            repr_digest: bool | str = False, accept_ranges: bool = True, head_allowed: bool = True,
            encoding: str = "", last_modified: str = "", validators: bool = True,
            changed_to: bytes = b"", stored_encoding: str = "") -> str:
        """Serve `data` at `path`; returns the URL. A str for a checksum sends that value.
        validators=False: neither ETag nor Last-Modified is sent."""
        md5 = base64.b64encode(hashlib.md5(data).digest()).decode() if content_md5 is True else (content_md5 or "")
        digest = (
            f"sha-256=:{base64.b64encode(hashlib.sha256(data).digest()).decode()}:" if repr_digest is True else (repr_digest or "")
        )
        self.objects[path] = ServedObject(
            data, f'"{hashlib.md5(data).hexdigest()}"' if etag else "", md5, digest, accept_ranges, head_allowed,
            encoding=encoding, **({"last_modified": last_modified} if last_modified else {}), changed_to=changed_to,
            stored_encoding=stored_encoding,
        )
        if not validators:
            self.objects[path].etag = self.objects[path].last_modified = ""
        return self.url(path)

    def __post_init__(self) -> None:
        self._idle = threading.Condition(self._lock)

    def script(self, path: str, *actions: str) -> None:
        with self._lock:
            self.scripts.setdefault(path, []).extend(actions)

    def unscript(self, path: str) -> list[str]:
        """Drop the faults left unused for `path` (requests a run never made); returns them."""
        with self._lock:
            return self.scripts.pop(path, [])

    def url(self, path: str) -> str:
        scheme = "https" if self.cert_file else "http"
        return f"{scheme}://127.0.0.1:{self.port}{path}"

    @property
    def port(self) -> int:
        return int(self._httpd.server_address[1])

    def requests(self, path: str | None = None, method: str = "GET") -> list[LoggedRequest]:
        with self._lock:
            return [r for r in self.log if (path is None or r.path == path) and r.method == method]

    def bytes_sent(self, path: str | None = None) -> int:
        return sum(r.bytes_sent for r in self.requests(path))

    def clear_log(self, timeout: float = 10.0) -> None:
        """Forget the requests so far, once every response in progress has ended and is logged."""
        with self._lock:
            if not self._idle.wait_for(lambda: self._active == 0, timeout):
                raise AssertionError(f"{self._active} request(s) still being answered after {timeout} s")
            self.log.clear()
            self.started.clear()

    @contextlib.contextmanager
    def _answering(self) -> Iterator[None]:
        """Counts a request from its start until it is logged (see `clear_log`)."""
        with self._lock:
            self._active += 1
        try:
            yield
        finally:
            with self._lock:
                self._active -= 1
                self._idle.notify_all()

    def _next_action(self, path: str) -> str:
        with self._lock:
            queue = self.scripts.get(path)
            return queue.pop(0) if queue else "ok"

    def _record(self, entry: LoggedRequest) -> None:
        with self._lock:
            self.log.append(entry)

    # -- lifecycle ----------------------------------------------------------------------

    def start(self, tls_dir: Path | None = None) -> "FaultyServer":
        server = self
        httpd = _QuietServer(("127.0.0.1", 0), _make_handler(server))
        httpd.daemon_threads = True
        if tls_dir is not None:
            cert, key = make_self_signed_cert(tls_dir)
            context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
            context.load_cert_chain(cert, key)
            httpd.socket = context.wrap_socket(httpd.socket, server_side=True)
            self.cert_file = cert
        self._httpd = httpd
        self._thread = threading.Thread(target=httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        if self._httpd is not None:
            self._httpd.shutdown()
            self._httpd.server_close()
            self._thread.join(timeout=5)
            self._httpd = None

    def __enter__(self) -> "FaultyServer":
        return self if self._httpd is not None else self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


class _QuietServer(ThreadingHTTPServer):
    daemon_threads = True

    def handle_error(self, request: Any, client_address: Any) -> None:
        """Clients hanging up mid-response is what these tests provoke; stay quiet about it."""


def _parse_range(header: str, size: int) -> tuple[int, int] | None:
    """[first, last] of `bytes=a-b` / `bytes=a-`; None when absent or unsatisfiable."""
    if not header.startswith("bytes="):
        return None
    first_s, _, last_s = header[6:].partition("-")
    first = int(first_s)
    last = int(last_s) if last_s else size - 1
    return first, min(last, size - 1)


def _make_handler(server: FaultyServer) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, fmt: str, *args: Any) -> None:  # keep pytest output clean
            pass

        def _status_only(self, status: int, extra: dict[str, str] | None = None) -> None:
            body = f"status {status}\n".encode()
            self.send_response(status)
            for k, v in (extra or {}).items():
                self.send_header(k, v)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            if self.command != "HEAD":
                self.wfile.write(body)
            server._record(LoggedRequest(self.command, self.path, self.headers.get("Range", ""), status, 0,
                                         self._condition()))

        def _condition(self) -> str:
            return self.headers.get("If-Match") or self.headers.get("If-Unmodified-Since") or ""

        def do_HEAD(self) -> None:
            with server._answering():
                self._head()

        def do_GET(self) -> None:
            with server._answering():
                self._get()

        def _head(self) -> None:
            obj = server.objects.get(self.path)
            if obj is None:
                self._status_only(404)
                return
            if not obj.head_allowed:
                self._status_only(405)
                return
            action = server._next_action(f"HEAD {self.path}")
            if action in ("429", "503", "500"):
                self._status_only(int(action), {"Retry-After": "1"} if action != "500" else None)
                return
            self.send_response(200)
            self._object_headers(obj, len(obj.data), whole=True)
            self.end_headers()
            server._record(LoggedRequest("HEAD", self.path, "", 200, 0))

        def _object_headers(self, obj: ServedObject, length: int, whole: bool) -> None:
            self.send_header("Content-Length", str(length))
            self.send_header("Content-Type", "application/octet-stream")
            if obj.etag:
                self.send_header("ETag", obj.etag)
            if obj.last_modified:
                self.send_header("Last-Modified", obj.last_modified)
            self.send_header("Accept-Ranges", "bytes" if obj.accept_ranges else "none")
            if obj.repr_digest:
                self.send_header("Repr-Digest", obj.repr_digest)
            if obj.stored_encoding:
                self.send_header("Content-Encoding", obj.stored_encoding)
            if whole and obj.content_md5:
                self.send_header("Content-MD5", obj.content_md5)

        def _get(self) -> None:
            if self.path.startswith(("http://", "https://")):  # asked as a forward proxy
                with server._lock:
                    server.proxied.append(self.path)
                self.path = "/" + self.path.split("/", 3)[3]
            with server._lock:
                server.started.append(self.path)
            obj = server.objects.get(self.path)
            action, _, then = server._next_action(self.path).partition("+")
            if action in ("500", "503", "429", "404", "403"):
                extra = {"Retry-After": server.get_retry_after} if action in ("429", "503") else None
                self._status_only(int(action), extra)
                return
            if obj is None:
                self._status_only(404)
                return
            if action == "page" or obj.encoding:
                body = b"<html><body>Under maintenance</body></html>" if action == "page" else gzip.compress(obj.data)
                self.send_response(200)
                if obj.encoding:
                    self.send_header("Content-Encoding", obj.encoding)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)
                server._record(LoggedRequest("GET", self.path, self.headers.get("Range", ""), 200, len(body)))
                return
            if action == "chunked-longer":
                self._chunked_longer(obj.data)
                return
            if action == "slow":
                time.sleep(server.stall_s)
            if obj.flapping_etag:
                with server._lock:
                    obj.served += 1
                    obj.etag = f'"v{obj.served}"'
            if_match = self.headers.get("If-Match")
            if if_match and obj.etag and if_match != obj.etag:
                self._status_only(412)
                return
            data = obj.data
            size = len(data)
            wanted = _parse_range(self.headers.get("Range", ""), size) if obj.accept_ranges and action != "ignore-range" else None
            if wanted is not None and wanted[0] >= size and size > 0:
                self._status_only(416, {"Content-Range": f"bytes */{size}"})
                return
            if wanted is not None:
                first, last = wanted
                if action == "to-the-end":
                    last = size - 1
                elif action == "early-start" and first >= 100:
                    first -= 100
                body = data[first : last + 1]
                self.send_response(206)
                self.send_header("Content-Range", f"bytes {first}-{last}/{size}")
                self._object_headers(obj, len(body), whole=False)
                status = 206
            else:
                body = data
                self.send_response(200)
                self._object_headers(obj, len(body), whole=True)
                status = 200
            self.end_headers()
            if action == "corrupt" and body:
                body = bytes([body[0] ^ 0xFF]) + body[1:]
            sent = 0
            try:
                if action in ("reset", "truncate", "stall"):
                    half = body[: len(body) // 2]
                    self.wfile.write(half)
                    self.wfile.flush()
                    sent = len(half)
                    if action == "stall":
                        time.sleep(server.stall_s)
                    self.close_connection = True
                    if action == "reset":  # linger 0: close() sends RST instead of FIN
                        self.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                        self.connection.close()
                else:
                    self._sent = 0
                    self._send(body)
                    sent = self._sent
            except (BrokenPipeError, ConnectionResetError, OSError):
                self.close_connection = True
                sent = max(sent, getattr(self, "_sent", 0))
            finally:
                if then == "change":
                    obj.data = obj.changed_to
                server._record(LoggedRequest("GET", self.path, self.headers.get("Range", ""), status, sent,
                                             self._condition()))

        def _chunked_longer(self, data: bytes) -> None:
            self.send_response(200)
            self.send_header("Transfer-Encoding", "chunked")
            self.end_headers()
            sent = 0
            try:
                for piece in [data, *[bytes(1 << 20)] * 64]:
                    self.wfile.write(b"%x\r\n%s\r\n" % (len(piece), piece))
                    sent += len(piece)
                self.wfile.write(b"0\r\n\r\n")
            except OSError:
                self.close_connection = True
            server._record(LoggedRequest("GET", self.path, self.headers.get("Range", ""), 200, sent))

        def _send(self, body: bytes) -> None:
            if server.rate_bytes_per_s <= 0:
                self.wfile.write(body)
                self._sent = len(body)
                return
            block = 65536
            for start in range(0, len(body), block):
                piece = body[start : start + block]
                self.wfile.write(piece)
                self._sent += len(piece)
                time.sleep(len(piece) / server.rate_bytes_per_s)

    return Handler


def make_self_signed_cert(directory: Path) -> tuple[Path, Path]:
    """A certificate for 127.0.0.1/localhost and its key, valid for a day."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "trajflow-test")])
    now = dt.datetime.now(dt.timezone.utc)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=1))
        .add_extension(
            x509.SubjectAlternativeName([x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
            critical=False,
        )
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    directory.mkdir(parents=True, exist_ok=True)
    cert_path, key_path = directory / "cert.pem", directory / "key.pem"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(
        key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    )
    return cert_path, key_path


def payload(size: int, seed: int = 0) -> bytes:
    """Deterministic incompressible bytes (a misplaced range can never go unnoticed)."""
    return random.Random(seed).randbytes(size)


def visible_files(root: Path) -> dict[str, bytes]:
    """Every file under `root` a reader would see (hidden internal names excluded)."""
    out = {}
    for path in sorted(root.rglob("*")):
        rel = path.relative_to(root)
        if path.is_file() and not any(part.startswith(".trajflow-") for part in rel.parts):
            out[rel.as_posix()] = path.read_bytes()
    return out


def hidden_files(root: Path) -> list[str]:
    """Temporaries and journals left under `root` (the records directory aside)."""
    return sorted(
        p.relative_to(root).as_posix()
        for p in root.rglob(".trajflow-tmp-*")
        if p.is_file()
    )
