"""Fetch the bytes behind a URL or path: local files, http(s) with safety rules, and the object stores the user
enabled (`--allow-schemes s3,gs`); every other scheme, and chained fsspec URLs (`simplecache::http://...`), is
refused per row, because fsspec would otherwise reach any address (ftp, webhdfs, caches over http) unchecked.

http(s) is written on the standard library's `http.client` rather than requests/urllib3/aiohttp because every
hop (the first request and each redirect) must be resolved, checked against private/loopback/link-local/metadata
addresses, and then connected to exactly the address that was checked (no second DNS lookup an attacker could
rebind); the well-known clients resolve internally and give no such hook. Connections are kept per thread and
host (keep-alive, `data_prep.fetch.connection`), concurrency per host is capped, retries back off exponentially and
honour `Retry-After`, each attempt has one deadline over connect, headers, bodies and redirects (a slow drip
cannot keep a worker), and `X-Robots-Tag` opt-outs drop the sample. Local paths are read in `read_local` only. Failures are `Reject`s; those worth retrying later (timeouts, 429/5xx, connection errors, a body
cut short of its Content-Length) are marked transient for `plait prep repair`. Whatever a row's URL or its
server does, the failure is that row's reject: nothing a table or a server sends stops the job.
"""
from __future__ import annotations

import collections
import http.client
import re
import socket
import threading
import time
import urllib.parse
from concurrent.futures import ThreadPoolExecutor
from typing import Callable, Iterable, Iterator, TypeVar

import fsspec

from data_prep.fetch.connection import PinnedConnection
from data_prep.shards.remote import check_address
from data_prep.options import FetchOptions
from data_prep.media.images import Reject

T = TypeVar("T")
U = TypeVar("U")

OPT_OUT_TAGS = ("noai", "noimageai", "noindex", "noimageindex")
_SECRET_QUERY_KEYS = ("token", "key", "sig", "signature", "x-amz-signature", "x-amz-credential",
                      "x-amz-security-token", "access_token", "password", "secret", "x-goog-signature")
_CHUNK = 1 << 16
VERSION = "0.1"


def redact(url: str | None) -> str | None:
    """The URL without user:password@ and with secret-looking query values replaced: safe for manifests/logs."""
    if not url or not isinstance(url, str):
        return url
    url = printable(url)
    if "://" not in url:
        return url
    try:
        parts = urllib.parse.urlsplit(url)
    except ValueError:  # malformed (e.g. "Invalid IPv6 URL"): still drop anything that looks like credentials
        return re.sub(r"//[^/@]*@", "//", url)
    netloc = parts.netloc.rsplit("@", 1)[-1]
    query = parts.query
    if query:
        pairs = urllib.parse.parse_qsl(query, keep_blank_values=True)
        query = urllib.parse.urlencode([(k, "REDACTED" if k.lower() in _SECRET_QUERY_KEYS else v)
                                        for k, v in pairs])
    return urllib.parse.urlunsplit((parts.scheme, netloc, parts.path, query, parts.fragment))


def printable(text: str) -> str:
    """`text` with lone surrogates (a table can hold them, UTF-8 cannot) escaped, so manifests can store it."""
    return text.encode("utf-8", "backslashreplace").decode("utf-8")


def is_remote(url: str | None) -> bool:
    """True for a URL fetched over the network (worth a thread); False for local paths and inline media."""
    return isinstance(url, str) and "://" in url and not url.startswith("file://")


def ordered_map(fn: Callable[[T], U], items: Iterable[T], threads: int) -> Iterator[U]:
    """fn over items on a thread pool, results in input order, at most 2 x threads in flight (bounded memory)."""
    if threads <= 1:
        yield from map(fn, items)
        return
    with ThreadPoolExecutor(threads) as pool:
        window: collections.deque = collections.deque()
        for item in items:
            window.append(pool.submit(fn, item))
            if len(window) >= 2 * threads:
                yield window.popleft().result()
        while window:
            yield window.popleft().result()


