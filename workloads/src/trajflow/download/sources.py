"""Sources: list them into plan items, and open byte ranges of those items.

Every item's key is `<source name>/<relative path>`; it lands at `raw/<shard>/<key>`.

- `s3`: list_objects_v2 under `s3://bucket/prefix/` (a prefix naming one object fetches
  that object), include/exclude globs on the path below the prefix; a key that cannot be
  a path (`a//b`, `./c`, a backslash) is a ConfigError naming it, until excluded. Objects are fetched with
  presigned GETs over the same HTTP client as every other source, so retries, ranges,
  validators and resume work the same everywhere; credentials come from the standard AWS
  chain, or from `<credentialsEnvPrefix>AWS_ACCESS_KEY_ID`/`..._SECRET_ACCESS_KEY`/
  `..._SESSION_TOKEN` so each source can have its own Secret.
- `https`: an explicit URL list; a HEAD per URL (skipped when the size is configured)
  learns the size for byte balancing, the ETag/Last-Modified and range support. The
  planned size and version are authoritative: a response of another size fails the item
  (permanently when the size is configured); the first GET asks for the version planning
  saw (If-Unmodified-Since, or If-Match without a Last-Modified) and its response must
  name it. A `Content-Encoding` response of another size than planned (compressed on the
  fly) fails. A 200 `text/html` (or XHTML) answer for an item not named `.htm`/`.html` (a
  maintenance page, a captive portal) is a transient server error, on HEAD and on GET: it
  is neither sized in the plan nor stored.
- `catalog`: a hub such as UCSC Xena: cohorts x categories through a URL template; each
  item lands at `<name>/<cohort>/<file name>` so cohorts never overwrite each other.
  Checksums the hub lists can be given per `<cohort>/<file name>`.
- `file`: a local directory or file (`/path` or `file:///path` (with `#` and `?` percent-encoded)).

Glob patterns: `*` and `?` stay within one path segment, `**` spans segments; a pattern
without `/` matches the file name at any depth (`*.parquet`), one with `/` matches the
whole relative path (`episodes/**/*.h5`).
"""
from __future__ import annotations

import abc
import errno
import logging
import os
import posixpath
import re
import stat as stat_mod
from pathlib import Path
from typing import Any, Callable, Iterable
from urllib.parse import unquote, urlsplit

from trajflow.config.download import CatalogSource, DownloadConfig, FileSource, HttpsSource, S3Source, UrlItem
from trajflow.download.failures import Backoff, FetchError, Kind, call_with_retries, parse_retry_after
from trajflow.download.http import Body, HttpClient, Validator, redact
from trajflow.download.verify import Expected, declared_checksums, header_checksums, s3_etag_md5
from trajflow.errors import ConfigError, TransientError
from trajflow.plan import Item
from trajflow.storage.base import check_key
from trajflow.storage.s3 import error_code, http_status, is_not_found, make_client
from trajflow.threads import ordered_map

log = logging.getLogger(__name__)

PRESIGN_EXPIRY_S = 3600


# ---- globs ----------------------------------------------------------------------------


def glob_regex(pattern: str) -> re.Pattern[str]:
    """Compile a glob (`*`, `?`, `[...]`, `**`) into a regex over '/'-separated paths."""
    out, i = [], 0
    while i < len(pattern):
        c = pattern[i]
        if pattern.startswith("**/", i):
            out.append("(?:.*/)?")
            i += 3
        elif pattern.startswith("**", i):
            out.append(".*")
            i += 2
        elif c == "*":
            out.append("[^/]*")
            i += 1
        elif c == "?":
            out.append("[^/]")
            i += 1
        elif c == "[":
            close = pattern.find("]", i + 2 if pattern[i + 1 : i + 2] in ("!", "]") else i + 1)
            if close < 0:
                out.append(re.escape(c))
                i += 1
            else:
                body = pattern[i + 1 : close]
                if body.startswith("!"):
                    body = "^" + body[1:]
                out.append(f"[{body.replace(chr(92), chr(92) * 2)}]")
                i = close + 1
        else:
            out.append(re.escape(c))
            i += 1
    try:
        return re.compile("".join(out) + r"\Z", re.DOTALL)  # a newline is a character of a name like any other
    except re.error as exc:
        raise ConfigError(f"invalid glob pattern {pattern!r}: {exc}") from None


