"""Fetch the bytes behind a URL or path: local files, any fsspec filesystem, and http(s) with safety rules.

http(s) is written on the standard library's `http.client` rather than requests/urllib3/aiohttp because every
hop (the first request and each redirect) must be resolved, checked against private/loopback/link-local/metadata
addresses, and then connected to exactly the address that was checked (no second DNS lookup an attacker could
rebind); the well-known clients resolve internally and give no such hook. Connections are kept per thread and
host (keep-alive), concurrency per host is capped, retries back off exponentially and honour `Retry-After`, a
whole transfer has one deadline (a slow drip cannot keep a worker forever), and `X-Robots-Tag` opt-outs drop
the sample. Failures are `Reject`s; those worth retrying later (timeouts, 429/5xx, connection errors) are
marked transient for `plait prep repair`.
"""
from __future__ import annotations

import collections
import http.client
import ipaddress
import socket
import ssl
import threading
import time
import urllib.parse
from concurrent.futures import ThreadPoolExecutor
from typing import Callable, Iterable, Iterator, TypeVar

import fsspec

from data_prep.options import FetchOptions
from data_prep.process import Reject

T = TypeVar("T")
U = TypeVar("U")

OPT_OUT_TAGS = ("noai", "noimageai", "noindex", "noimageindex")
_SECRET_QUERY_KEYS = ("token", "key", "sig", "signature", "x-amz-signature", "x-amz-credential",
                      "x-amz-security-token", "access_token", "password", "secret", "x-goog-signature")
_METADATA_HOSTS = {ipaddress.ip_address("169.254.169.254"), ipaddress.ip_address("fd00:ec2::254"),
                   ipaddress.ip_address("100.100.100.200")}
_CHUNK = 1 << 16
VERSION = "0.1"


def redact(url: str | None) -> str | None:
    """The URL without user:password@ and with secret-looking query values replaced: safe for manifests/logs."""
    if not url or "://" not in url:
        return url
    parts = urllib.parse.urlsplit(url)
    netloc = parts.netloc.rsplit("@", 1)[-1]
    query = parts.query
    if query:
        pairs = urllib.parse.parse_qsl(query, keep_blank_values=True)
        query = urllib.parse.urlencode([(k, "REDACTED" if k.lower() in _SECRET_QUERY_KEYS else v)
                                        for k, v in pairs])
    return urllib.parse.urlunsplit((parts.scheme, netloc, parts.path, query, parts.fragment))