class Fetcher:
    def __init__(self, opts: FetchOptions) -> None:
        self.opts = opts
        self.user_agent = f"plait-prep/{VERSION}" + (f" (+{opts.user_agent_token})" if opts.user_agent_token else "")
        self._local = threading.local()
        self._host_slots: dict[str, threading.Semaphore] = {}
        self._lock = threading.Lock()
        self._endpoint_verdict: dict[str, str | None] = {}  # scheme -> why its endpoint is refused, None: allowed

    def fetch(self, url: str | None) -> bytes:
        """The bytes behind `url`; any failure is a `Reject` naming the reason (transient when worth a retry)."""
        if not url:
            raise Reject("missing url")
        if not isinstance(url, str):
            raise Reject(f"url is not text ({type(url).__name__})")
        try:
            return self._fetch(url)
        except Reject:
            raise
        except (ValueError, UnicodeError, http.client.InvalidURL) as e:  # urlsplit, ports, IDNA, surrogates
            raise Reject(f"bad url ({type(e).__name__}: {printable(str(e))[:160]})") from None

    def _fetch(self, url: str) -> bytes:
        head, sep, _ = url.partition("://")
        scheme = head.lower() if sep else "file"
        if scheme in ("http", "https"):
            return self._http(url)
        if scheme == "file":
            return self.read_local(url[7:] if sep else url)
        if "::" in url:  # fsspec chaining (simplecache::, blockcache::, a::b): each link could reach anywhere
            raise Reject("chained fsspec url refused")
        if scheme not in self.opts.allow_schemes:
            extra = f", {', '.join(self.opts.allow_schemes)}" if self.opts.allow_schemes else ""
            raise Reject(f"url scheme {printable(scheme)[:20]!r} not allowed (http, https{extra}; see "
                         "--allow-schemes)")
        return self._store(scheme, url)

    def read_local(self, path: str) -> bytes:
        """A local path or file:// URL from the table: the one place local files are opened (never via fsspec)."""
        return self._read_capped(lambda: open(path, "rb"), transient=False)

    def _store(self, scheme: str, url: str) -> bytes:
        fs = fsspec.filesystem(scheme)
        self._check_endpoint(scheme, fs)
        # an object store's other I/O errors (throttling, a dropped connection) are worth a retry; a disk's are not
        return self._read_capped(lambda: fs.open(fs._strip_protocol(url), "rb"), transient=True)

    def _read_capped(self, open_file, transient: bool) -> bytes:
        """At most max_bytes + 1 bytes of the file `open_file()` opens; failures become the row's reject."""
        try:
            with open_file() as f:
                data = f.read(self.opts.max_bytes + 1)
        except FileNotFoundError:
            raise Reject("file not found") from None
        except (IsADirectoryError, PermissionError) as e:
            raise Reject(f"unreadable file: {type(e).__name__}") from None
        except OSError as e:
            raise Reject(f"read error: {printable(str(e))[:200]}", transient=transient) from None
        return self._check_size(data)

    def _check_size(self, data: bytes) -> bytes:
        if len(data) > self.opts.max_bytes:
            raise Reject(f"file too large (> {self.opts.max_bytes} bytes)")
        return data

    def _check_endpoint(self, scheme: str, fs) -> None:
        """The private-address rule for an object store: its endpoint comes from the environment or config (the
        table only names buckets and keys), checked once per fetcher (one shard) and scheme."""
        if self.opts.allow_private:
            return
        with self._lock:
            if scheme not in self._endpoint_verdict:
                self._endpoint_verdict[scheme] = _endpoint_problem(scheme, fs)
        if self._endpoint_verdict[scheme]:
            raise Reject(self._endpoint_verdict[scheme])

    def fetch_or_reject(self, url: str | None) -> bytes | Reject | None:
        """`fetch` with its failure as a value: None for inline media (no url), a Reject for any failure."""
        if url is None:
            return None
        try:
            return self.fetch(url)
        except Reject as r:
            return r
        except Exception as e:  # a failure nobody listed must cost this row, never the shard or the job
            return Reject(f"fetch error ({type(e).__name__}: {printable(str(e))[:160]})")

    def fetch_many(self, urls: Iterable[str | None]) -> Iterator[bytes | Reject | None]:
        """Fetches in input order; None items (inline media) give None."""
        urls = list(urls)
        yield from ordered_map(self.fetch_or_reject, urls, self.opts.threads if any(map(is_remote, urls)) else 1)

    # ---------------------------------------------------------------- http
    def _slot(self, host: str) -> threading.Semaphore:
        with self._lock:
            if host not in self._host_slots:
                self._host_slots[host] = threading.Semaphore(self.opts.max_per_host)
            return self._host_slots[host]

    def _http(self, url: str) -> bytes:
        attempt = 0
        while True:
            try:
                # one deadline per attempt covers the whole exchange: every hop's connect, TLS, request, headers,
                # error body and body (a server dripping header lines cannot hold a row past --timeout)
                return self._follow(url, time.monotonic() + self.opts.timeout_s)
            except _Retry as r:
                attempt += 1
                if attempt > self.opts.retries:
                    raise Reject(r.reason, transient=True) from None
                delay = self.opts.backoff_s * 2 ** (attempt - 1)
                if r.retry_after is not None:
                    if r.retry_after > self.opts.max_retry_after_s:
                        raise Reject(f"{r.reason} (Retry-After {r.retry_after:g}s too long)", transient=True)
                    delay = max(delay, r.retry_after)
                time.sleep(delay)

    def _follow(self, url: str, deadline: float) -> bytes:
        seen = {url}
        for _ in range(self.opts.max_redirects + 1):
            status, headers, body = self._request(url, deadline)
            if status in (301, 302, 303, 307, 308):
                location = headers.get("location")
                if not location:
                    raise Reject(f"http {status} without Location")
                url = urllib.parse.urljoin(url, location.strip())  # ValueError on a malformed Location: bad url
                if url in seen:
                    raise Reject("redirect loop")
                seen.add(url)
                continue
            if status == 429 or status >= 500:
                raise _Retry(f"http {status}", _retry_after(headers.get("retry-after")))
            if status >= 400:
                raise Reject(f"http {status}")
            return body
        raise Reject(f"too many redirects (> {self.opts.max_redirects})")

    def _request(self, url: str, deadline: float) -> tuple[int, http.client.HTTPMessage, bytes]:
        parts = urllib.parse.urlsplit(url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise Reject(f"unsupported url scheme {printable(parts.scheme)[:20]!r}" if parts.scheme not in
                         ("http", "https") else "url without a host")
        # IDNA for the name, percent-encoding for a non-ASCII path/query (as browsers send them); either raises
        # ValueError/UnicodeError for what cannot be encoded, which `fetch` turns into this row's "bad url"
        host = parts.hostname.encode("idna").decode("ascii")
        port = parts.port or (443 if parts.scheme == "https" else 80)
        ip = self._resolve(host, port)
        path = urllib.parse.quote(urllib.parse.urlunsplit(("", "", parts.path or "/", parts.query, "")),
                                  safe="/?&=%:@!$'()*+,;~-._")
        host_header = host if parts.port is None else f"{host}:{parts.port}"
        if ":" in host:
            host_header = f"[{host}]" + ("" if parts.port is None else f":{parts.port}")
        with self._slot(host):
            conn_key = (parts.scheme, host, port, ip)
            conns = self._local.__dict__.setdefault("conns", {})
            for fresh in (False, True):
                conn = conns.get(conn_key) if not fresh else None
                reused = conn is not None
                if conn is None:
                    conn = PinnedConnection(parts.scheme, host, port, ip, self.opts.timeout_s)
                    conns[conn_key] = conn
                try:
                    conn.deadline = deadline
                    conn.request("GET", path, headers={"User-Agent": self.user_agent, "Accept": "*/*",
                                                       "Host": host_header})
                    resp = conn.getresponse()
                    status, headers = resp.status, resp.headers
                    body = b""
                    if status < 300:
                        self._check_opt_out(headers)
                        body = self._read_body(resp)
                    else:
                        resp.read(_CHUNK)  # drain a short error body so the connection can be reused
                    if resp.will_close or not resp.isclosed():
                        conn.close()
                        conns.pop(conn_key, None)
                    return status, headers, body
                except (socket.timeout, TimeoutError):
                    conn.close()
                    conns.pop(conn_key, None)
                    raise _Retry("timeout") from None
                except (Reject, _Retry):
                    conn.close()
                    conns.pop(conn_key, None)
                    raise
                except (OSError, http.client.HTTPException) as e:
                    conn.close()
                    conns.pop(conn_key, None)
                    if reused and not fresh:
                        continue  # the server closed an idle keep-alive connection: one fresh try
                    raise _Retry(f"connection error: {type(e).__name__}") from None
        raise AssertionError("unreachable")

    def _resolve(self, host: str, port: int) -> str:
        try:
            infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
        except socket.gaierror as e:
            raise Reject(f"dns error: {e.strerror}", transient=True) from None
        ips = [info[4][0] for info in infos]
        if not self.opts.allow_private:
            for ip in ips:
                why = check_address(ip)
                if why:
                    raise Reject(f"refused {why} address ({ip}; pass --allow-private-addresses for test servers)")
        return ips[0]

    def _check_opt_out(self, headers: http.client.HTTPMessage) -> None:
        if not self.opts.respect_optouts:
            return
        for value in headers.get_all("x-robots-tag") or []:
            # "noai", "otherbot: noindex" (not for us), "plait-prep: noai" (for us)
            scope, _, directives = value.rpartition(":") if ":" in value else ("", "", value)
            if scope.strip() and scope.strip().lower() not in ("plait-prep", "*"):
                continue
            for token in directives.replace(",", " ").lower().split():
                if token in OPT_OUT_TAGS:
                    raise Reject(f"opt-out: X-Robots-Tag {token}")

    def _read_body(self, resp: http.client.HTTPResponse) -> bytes:
        length = resp.getheader("content-length")
        expected = int(length) if length and length.strip().isdigit() else None
        if expected is not None and expected > self.opts.max_bytes:
            raise Reject(f"file too large ({expected} > {self.opts.max_bytes} bytes)")
        if expected is not None and not resp.chunked:
            # one read into one buffer of the announced size: a 64 KB loop costs a GIL round trip per chunk,
            # which the image-processing thread of the same process waits on
            body = resp.read(expected)
            if len(body) < expected:
                raise _Retry(f"connection closed early ({len(body)} of {expected} bytes)")
            resp.read()
            return body
        chunks, size = [], 0
        while True:
            chunk = resp.read1(_CHUNK)
            if not chunk:
                break
            size += len(chunk)
            if size > self.opts.max_bytes:
                raise Reject(f"file too large (> {self.opts.max_bytes} bytes)")
            chunks.append(chunk)
        if expected is not None and size < expected and not resp.chunked:
            # http.client's read1 ends quietly when the peer closes early: a dropped connection, not a bad image
            raise _Retry(f"connection closed early ({size} of {expected} bytes)")
        resp.read()  # marks the response complete (read1 alone leaves it open) so the connection is reused
        return b"".join(chunks)


class _Retry(Exception):
    def __init__(self, reason: str, retry_after: float | None = None) -> None:
        super().__init__(reason)
        self.reason, self.retry_after = reason, retry_after


def _retry_after(value: str | None) -> float | None:
    if not value:
        return None
    if value.strip().isdigit():
        return float(value)
    try:
        from email.utils import parsedate_to_datetime
        return max(0.0, parsedate_to_datetime(value).timestamp() - time.time())
    except (TypeError, ValueError):
        return None


def _endpoint_problem(scheme: str, fs) -> str | None:
    """Why the endpoint an object-store filesystem talks to is refused by the private-address rule, or None."""
    endpoint = store_endpoint(scheme, fs)
    if endpoint is None:
        return f"{scheme}:// endpoint unknown: refused (pass --allow-private-addresses to trust it)"
    host = urllib.parse.urlsplit(endpoint if "://" in endpoint else f"https://{endpoint}").hostname
    try:
        ips = {info[4][0] for info in socket.getaddrinfo(host, 443, type=socket.SOCK_STREAM)}
    except (socket.gaierror, UnicodeError) as e:
        return f"{scheme}:// endpoint {host!r} does not resolve ({e})"
    for ip in sorted(ips):
        why = check_address(ip)
        if why:
            return (f"refused {why} address ({ip}, the {scheme}:// endpoint {host}; pass --allow-private-addresses "
                    "for a local store)")
    return None


def store_endpoint(scheme: str, fs) -> str | None:
    """The service URL behind `fs` as configured (environment, config files, storage options)."""
    if scheme in ("s3", "s3a"):
        fs.connect()  # s3fs builds its botocore client here, resolving AWS_ENDPOINT_URL and config files
        return fs.s3.meta.endpoint_url
    for attr in ("_location", "account_url", "endpoint_url"):  # gcsfs, adlfs
        value = getattr(fs, attr, None)
        if isinstance(value, str) and value:
            return value
    if scheme in ("gs", "gcs"):
        return "https://storage.googleapis.com"
    return None