def _first_few(names: list[str]) -> str:
    """Names for an error message, escaped (names may hold newlines or undecodable bytes)."""
    return ", ".join(ascii(n) for n in names[:5]) + (f" and {len(names) - 5} more" if len(names) > 5 else "")


class PathFilter:
    """include/exclude globs over relative paths."""

    def __init__(self, include: Iterable[str], exclude: Iterable[str]):
        self._include = [(("/" in p), glob_regex(p)) for p in include]
        self._exclude = [(("/" in p), glob_regex(p)) for p in exclude]

    @staticmethod
    def _matches(rules: list[tuple[bool, re.Pattern[str]]], path: str) -> bool:
        name = path.rsplit("/", 1)[-1]
        return any(rx.match(path if has_slash else name) for has_slash, rx in rules)

    def __call__(self, path: str) -> bool:
        return self._matches(self._include, path) and not self._matches(self._exclude, path)


# ---- sources --------------------------------------------------------------------------


class HttpClients:
    """One HttpClient per CA bundle, shared by the sources that use it."""

    def __init__(self, timeout_s: float, max_connections: int):
        self.timeout_s, self.max_connections = timeout_s, max_connections
        self._clients: dict[str, HttpClient] = {}

    def get(self, ca_bundle: str, source: str) -> HttpClient:
        if ca_bundle not in self._clients:
            if ca_bundle and not os.path.isfile(ca_bundle):
                raise ConfigError(f"source {source!r}: caBundle {ca_bundle!r} is not a readable file (mount it into the pod)")
            try:
                self._clients[ca_bundle] = HttpClient(self.timeout_s, self.max_connections, ca_bundle)
            except (OSError, ValueError) as exc:
                raise ConfigError(f"source {source!r}: cannot load caBundle {ca_bundle!r}: {exc}") from None
        return self._clients[ca_bundle]


class SourceRuntime(abc.ABC):
    """A configured source, ready to list and to open byte ranges."""

    def __init__(self, name: str, required: bool):
        self.name, self.required = name, required

    @abc.abstractmethod
    def list_items(self, retry: Callable[[Callable[[], Any]], Any], workers: int) -> list[Item]:
        """Every item of this source (keys `<name>/<path>`)."""

    @abc.abstractmethod
    def open(self, item: Item, start: int, end: int | None, validator: Validator | None) -> Body:
        """Bytes [start, end) of the item; raises FetchError."""

    def expected(self, item: Item, body: Body) -> Expected:
        """Checksums of the whole item: configured ones plus those the response declares."""
        found = declared_checksums(item)
        found.merge(header_checksums(body.headers, whole_body=not body.ranged))
        return found

    def supports_ranges(self, item: Item) -> bool | None:
        return True

    def planned_validator(self, item: Item) -> Validator | None:
        """The version of the item that planning saw (None: unknown)."""
        return None

    def confirm_planned(self, item: Item) -> Validator | None:
        """After the source refused the planned validator: another validator for the same
        planned version, when the source's metadata proves the object unchanged (None: it
        changed, or nothing can tell)."""
        return None

    def _key(self, rel: str, where: str) -> str:
        key = f"{self.name}/{rel}"
        try:
            check_key(key)
        except ValueError:
            raise ConfigError(f"source {self.name!r}: {where} gives the unusable path {rel!r}") from None
        if any(part.startswith(".trajflow-") for part in key.split("/")):
            raise ConfigError(f"source {self.name!r}: {where} gives a path with a reserved '.trajflow-' segment: {rel!r}")
        return key


def _url_file_name(url: str) -> str:
    return posixpath.basename(unquote(urlsplit(url).path))


HTML_TYPES = ("text/html", "application/xhtml+xml")
HTML_NAMES = (".htm", ".html", ".xhtml")


def html_instead(name: str, url: str, headers: Any) -> FetchError | None:
    """An HTML page where the item is no page (a maintenance page, a captive portal, a login
    form) answering 200: a passing server fault, never stored or sized as the item."""
    ctype = (headers.get("Content-Type") or "").split(";", 1)[0].strip().lower()
    if ctype not in HTML_TYPES or name.lower().endswith(HTML_NAMES) or _url_file_name(url).lower().endswith(HTML_NAMES):
        return None  # a page asked for, under its own name or another path
    return FetchError(f"{redact(url)}: server sent an HTML page ({ctype}) instead of {name}", Kind.TRANSIENT,
                      "server_error")


