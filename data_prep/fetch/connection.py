"""One HTTP(S) connection to an address that was checked beforehand, with one deadline for a whole exchange.

`fetch` resolves a host, refuses private addresses, then connects to exactly that address (no second lookup an
attacker could rebind); TLS still verifies the host name. `deadline` (set per request, shared by every hop of a
redirect chain) bounds connect, TLS handshake, request, every header line, error bodies and bodies: a plain
socket timeout restarts for every read, so a server dripping one header line a second held a row indefinitely.
"""
from __future__ import annotations

import http.client
import io
import socket
import ssl
import time


class PinnedConnection(http.client.HTTPConnection):
    """An HTTP(S) connection to an address checked beforehand; TLS still verifies the host name. Every socket
    operation is bounded by `deadline` (set per request), not by a fresh timeout each."""

    def __init__(self, scheme: str, host: str, port: int, ip: str, timeout: float) -> None:
        super().__init__(host, port, timeout=timeout)
        self.scheme, self.ip, self.deadline = scheme, ip, time.monotonic() + timeout

    def connect(self) -> None:
        sock = socket.create_connection((self.ip, self.port), _remaining(self.deadline))
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        if self.scheme == "https":
            sock.settimeout(_remaining(self.deadline))  # the handshake is bounded as a whole by CPython's ssl
            sock = _tls_context().wrap_socket(sock, server_hostname=self.host)
        self.sock = _DeadlineSocket(sock, self)


def _remaining(deadline: float) -> float:
    left = deadline - time.monotonic()
    if left <= 0:
        raise TimeoutError("deadline passed")
    return left


class _DeadlineSocket:
    """A socket whose sends and receives each get only the time left until the connection's current deadline
    (http.client reads headers line by line: a plain timeout would restart for every line).

    Closing it while a reader from `makefile` is open defers the real close until that reader closes, as
    `socket.socket` does: http.client closes the connection as soon as a response says it will close (HTTP/1.0,
    `Connection: close`) and reads the body afterwards through the reader."""

    def __init__(self, sock: socket.socket, conn: PinnedConnection) -> None:
        self._sock, self._conn = sock, conn
        self._readers, self._closed = 0, False

    def sendall(self, data: bytes) -> None:
        self._sock.settimeout(_remaining(self._conn.deadline))
        self._sock.sendall(data)

    def recv_into(self, buffer, nbytes: int = 0) -> int:
        self._sock.settimeout(_remaining(self._conn.deadline))
        return self._sock.recv_into(buffer, nbytes)

    def makefile(self, mode: str = "rb", *args, **kwargs) -> io.BufferedReader:
        assert mode == "rb", mode
        self._readers += 1
        return io.BufferedReader(_DeadlineReader(self))

    def close(self) -> None:
        self._closed = True
        if self._readers == 0:
            self._sock.close()

    def reader_closed(self) -> None:
        self._readers -= 1
        if self._closed and self._readers == 0:
            self._sock.close()

    def __getattr__(self, name: str):
        return getattr(self._sock, name)


class _DeadlineReader(io.RawIOBase):
    def __init__(self, sock: _DeadlineSocket) -> None:
        super().__init__()
        self._sock = sock

    def readable(self) -> bool:
        return True

    def readinto(self, buffer) -> int:
        return self._sock.recv_into(buffer)

    def close(self) -> None:
        if not self.closed:
            self._sock.reader_closed()
        super().close()


_TLS: list[ssl.SSLContext] = []


def _tls_context() -> ssl.SSLContext:
    """One verifying TLS context per process (building one loads the CA bundle: milliseconds each)."""
    if not _TLS:
        _TLS.append(ssl.create_default_context())
    return _TLS[0]
