"""HTTP(S) GETs with ranges, validators and error classification, on urllib3.

Why urllib3 rather than `http.client` or `requests`: it is already in the downloader image
(botocore depends on it), it pools keep-alive connections safely across threads, and it
enforces Content-Length; `requests` would add a dependency for nothing we use. Its own
retries and redirects are off: the callers retry (`transfer` the fetches, with metrics;
`failures.call_with_retries` the planning requests), and redirects are followed here so an
Authorization header never leaks to another host (or to plain http).

Requests ask for `Accept-Encoding: identity` and bodies are never decoded: the bytes stored
are the bytes the source's checksums describe, and byte ranges stay meaningful.
"""
from __future__ import annotations

import contextlib
import functools
import http.client
import re
import socket
import ssl
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Mapping
from urllib.parse import unquote_plus, urljoin, urlsplit

from trajflow import __version__
from trajflow.download.failures import FetchError, Kind, classify_status, parse_retry_after

USER_AGENT = f"trajflow-downloader/{__version__}"
MAX_REDIRECTS = 5
# Low-speed limit: a body delivering fewer than LOW_SPEED_BYTES over a window is dropped
# (TRANSIENT timeout; the retry resumes from the bytes received). The read timeout alone
# never fires on a server trickling a byte a second. The window is LOW_SPEED_FACTOR times
# the read timeout (`timeoutSeconds`: what the user tolerates without a byte), but never
# under LOW_SPEED_MIN_S, so a short timeout meant to fail connects fast does not cut a
# slow but live link: 1 KiB a minute is far below any real one.
LOW_SPEED_BYTES = 1024
LOW_SPEED_FACTOR = 2.0
LOW_SPEED_MIN_S = 60.0
_CONTENT_RANGE = re.compile(r"^\s*bytes\s+(\d+)-(\d+)/(\d+|\*)\s*$", re.IGNORECASE)


@dataclass(frozen=True)
class Validator:
    """Identifies one version of an object so every range of it comes from that version."""

    etag: str = ""  # as sent by the server, quotes included
    last_modified: str = ""

    def headers(self) -> dict[str, str]:
        if self.etag and not self.etag.startswith("W/"):
            return {"If-Match": self.etag}  # strong comparison: weak ETags cannot be used
        if self.last_modified:
            return {"If-Unmodified-Since": self.last_modified}
        return {}

    @property
    def tag(self) -> str:
        return self.etag or self.last_modified

    def same_version(self, other: "Validator") -> bool:
        """Whether `other` (a response's) names this version, judged by what both carry;
        True when they share nothing to compare."""
        if self.last_modified and other.last_modified:
            return self.last_modified == other.last_modified
        if self.etag and other.etag:
            return self.etag == other.etag
        return True


@dataclass
class Body:
    """An open response body for bytes [start, start + length) of an object."""

    start: int
    length: int | None  # None: unknown until the end (chunked, whole object)
    total: int | None  # size of the whole object when known
    ranged: bool  # False: the server sent the whole object from byte 0
    validator: Validator
    headers: Mapping[str, str] = field(default_factory=dict)
    _resp: Any = None
    _fh: Any = None
    _url: str = ""
    low_speed_window: float | None = None  # seconds (None: no low-speed limit)
    _window_waited: float = 0.0  # seconds spent waiting for the server in this window
    _window_bytes: int = 0

    def read(self, n: int) -> bytes:
        try:
            if self._resp is not None:
                # read1: what has arrived, so bytes before a broken connection are never lost
                asked = time.monotonic()
                data = self._resp.read1(n, decode_content=False)
                self._check_speed(len(data), time.monotonic() - asked)
                return data  # type: ignore[no-any-return]
            return self._fh.read(n)  # type: ignore[no-any-return]
        except FetchError:
            raise
        except OSError as exc:
            if self._resp is None:
                raise FetchError(f"{self._url}: read failed: {exc}", Kind.TRANSIENT, "source_io") from None
            raise network_error(exc, self._url) from None
        except Exception as exc:  # urllib3's own exception types
            raise network_error(exc, self._url) from None

    def _check_speed(self, n: int, waited: float) -> None:
        """Count only the time spent waiting for the server: a consumer busy between reads
        (hashing, uploading parts) is no slow server."""
        if self.low_speed_window is None or not n:
            return
        self._window_waited += waited
        self._window_bytes += n
        if self._window_waited >= self.low_speed_window:
            if self._window_bytes < LOW_SPEED_BYTES:
                raise FetchError(f"{redact(self._url)}: fewer than {LOW_SPEED_BYTES} bytes in "
                                 f"{self.low_speed_window:.0f} s: too slow", Kind.TRANSIENT, "timeout")
            self._window_waited, self._window_bytes = 0.0, 0

    def close(self, reusable: bool = False) -> None:
        """Return the connection to the pool only after a body was read to its end."""
        if self._resp is not None:
            if reusable:
                self._resp.drain_conn()
                self._resp.release_conn()
            else:
                self._resp.close()
                self._resp.release_conn()
            self._resp = None
        if self._fh is not None:
            self._fh.close()
            self._fh = None