class HttpSource(SourceRuntime):
    """URLs (explicit, or expanded from a catalog)."""

    def __init__(self, name: str, required: bool, client: HttpClient, entries: list[dict[str, Any]], auth_token_env: str):
        super().__init__(name, required)
        self.client = client
        self.entries = entries  # {url, path, sha256, md5, size, origin}
        self._headers: dict[str, str] = {}
        if auth_token_env:
            token = os.environ.get(auth_token_env)
            if not token:
                raise ConfigError(f"source {name!r}: authTokenEnv names {auth_token_env!r}, which is not set in the environment")
            self._headers["Authorization"] = f"Bearer {token}"
        seen: dict[str, str] = {}
        for entry in entries:
            key = self._key(entry["path"], redact(entry["url"]))
            if key in seen:
                raise ConfigError(
                    f"source {name!r}: {redact(seen[key])} and {redact(entry['url'])} would both be stored as {key!r}; give one a `path`"
                )
            seen[key] = entry["url"]

    def _probe(self, entry: dict[str, Any], retry: Callable[[Callable[[], Any]], Any]) -> Item:
        meta: dict[str, Any] = {}
        if entry.get("sha256"):
            meta["sha256"] = entry["sha256"]
        if entry.get("md5"):
            meta["md5"] = entry["md5"]
        if meta:
            meta["checksum_origin"] = entry["origin"]
        key = self._key(entry["path"], redact(entry["url"]))
        if entry.get("size") is not None:
            # a size the user declared is enforced as such (a mismatch is permanent)
            return Item(key, int(entry["size"]), entry["url"], {**meta, "size_origin": "config"})

        def head() -> tuple[int, Any]:
            status, headers = self.client.head(entry["url"], self._headers)
            if status >= 500 or status in (408, 425, 429):
                raise FetchError(f"{redact(entry['url'])}: HTTP {status}", Kind.TRANSIENT, "server_error",
                                 retry_after=parse_retry_after(headers.get("Retry-After")), status=status)
            page = html_instead(key, entry["url"], headers) if status < 300 else None
            if page is not None:
                raise page  # retried; a lasting one plans an unknown size, never the page's
            return status, headers

        try:
            status, headers = retry(head)
        except FetchError as exc:
            throttled = exc.status == 429 or (exc.status == 503 and exc.retry_after is not None)
            if throttled and self.required:
                # busy, not broken: an unknown size in the plan would outlive the rush (no byte
                # balancing, no parts, no pinning for as long as this plan is used)
                raise TransientError(f"source {self.name!r}: {redact(entry['url'])} answered HEAD with HTTP "
                                     f"{exc.status} on every try while planning; the pod plans again when retried") from None
            log.warning("cannot size %s while planning (%s); it is planned with an unknown size", redact(entry["url"]), exc)
            return Item(key, 0, entry["url"], {**meta, "size_known": False})
        if status >= 400:
            # planned anyway: the download reports it with the right outcome (missing/permanent)
            log.warning("HEAD %s answered HTTP %d while planning", redact(entry["url"]), status)
            return Item(key, 0, entry["url"], {**meta, "size_known": False})
        length = headers.get("Content-Length")
        if length and length.isdigit() and int(length) > 0:
            size = int(length)
        else:
            # 0 is what many dynamic endpoints say to a HEAD whatever they serve: trusted, it
            # would fail every download of a non-empty file with a size mismatch. An empty file
            # planned with an unknown size still downloads.
            size, meta["size_known"] = 0, False
        if headers.get("ETag"):
            meta["etag"] = headers["ETag"]
        if headers.get("Last-Modified"):
            meta["last_modified"] = headers["Last-Modified"]
        ranges = (headers.get("Accept-Ranges") or "").lower()
        if ranges == "bytes":
            meta["ranges"] = True
        elif ranges == "none":
            meta["ranges"] = False
        return Item(key, size, entry["url"], meta)

    def list_items(self, retry: Callable[[Callable[[], Any]], Any], workers: int) -> list[Item]:
        # a stop does not wait for the HEADs in flight (each up to timeoutSeconds)
        return list(ordered_map(lambda e: self._probe(e, retry), self.entries, max(1, min(workers, 16)),
                                lookahead=len(self.entries), name=f"head-{self.name}"))

    def open(self, item: Item, start: int, end: int | None, validator: Validator | None) -> Body:
        body = self.client.get(item.source, start, end, validator, self._headers)
        page = html_instead(item.key, item.source, body.headers)
        if page is not None:
            body.close()
            raise page
        # identity was asked for: bytes a proxy compressed on the fly are not the file (nor what
        # its checksums or ranges describe). A file stored compressed (an S3 object with
        # Content-Encoding metadata, a static .gz) has that header whatever is asked, and keeps
        # the size planning saw: those bytes are the file.
        encoding = body.headers.get("Content-Encoding", "").strip().lower()
        sized_as_planned = item.meta.get("size_known", True) and body.total == item.size
        if encoding not in ("", "identity") and not sized_as_planned:
            body.close()
            raise FetchError(
                f"{redact(item.source)}: the server answered with Content-Encoding: {encoding} although identity was asked "
                f"for (a proxy or CDN compressing on the fly?); link the compressed file itself instead",
                Kind.PERMANENT, "gzip",
            )
        return body

    def supports_ranges(self, item: Item) -> bool | None:
        value = item.meta.get("ranges")
        return None if value is None else bool(value)

    def planned_validator(self, item: Item) -> Validator | None:
        # Last-Modified when known: nodes behind one load balancer can disagree on ETags
        # (e.g. inode-based ones) while serving the same version
        if item.meta.get("last_modified"):
            return Validator(last_modified=str(item.meta["last_modified"]))
        return Validator(etag=str(item.meta["etag"])) if item.meta.get("etag") else None


