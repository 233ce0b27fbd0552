"""A raw HTTP/1.1 server on 127.0.0.1 for fetch tests: each route writes exactly the bytes a misbehaving server
would (headers dripped line by line, bodies cut short of their Content-Length, malformed redirects). Its accept
loop is bounded in requests and seconds and stops by itself; handler threads are daemons."""
from __future__ import annotations

import socket
import threading
import time
from typing import Callable

Route = Callable[[socket.socket, int], None]  # (connection, how many times this path was hit) -> writes a reply


def reply(conn: socket.socket, status: int, body: bytes = b"", headers: tuple[tuple[str, str], ...] = ()) -> None:
    head = f"HTTP/1.1 {status} X\r\nContent-Length: {len(body)}\r\n" + "".join(f"{k}: {v}\r\n" for k, v in headers)
    conn.sendall(head.encode("latin-1") + b"\r\n" + body)


class RudeServer:
    def __init__(self, routes: dict[str, Route], max_requests: int = 200, max_seconds: float = 60.0) -> None:
        self.routes, self.hits, self.max_requests, self.max_seconds = routes, {}, max_requests, max_seconds
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.sock.settimeout(0.2)
        self.port = self.sock.getsockname()[1]
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._serve, daemon=True)

    def url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.port}{path}"

    def _serve(self) -> None:
        end, served = time.monotonic() + self.max_seconds, 0
        while not self._stop.is_set() and served < self.max_requests and time.monotonic() < end:
            try:
                conn, _ = self.sock.accept()
            except (socket.timeout, OSError):
                continue
            served += 1
            threading.Thread(target=self._handle, args=(conn,), daemon=True).start()
        self.sock.close()

    def _handle(self, conn: socket.socket) -> None:
        conn.settimeout(5)
        with conn:
            try:
                while True:  # keep-alive: one request after another until the client closes
                    data = b""
                    while b"\r\n\r\n" not in data:
                        chunk = conn.recv(4096)
                        if not chunk:
                            return
                        data += chunk
                    path = data.split(b" ", 2)[1].decode("latin-1").split("?", 1)[0]
                    self.hits[path] = self.hits.get(path, 0) + 1
                    route = self.routes.get(path)
                    if route is None:
                        reply(conn, 404, b"not found")
                    else:
                        route(conn, self.hits[path])
            except OSError:
                return

    def __enter__(self) -> "RudeServer":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join(5)