@functools.lru_cache(maxsize=None)
def _pool_classes(header_deadline_s: float) -> dict[str, type]:
    """urllib3 connection pools whose connections give a response `header_deadline_s` seconds
    to complete its status line and headers, then shut the socket down. The read timeout is
    per recv: a server sending its headers a byte at a time held a try for ever. (A proxy's
    answer to CONNECT is read while connecting, outside this deadline.)"""
    import urllib3.connection as uc
    import urllib3.connectionpool as ucp
    import urllib3.exceptions as ux

    class HeadersTooSlow(ux.TimeoutError):
        """Not an OSError: urllib3 would report it as a plain read timeout."""

    class Deadline:
        def getresponse(self) -> Any:  # type: ignore[misc]
            lock, state = threading.Lock(), {"waiting": True, "cut": False}

            def cut() -> None:
                with lock:
                    if state["waiting"]:
                        state["cut"] = True
                        with contextlib.suppress(OSError, AttributeError):
                            self.sock.shutdown(socket.SHUT_RDWR)  # type: ignore[attr-defined]

            timer = threading.Timer(header_deadline_s, cut)
            timer.daemon = True
            timer.start()
            try:
                return super().getresponse()  # type: ignore[misc]
            except Exception:
                if state["cut"]:
                    raise HeadersTooSlow(f"response headers not complete within {header_deadline_s:g} s") from None
                raise
            finally:
                with lock:
                    state["waiting"] = False
                timer.cancel()

    class HTTPConnection(Deadline, uc.HTTPConnection):
        pass

    class HTTPSConnection(Deadline, uc.HTTPSConnection):
        pass

    class HTTPConnectionPool(ucp.HTTPConnectionPool):
        ConnectionCls = HTTPConnection

    class HTTPSConnectionPool(ucp.HTTPSConnectionPool):
        ConnectionCls = HTTPSConnection

    return {"http": HTTPConnectionPool, "https": HTTPSConnectionPool}


def _tls_context(ca_bundle: str) -> ssl.SSLContext:
    """The system's trust (or `caBundle`), checked as botocore checks an S3 source's: Python
    3.13's default context also turns on VERIFY_X509_STRICT, which refuses many private CAs
    (no keyUsage, a basicConstraints not marked critical) that S3 sources and older Pythons
    accept."""
    context = ssl.create_default_context(cafile=ca_bundle or None)
    context.verify_flags &= ~ssl.VERIFY_X509_STRICT
    return context