def https_source(cfg: HttpsSource, clients: HttpClients) -> HttpSource:
    entries = []
    for spec in cfg.urls:
        item = spec if isinstance(spec, UrlItem) else UrlItem(url=spec)
        path = item.path or _url_file_name(item.url)
        if not path:
            raise ConfigError(f"source {cfg.name!r}: {item.url} has no file name; give it a `path`")
        entries.append({"url": item.url, "path": path, "sha256": item.sha256, "md5": item.md5, "size": item.size, "origin": "config"})
    return HttpSource(cfg.name, cfg.required, clients.get(cfg.ca_bundle, cfg.name), entries, cfg.auth_token_env)


def catalog_entries(cfg: CatalogSource) -> list[dict[str, Any]]:
    """cohorts x categories -> URL entries landing at `<cohort>/<file name>`."""
    entries = []
    for cohort in cfg.cohorts:
        for category, file_part in cfg.categories.items():
            file_name = file_part.format(cohort=cohort, category=category)
            url = cfg.url_template.format(cohort=cohort, category=category, file=file_name)
            name = _url_file_name(url)
            if not name:
                raise ConfigError(f"source {cfg.name!r}: {redact(url)} (cohort {cohort}, category {category}) has no file name")
            rel = f"{cohort}/{name}"
            digest = cfg.checksums.get(rel, "")
            entries.append({
                "url": url, "path": rel, "size": None, "origin": "catalog", "category": category,
                "sha256": digest if len(digest) == 64 else "", "md5": digest if len(digest) == 32 else "",
            })
    unknown = sorted(set(cfg.checksums) - {e["path"] for e in entries})
    if unknown:
        raise ConfigError(
            f"source {cfg.name!r}: checksums given for paths the catalog does not produce: {', '.join(unknown[:5])} "
            f"(paths are <cohort>/<file name>)"
        )
    return entries


def catalog_source(cfg: CatalogSource, clients: HttpClients) -> HttpSource:
    return HttpSource(cfg.name, cfg.required, clients.get(cfg.ca_bundle, cfg.name), catalog_entries(cfg), cfg.auth_token_env)