def check_address(ip: str) -> str | None:
    """Why connecting to `ip` is refused by default, or None."""
    addr = ipaddress.ip_address(ip.split("%", 1)[0])
    if getattr(addr, "ipv4_mapped", None):
        addr = addr.ipv4_mapped
    if addr in _METADATA_HOSTS:
        return "metadata"
    for label in ("loopback", "private", "link_local", "multicast", "reserved", "unspecified"):
        if getattr(addr, f"is_{label}"):
            return label.replace("_", "-")
    return None


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

    def fetch(self, url: str | None) -> bytes:
        if not url:
            raise Reject("missing url")
        scheme = url.split("://", 1)[0].lower() if "://" in url else "file"
        if scheme in ("http", "https"):
            return self._http(url)
        path = url[7:] if url.startswith("file://") else url
        try:
            if scheme == "file":
                with open(path, "rb") as f:
                    data = f.read(self.opts.max_bytes + 1)
            else:
                with fsspec.open(url, "rb") as f:
                    data = f.read(self.opts.max_bytes + 1)
        except FileNotFoundError:
            raise Reject("file not found") from None
        except (IsADirectoryError, PermissionError) as e:
            raise Reject(f"unreadable file: {type(e).__name__}") from None
        except OSError as e:
            raise Reject(f"read error: {str(e)[:200]}", transient=scheme != "file") from None
        if len(data) > self.opts.max_bytes:
            raise Reject(f"file too large (> {self.opts.max_bytes} bytes)")
        return data

    def fetch_many(self, urls: Iterable[str | None]) -> Iterator[bytes | Reject | None]:
        """Fetches in input order; None items (inline media) give None."""
        def one(url):
            if url is None:
                return None
            try:
                return self.fetch(url)
            except Reject as r:
                return r

        urls = list(urls)
        remote = any(u and "://" in u and not u.startswith("file://") for u in urls)
        yield from ordered_map(one, urls, self.opts.threads if remote else 1)

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
                return self._follow(url)
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

    def _follow(self, url: str) -> bytes:
        seen = {url}
        for _ in range(self.opts.max_redirects + 1):
            status, headers, body = self._request(url)
            if status in (301, 302, 303, 307, 308):
                location = headers.get("location")
                if not location:
                    raise Reject(f"http {status} without Location")
                url = urllib.parse.urljoin(url, location)
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

    def _request(self, url: str) -> tuple[int, http.client.HTTPMessage, bytes]:
        parts = urllib.parse.urlsplit(url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise Reject(f"unsupported url scheme {parts.scheme!r}")
        host, port = parts.hostname, parts.port or (443 if parts.scheme == "https" else 80)
        ip = self._resolve(host, port)
        path = urllib.parse.urlunsplit(("", "", parts.path or "/", parts.query, ""))
        deadline = time.monotonic() + self.opts.timeout_s
        with self._slot(host):
            conn_key = (parts.scheme, host, port, ip)
            conns = self._local.__dict__.setdefault("conns", {})
            for fresh in (False, True):
                conn = conns.get(conn_key) if not fresh else None
                reused = conn is not None
                if conn is None:
                    conn = _PinnedConnection(parts.scheme, host, port, ip, self.opts.timeout_s)
                    conns[conn_key] = conn
                try:
                    conn.timeout = self.opts.timeout_s
                    conn.request("GET", path, headers={"User-Agent": self.user_agent, "Accept": "*/*",
                                                       "Host": parts.netloc.rsplit("@", 1)[-1]})
                    resp = conn.getresponse()
                    status, headers = resp.status, resp.headers
                    body = b""
                    if status < 300:
                        self._check_opt_out(headers)
                        body = self._read_body(resp, conn, deadline)
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
                except Reject:
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

    def _read_body(self, resp: http.client.HTTPResponse, conn: "_PinnedConnection", deadline: float) -> bytes:
        length = resp.getheader("content-length")
        if length and length.isdigit() and int(length) > self.opts.max_bytes:
            raise Reject(f"file too large ({length} > {self.opts.max_bytes} bytes)")
        chunks, size = [], 0
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise _Retry("timeout (transfer too slow)")
            if conn.sock is not None:
                conn.sock.settimeout(remaining)
            chunk = resp.read1(_CHUNK)
            if not chunk:
                break
            size += len(chunk)
            if size > self.opts.max_bytes:
                raise Reject(f"file too large (> {self.opts.max_bytes} bytes)")
            chunks.append(chunk)
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


class _PinnedConnection(http.client.HTTPConnection):
    """An HTTP(S) connection to an address checked beforehand; TLS still verifies the host name."""

    def __init__(self, scheme: str, host: str, port: int, ip: str, timeout: float) -> None:
        super().__init__(host, port, timeout=timeout)
        self.scheme, self.ip = scheme, ip

    def connect(self) -> None:
        self.sock = socket.create_connection((self.ip, self.port), self.timeout)
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        if self.scheme == "https":
            self.sock = _tls_context().wrap_socket(self.sock, server_hostname=self.host)


_TLS: list[ssl.SSLContext] = []


def _tls_context() -> ssl.SSLContext:
    """One verifying TLS context per process (building one loads the CA bundle: milliseconds each)."""
    if not _TLS:
        _TLS.append(ssl.create_default_context())
    return _TLS[0]