def network_error(exc: BaseException, url: str) -> FetchError:
    """Map a urllib3/socket/ssl exception to a FetchError."""
    import urllib3.exceptions as ux

    if isinstance(exc, ux.MaxRetryError) and exc.reason is not None:
        exc = exc.reason
    where = redact(url)
    text = str(exc)
    if isinstance(exc, (ux.SSLError, ssl.SSLError)):
        if "CERTIFICATE_VERIFY_FAILED" in text or "hostname" in text.lower() or isinstance(exc, ssl.SSLCertVerificationError):
            return FetchError(f"{where}: TLS certificate not trusted: {text} (set caBundle for private CAs)", Kind.PERMANENT, "tls")
        return FetchError(f"{where}: TLS error: {text}", Kind.TRANSIENT, "tls")
    if isinstance(exc, ux.NewConnectionError):  # before the timeouts: it subclasses ConnectTimeoutError
        return FetchError(f"{where}: cannot connect: {text}", Kind.TRANSIENT, "connection")
    if isinstance(exc, (ux.TimeoutError, socket.timeout, TimeoutError)):
        return FetchError(f"{where}: timed out: {text}", Kind.TRANSIENT, "timeout")
    if isinstance(exc, ux.ProtocolError):
        inner = exc.args[1] if len(exc.args) > 1 else None
        if isinstance(inner, http.client.IncompleteRead) or "IncompleteRead" in text:
            return FetchError(f"{where}: body ended early: {text}", Kind.TRANSIENT, "truncated")
        return FetchError(f"{where}: connection broken: {text}", Kind.TRANSIENT, "connection")
    if isinstance(exc, (ux.LocationValueError, ux.LocationParseError)):
        return FetchError(f"{where}: unusable URL: {text}", Kind.PERMANENT, "client_error")
    if isinstance(exc, http.client.IncompleteRead):
        return FetchError(f"{where}: body ended early: {text}", Kind.TRANSIENT, "truncated")
    if isinstance(exc, (ux.HTTPError, http.client.HTTPException, OSError)):
        return FetchError(f"{where}: connection failed: {type(exc).__name__}: {text}", Kind.TRANSIENT, "connection")
    return FetchError(f"{where}: unexpected error: {type(exc).__name__}: {text}", Kind.TRANSIENT, "connection")


def redact(url: str) -> str:
    """A URL fit for logs and errors: presigned query strings and user:password@ carry
    credentials."""
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https"):  # s3:// and file:// name objects and files: '?' and '#' are theirs
        return url
    host = parts.netloc.rpartition("@")[2]
    return f"{parts.scheme}://{host}{parts.path}" + ("?…" if parts.query else "")


def parse_content_range(value: str | None) -> tuple[int, int, int | None] | None:
    """(first, last, total) of `bytes first-last/total`; total None for `*`."""
    if not value:
        return None
    m = _CONTENT_RANGE.match(value)
    if not m:
        return None
    total = None if m.group(3) == "*" else int(m.group(3))
    return int(m.group(1)), int(m.group(2)), total


def _request_secrets(urls: list[str], headers: Mapping[str, str]) -> list[str]:
    """What a request to `urls` (it and its redirects) carries that an error body echoing it
    must not repeat: each query, its values (raw and decoded), passwords and the
    Authorization header's value; longest first."""
    found = []
    for url in urls:
        parts = urlsplit(url)
        found += [parts.query, parts.password or ""]
        for pair in parts.query.split("&"):
            value = pair.partition("=")[2]
            found += [value, unquote_plus(value)]
    for name, value in headers.items():
        if name.lower() == "authorization":
            found += [value, value.partition(" ")[2]]
    return sorted({s for s in found if len(s) >= 4}, key=len, reverse=True)


def _error_detail(resp: Any, secrets: list[str]) -> str:
    """A short hint from an error body (S3 XML <Code>, or the first line of text), with any of
    `secrets` a server or proxy echoes back masked."""
    try:
        # one read: a body trickling in byte by byte would hold read(4096) for an hour
        raw = resp.read1(4096, decode_content=False)
    except Exception:
        return ""
    text = raw.decode("utf-8", "replace")
    code = re.search(r"<Code>([^<]+)</Code>", text)
    first = code.group(1) if code else (text.strip().splitlines()[0] if text.strip() else "")
    for secret in secrets:
        first = first.replace(secret, "…")
    return first[:120]