class S3SourceRuntime(SourceRuntime):
    def __init__(self, cfg: S3Source, clients: HttpClients, max_connections: int, timeout_s: float):
        super().__init__(cfg.name, cfg.required)
        self.cfg = cfg
        # taken literally, as S3 takes keys ('#', '?' and '//' are characters of a key); the
        # schema's pattern has checked the form
        bucket, _, prefix = cfg.url[len("s3://"):].partition("/")
        self.bucket, self.prefix = bucket, prefix.strip("/")
        self.filter = PathFilter(cfg.include, cfg.exclude)
        self.http = clients.get(cfg.ca_bundle, cfg.name)
        self.client = make_client(cfg.endpoint, cfg.region, cfg.addressing_style, anonymous=cfg.anonymous,
                                  max_pool=max_connections, timeout=timeout_s, attempts=5,
                                  credentials=self._credentials(), verify=cfg.ca_bundle)

    def _credentials(self) -> dict[str, str]:
        prefix = self.cfg.credentials_env_prefix
        if not prefix or self.cfg.anonymous:
            return {}
        key_id = os.environ.get(f"{prefix}AWS_ACCESS_KEY_ID")
        secret = os.environ.get(f"{prefix}AWS_SECRET_ACCESS_KEY")
        if not key_id or not secret:
            raise ConfigError(
                f"source {self.name!r}: credentialsEnvPrefix is {prefix!r} but {prefix}AWS_ACCESS_KEY_ID and "
                f"{prefix}AWS_SECRET_ACCESS_KEY are not both set (mount the Secret with envFrom prefix {prefix!r})"
            )
        creds = {"aws_access_key_id": key_id, "aws_secret_access_key": secret}
        token = os.environ.get(f"{prefix}AWS_SESSION_TOKEN")
        if token:
            creds["aws_session_token"] = token
        return creds

    def _list_error(self, exc: Exception) -> Exception:
        from botocore import exceptions as boto_errors

        code, status = error_code(exc), http_status(exc)  # timeouts and dropped connections carry no response
        what = f"source {self.name!r}: listing {self.cfg.url} failed"
        if isinstance(exc, (boto_errors.NoCredentialsError, boto_errors.PartialCredentialsError)):
            return ConfigError(f"{what}: no usable credentials ({exc}); give them through credentialsEnvPrefix or "
                               "workload identity, or set anonymous: true for a public bucket")
        if code in ("NoSuchBucket", "AccessDenied", "InvalidAccessKeyId", "SignatureDoesNotMatch", "AllAccessDisabled",
                    "InvalidBucketName", "PermanentRedirect", "AuthorizationHeaderMalformed", "ExpiredToken",
                    "InvalidToken") or status in (400, 401, 403, 404):
            return ConfigError(f"{what}: {code or status}: {exc}")
        return TransientError(f"{what}: {exc}")

    def list_items(self, retry: Callable[[Callable[[], Any]], Any], workers: int) -> list[Item]:
        items = []
        listing_prefix = f"{self.prefix}/" if self.prefix else ""
        unusable: list[str] = []
        under_prefix = False  # any object: the URL names a "directory" then, whatever the filters keep
        try:
            paginator = self.client.get_paginator("list_objects_v2")
            for page in paginator.paginate(Bucket=self.bucket, Prefix=listing_prefix):
                if "Name" not in page:  # every listing names its bucket: this answer (a proxy's HTML page?) is none
                    raise TransientError(f"source {self.name!r}: listing {self.cfg.url} got an answer that is no "
                                         "S3 listing (it names no bucket), such as a proxy's or captive portal's page")
                for obj in page.get("Contents", []):
                    full = obj["Key"]
                    rel = full[len(listing_prefix):]
                    if not rel or full.endswith("/"):
                        continue  # "directory" markers
                    under_prefix = True
                    if not self.filter(rel):
                        continue
                    try:
                        key = self._key(rel, f"s3://{self.bucket}/{full}")
                    except ConfigError:
                        unusable.append(full)
                        continue
                    meta = self._listed(obj.get("ETag", ""), obj.get("LastModified"))
                    items.append(Item(key, int(obj["Size"]), f"s3://{self.bucket}/{full}", meta))
            if not under_prefix and self.prefix:
                items.extend(self._single_object())
        except (ConfigError, TransientError):
            raise
        except Exception as exc:
            raise self._list_error(exc) from None
        if unusable:
            # never dropped silently: the shard would claim to be complete without them
            shown = _first_few(unusable)
            raise ConfigError(
                f"source {self.name!r}: {len(unusable)} object(s) under {self.cfg.url} have keys that cannot be paths "
                f"(an empty, '.' or '..' segment, a backslash, or a '.trajflow-' segment): {shown}; leave them out "
                f"with `exclude` patterns"
            )
        if not items:
            log.warning("source %r: nothing under %s matches include=%s exclude=%s", self.name, self.cfg.url,
                        self.cfg.include, self.cfg.exclude)
        return items

    def _single_object(self) -> list[Item]:
        """`s3://bucket/path/to/object` names one object when nothing lies below it."""
        try:
            head = self.client.head_object(Bucket=self.bucket, Key=self.prefix)
        except Exception as exc:
            if is_not_found(exc):
                return []
            raise
        rel = self.prefix.rsplit("/", 1)[-1]
        if not self.filter(rel):
            return []
        meta = self._listed(head.get("ETag", ""), head.get("LastModified"))
        return [Item(self._key(rel, self.cfg.url), int(head["ContentLength"]), f"s3://{self.bucket}/{self.prefix}", meta)]

    @staticmethod
    def _listed(etag: str, last_modified: Any) -> dict[str, Any]:
        # "listed_last_modified", not "last_modified": only `confirm_planned` reads it, and
        # the item's fingerprint (which names its verified copy) stays as it was
        meta: dict[str, Any] = {"etag": etag.strip('"')}
        if last_modified is not None:
            meta["listed_last_modified"] = last_modified.isoformat()
        return meta

    def url_for(self, item: Item) -> str:
        key = item.source[len(f"s3://{self.bucket}/"):]
        return str(self.client.generate_presigned_url(
            "get_object", Params={"Bucket": self.bucket, "Key": key}, ExpiresIn=PRESIGN_EXPIRY_S
        ))

    def open(self, item: Item, start: int, end: int | None, validator: Validator | None) -> Body:
        return self.http.get(self.url_for(item), start, end, validator)

    def planned_validator(self, item: Item) -> Validator | None:
        etag = str(item.meta.get("etag", ""))
        return Validator(f'"{etag}"') if etag else None  # listings strip the quotes a GET's ETag has

    def confirm_planned(self, item: Item) -> Validator | None:
        """Some S3-compatible stores give an object one ETag in listings and another on GET,
        so If-Match with the listed ETag always fails. When HEAD shows the listed size and
        the listed ETag or modification time, the object is the planned version: it is then
        pinned by its Last-Modified instead."""
        listed = item.meta.get("listed_last_modified")
        try:
            head = self.client.head_object(Bucket=self.bucket, Key=item.source[len(f"s3://{self.bucket}/"):])
        except Exception as exc:
            log.warning("source %r: cannot check %s after a refused If-Match: %s", self.name, item.source, exc)
            return None
        header = head.get("ResponseMetadata", {}).get("HTTPHeaders", {}).get("last-modified", "")
        same = int(head.get("ContentLength", -1)) == item.size and (
            head.get("ETag", "").strip('"') == item.meta.get("etag")
            or (listed is not None and head.get("LastModified") is not None
                and head["LastModified"].isoformat() == listed))
        if not same or not header:
            return None
        log.warning("source %r: %s refuses If-Match with its listed ETag, but is unchanged since planning (size "
                    "and %s match); pinning it by Last-Modified", self.name, item.source,
                    "ETag" if head.get("ETag", "").strip('"') == item.meta.get("etag") else "modification time")
        return Validator(last_modified=header)

    def expected(self, item: Item, body: Body) -> Expected:
        found = super().expected(item, body)
        if self.cfg.verify_etag:
            md5 = s3_etag_md5(body.headers)
            if md5:
                found.add("md5", md5, "s3-etag")
        return found


def _file_version(st: os.stat_result) -> Validator:
    return Validator(last_modified=f"{st.st_mtime_ns}-{st.st_size}")


def _changed_since_planning(path: Path, when: str) -> FetchError:
    """A local file is planned with its modification time and size: once either changed, no
    retry under this plan can copy it (permanent)."""
    return FetchError(f"{path}: modified {when} (the plan holds its modification time and size); a new "
                      "downloader.config.planGeneration lists the source again", Kind.PERMANENT, "changed")


class _FileSlice:
    """Bytes [start, start + remaining) of an open file. Once they are read, the file must
    still be the version it was when opened: bytes of a file rewritten in place while being
    copied would splice two versions, which no size check notices."""

    def __init__(self, fh: Any, remaining: int, path: Path, version: Validator):
        self._fh, self._remaining, self._path, self._version = fh, remaining, path, version

    def read(self, n: int) -> bytes:
        if self._remaining <= 0:
            return b""
        data = self._fh.read(min(n, self._remaining))
        self._remaining -= len(data)
        if self._remaining <= 0 or not data:
            if _file_version(os.fstat(self._fh.fileno())).tag != self._version.tag:
                raise _changed_since_planning(self._path, "while being copied")
        return data  # type: ignore[no-any-return]

    def close(self) -> None:
        self._fh.close()