class HttpClient:
    """Thread-safe GET/HEAD with one pool of keep-alive connections per host.

    HTTP_PROXY / HTTPS_PROXY / NO_PROXY from the environment are honoured, as boto3 does
    for the listings, so clusters with an egress proxy need no extra settings.
    """

    def __init__(self, timeout_s: float = 60.0, max_connections: int = 16, ca_bundle: str = ""):
        import urllib3
        from urllib.request import getproxies

        self.timeout_s = timeout_s
        self.low_speed_window = max(LOW_SPEED_FACTOR * timeout_s, LOW_SPEED_MIN_S)
        # headers: the read timeout's wait for their first byte, then one low-speed window
        self._pool_classes = _pool_classes(timeout_s + self.low_speed_window)
        self._options: dict[str, Any] = {
            "num_pools": 64,
            "maxsize": max_connections,
            "block": False,
            "retries": False,
            "timeout": urllib3.Timeout(connect=timeout_s, read=timeout_s),
            "ssl_context": _tls_context(ca_bundle),
        }
        self._pool = self._with_deadline(urllib3.PoolManager(**self._options))
        self._proxy_urls = {k: v for k, v in getproxies().items() if k in ("http", "https") and v}
        self._proxies: dict[str, Any] = {}
        self._bypass: dict[str, bool] = {}
        self._lock = threading.Lock()

    def _manager(self, url: str) -> Any:
        """The pool for `url`: direct, or through the environment's proxy for its scheme."""
        if not self._proxy_urls:
            return self._pool
        from urllib.request import proxy_bypass

        parts = urlsplit(url)
        proxy = self._proxy_urls.get(parts.scheme)
        host = parts.hostname or ""
        if not proxy:
            return self._pool
        with self._lock:
            if host not in self._bypass:
                self._bypass[host] = bool(proxy_bypass(host))
            if self._bypass[host]:
                return self._pool
            if proxy not in self._proxies:
                import urllib3

                self._proxies[proxy] = self._with_deadline(urllib3.ProxyManager(proxy, **self._options))
            return self._proxies[proxy]

    def _with_deadline(self, manager: Any) -> Any:
        manager.pool_classes_by_scheme = self._pool_classes
        return manager

    def request(self, method: str, url: str, headers: Mapping[str, str] | None = None,
                visited: list[str] | None = None) -> Any:
        """Send one request, following redirects; returns the urllib3 response (body unread).
        Raises FetchError for network failures; HTTP error statuses are returned. `visited`
        gets every URL asked (a redirect's target may carry a signed query of its own)."""
        headers = {"User-Agent": USER_AGENT, "Accept-Encoding": "identity", **(headers or {})}
        origin = urlsplit(url)[:2]  # scheme and host:port
        for _ in range(MAX_REDIRECTS + 1):
            if visited is not None:
                visited.append(url)
            try:
                resp = self._manager(url).request(
                    method, url, headers=headers, preload_content=False, decode_content=False,
                    redirect=False, retries=False,
                )
            except Exception as exc:
                raise network_error(exc, url) from None
            if resp.status in (301, 302, 303, 307, 308) and resp.headers.get("Location"):
                # closed, not drained: a redirect's body could be endless, or trickle in
                resp.close()
                resp.release_conn()
                try:
                    location = urljoin(url, resp.headers["Location"])
                    target = urlsplit(location)[:2]
                except ValueError as exc:
                    raise FetchError(f"{redact(url)}: redirected to an unusable location ({exc})", Kind.PERMANENT,
                                     "client_error") from None
                # another host, or https -> http (the token would travel in cleartext)
                if target != origin:
                    headers = {k: v for k, v in headers.items() if k.lower() != "authorization"}
                url = location
                continue
            return resp
        raise FetchError(f"{redact(url)}: more than {MAX_REDIRECTS} redirects", Kind.PERMANENT, "client_error")

    def head(self, url: str, headers: Mapping[str, str] | None = None) -> tuple[int, Mapping[str, str]]:
        """(status, headers) of a HEAD request; servers that refuse HEAD get a 1-byte GET.

        A 403 counts as a refusal too: a presigned URL (S3, GCS, Azure SAS) signs the method,
        so its HEAD is forbidden while the GET it was made for is allowed."""
        from urllib3 import HTTPHeaderDict

        resp = self.request("HEAD", url, headers)
        try:
            status, hdrs = resp.status, HTTPHeaderDict(resp.headers)
            resp.drain_conn()  # the connection is reusable only once the response is closed
        finally:
            resp.release_conn()
        if status in (403, 405, 501):
            resp = self.request("GET", url, {**(headers or {}), "Range": "bytes=0-0"})
            try:
                status, hdrs = resp.status, HTTPHeaderDict(resp.headers)
                parsed = parse_content_range(hdrs.get("Content-Range"))
                if status == 206:
                    # the Content-Length is the one byte asked for: the size is the range's
                    # total, or unknown (`bytes 0-0/*`)
                    hdrs.pop("Content-Length", None)
                    if parsed and parsed[2] is not None:
                        hdrs["Content-Length"] = str(parsed[2])
                        hdrs["Accept-Ranges"] = "bytes"
                    status = 200
            finally:
                resp.close()
                resp.release_conn()
        return status, hdrs

    def get(self, url: str, start: int = 0, end: int | None = None, validator: Validator | None = None,
            headers: Mapping[str, str] | None = None) -> Body:
        """Open bytes [start, end) (end None: to the end) of `url`.

        A 200 to a request starting past byte 0, or a 206 for another range than the one
        asked for, means the server ignores ranges (RESTART); a 206 for a fragment to a request
        without a range is a server fault (TRANSIENT: retried, bounded);
        412/416 mean the object changed (RESTART); other error statuses are classified.
        """
        req = dict(headers or {})
        if start > 0 or end is not None:
            req["Range"] = f"bytes={start}-{'' if end is None else end - 1}"
        if validator is not None:
            req.update(validator.headers())
        visited: list[str] = []
        resp = self.request("GET", url, req, visited)
        hdrs = resp.headers
        where = redact(url)
        try:
            status = resp.status
            problem = classify_status(status)
            if problem is not None:
                kind, reason = problem
                detail = _error_detail(resp, _request_secrets(visited, req))
                retry_after = parse_retry_after(hdrs.get("Retry-After"))
                raise FetchError(
                    f"{where}: HTTP {status}{' ' + detail if detail else ''}", kind, reason, retry_after=retry_after, status=status
                )
            current = Validator(hdrs.get("ETag", ""), hdrs.get("Last-Modified", ""))
            length_header = hdrs.get("Content-Length")
            length = int(length_header) if length_header and length_header.isdigit() else None
            if status == 206:
                parsed = parse_content_range(hdrs.get("Content-Range"))
                if parsed is None:
                    raise FetchError(f"{where}: 206 without a usable Content-Range", Kind.TRANSIENT, "server_error", status=status)
                first, last, total = parsed
                if start == 0 and end is None and first != 0:
                    # no range was asked for: a cache serving one stored fragment to every
                    # request, which asking again from byte 0 cannot fix (a failed try, bounded)
                    raise FetchError(f"{where}: server answers 206 bytes {first}-{last} to a request for the whole "
                                     "object", Kind.TRANSIENT, "server_error", status=status)
                if first == start and end is not None and last > end - 1:
                    # the start honoured, the end not: parts would overlap, one stream does not
                    raise FetchError(f"{where}: asked for bytes {start}-{end - 1}, got {first}-{last}: the server "
                                     "ignores where byte ranges end", Kind.RESTART, "no_ranges", status=status)
                if first != start:
                    # as a server that ignores ranges: asking again gets the same answer, one
                    # stream from byte 0 needs none
                    raise FetchError(
                        f"{where}: asked for bytes {start}-{'' if end is None else end - 1}, got {first}-{last}: the "
                        "server does not honour byte ranges", Kind.RESTART, "no_ranges", status=status,
                    )
                return Body(start, last - first + 1, total, True, current, hdrs, _resp=resp, _url=url,
                            low_speed_window=self.low_speed_window)
            if start > 0:
                raise FetchError(f"{where}: the server ignores byte ranges", Kind.RESTART, "no_ranges", status=status)
            # the whole object, from byte 0
            return Body(0, length, length, False, current, hdrs, _resp=resp, _url=url, low_speed_window=self.low_speed_window)
        except BaseException:
            resp.close()
            resp.release_conn()
            raise