class FileSourceRuntime(SourceRuntime):
    def __init__(self, cfg: FileSource):
        super().__init__(cfg.name, cfg.required)
        raw = cfg.path
        if raw.startswith("file://"):
            parts = urlsplit(raw)
            if parts.netloc not in ("", "localhost"):
                raise ConfigError(f"source {cfg.name!r}: file URI with a host is not supported: {raw!r}")
            if parts.query or parts.fragment or raw.endswith(("?", "#")):
                # read as a URI they would name another directory, without a word
                raise ConfigError(f"source {cfg.name!r}: in the file URI {raw!r}, '?' and '#' start a query or a "
                                  "fragment: percent-encode them (%3F, %23), or give a plain path")
            raw = unquote(parts.path)
        path = Path(raw).expanduser()
        try:
            self.root = path.resolve(strict=True)
        except FileNotFoundError:
            self.root = path.resolve()  # named by the listing: neither a directory nor a file
        except (OSError, RuntimeError) as exc:  # a loop of symbolic links (RuntimeError before Python 3.13)
            raise ConfigError(f"source {cfg.name!r}: cannot resolve {raw}: {exc}") from None
        self.cfg = cfg
        self.filter = PathFilter(cfg.include, cfg.exclude)

    def list_items(self, retry: Callable[[Callable[[], Any]], Any], workers: int) -> list[Item]:
        if self.root.is_file():
            if not self.filter(self.root.name):  # as for a directory's files
                log.warning("source %r: %s does not match include=%s exclude=%s", self.name, self.root,
                            self.cfg.include, self.cfg.exclude)
                return []
            st = self.root.stat()
            return [Item(self._key(self.root.name, str(self.root)), st.st_size, self.root.as_uri(), {"mtime_ns": st.st_mtime_ns})]
        if not self.root.is_dir():
            raise ConfigError(f"source {self.name!r}: {self.root} is neither a directory nor a file")
        # Symlinked directories are followed, as a user reading the tree sees them; a link
        # to a directory the walk is already inside would loop, and is skipped.
        def ident(path: str) -> tuple[int, int]:
            st = os.stat(path)
            return st.st_dev, st.st_ino

        def unlistable(exc: OSError) -> None:
            # a directory skipped would leave its files out of a shard that claims to be complete
            if isinstance(exc, FileNotFoundError):  # deleted while listing
                return
            where = f"source {self.name!r}: cannot list {exc.filename}: {exc.strerror}"
            if isinstance(exc, PermissionError):
                raise ConfigError(f"{where} (run the pod as a user that can read it, or exclude it)")
            raise TransientError(where)

        items, not_utf8 = [], []
        ancestors = {str(self.root): frozenset([ident(str(self.root))])}
        for dirpath, dirnames, filenames in os.walk(self.root, onerror=unlistable, followlinks=True):
            inside = ancestors.pop(dirpath)
            kept = []
            for name in sorted(dirnames):
                sub = os.path.join(dirpath, name)
                try:
                    sub_id = ident(sub)
                except FileNotFoundError:  # deleted while listing
                    continue
                if sub_id in inside:
                    log.warning("source %r: not following %s: it links back to a directory that contains it",
                                self.name, sub)
                    continue
                kept.append(name)
                ancestors[sub] = inside | {sub_id}
            dirnames[:] = kept
            for name in sorted(filenames):
                path = Path(dirpath) / name
                try:
                    st = path.stat()
                except FileNotFoundError:
                    # a dangling link, or a file deleted while listing
                    log.warning("source %r: skipping %s: it does not exist (a symbolic link to nothing?)",
                                self.name, path)
                    continue
                except OSError as exc:
                    if exc.errno != errno.ELOOP:
                        unlistable(exc)
                        continue
                    log.warning("source %r: skipping %s: a loop of symbolic links", self.name, path)
                    continue
                if not stat_mod.S_ISREG(st.st_mode):
                    continue
                rel = path.relative_to(self.root).as_posix()
                if not self.filter(rel):
                    continue
                try:
                    rel.encode()
                except UnicodeEncodeError:  # undecodable bytes, which keys (and plans) cannot hold
                    not_utf8.append(rel)
                    continue
                items.append(Item(self._key(rel, str(path)), st.st_size, path.as_uri(), {"mtime_ns": st.st_mtime_ns}))
        if not_utf8:
            shown = _first_few(not_utf8)
            raise ConfigError(f"source {self.name!r}: {len(not_utf8)} file name(s) under {self.root} are not valid "
                              f"UTF-8: {shown}; rename them, or leave them out with `exclude` patterns")
        if not items:
            log.warning("source %r: nothing under %s matches include=%s exclude=%s", self.name, self.root,
                        self.cfg.include, self.cfg.exclude)
        return items

    def _path(self, item: Item) -> Path:
        return Path(unquote(urlsplit(item.source).path))

    def open(self, item: Item, start: int, end: int | None, validator: Validator | None) -> Body:
        path = self._path(item)
        try:
            fh = open(path, "rb")
        except FileNotFoundError:
            raise FetchError(f"{path}: no such file", Kind.PERMANENT, "not_found") from None
        except PermissionError as exc:
            raise FetchError(f"{path}: {exc.strerror}", Kind.PERMANENT, "forbidden") from None
        except OSError as exc:
            raise FetchError(f"{path}: {exc.strerror}", Kind.TRANSIENT, "source_io") from None
        st = os.fstat(fh.fileno())
        current = _file_version(st)
        if validator is not None and validator.tag and validator.tag != current.tag:
            fh.close()
            raise _changed_since_planning(path, "since it was listed")
        stop = st.st_size if end is None else min(end, st.st_size)
        if start > st.st_size or (end is not None and end > st.st_size):
            fh.close()
            raise FetchError(f"{path}: shorter than expected ({st.st_size} bytes)", Kind.RESTART, "changed")
        fh.seek(start)
        ranged = start > 0 or end is not None
        return Body(start, stop - start, st.st_size, ranged, current, {}, _fh=_FileSlice(fh, stop - start, path, current),
                    _url=str(path))

    def planned_validator(self, item: Item) -> Validator | None:
        # the listing's modification time and size: a file changed since planning is not
        # copied under this plan (nor cut to the planned size when it grew)
        mtime = item.meta.get("mtime_ns")
        return None if mtime is None else Validator(last_modified=f"{mtime}-{item.size}")


def build_sources(config: DownloadConfig, clients: HttpClients) -> dict[str, SourceRuntime]:
    """Runtimes for every configured source; ConfigError names the source at fault."""
    out: dict[str, SourceRuntime] = {}
    for cfg in config.sources:
        if isinstance(cfg, S3Source):
            out[cfg.name] = S3SourceRuntime(cfg, clients, config.concurrency + 4, config.timeout_seconds)
        elif isinstance(cfg, HttpsSource):
            out[cfg.name] = https_source(cfg, clients)
        elif isinstance(cfg, CatalogSource):
            out[cfg.name] = catalog_source(cfg, clients)
        elif isinstance(cfg, FileSource):
            out[cfg.name] = FileSourceRuntime(cfg)
        else:  # pragma: no cover - the config model admits no other type
            raise ConfigError(f"source {cfg.name!r}: unsupported type")
    return out


def list_all(sources: dict[str, SourceRuntime], attempts: int, backoff: Backoff, workers: int) -> list[Item]:
    """Every item of every source, for the plan; raises ConfigError or TransientError."""

    def retry(fn: Callable[[], Any]) -> Any:
        return call_with_retries(fn, attempts, backoff)

    items: list[Item] = []
    for name, source in sources.items():
        found = source.list_items(retry, workers)
        log.info("source %s: %d item(s), %d bytes", name, len(found), sum(i.size for i in found))
        items.extend(found)
    if not items:
        raise ConfigError("the sources list no items: nothing to download (check urls, prefixes and include/exclude)")
    return items
