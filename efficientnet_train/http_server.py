"""The HTTP side of `serve`: gunicorn's threaded worker made safe against slow and idle clients, the connection
whose reads share one deadline per request, and gunicorn's own error answers as JSON, like the app's."""

from __future__ import annotations

import errno
import functools
import json
import socket
import time

JSON = "application/json"

# Slow or stalled clients: the headers must arrive within HEADERS_TIMEOUT_S of the first byte, the body within
# BODY_TIMEOUT_S more (6 MB at 200 KB/s); a connection that sends nothing waits on the poller, holding no thread.
HEADERS_TIMEOUT_S, BODY_TIMEOUT_S, SEND_TIMEOUT_S = 5.0, 30.0, 30.0
# A new connection that sends nothing is closed after this: a client sends its request as soon as it connects,
# and gunicorn stops accepting at 1,000 open connections. (Kept-alive ones between requests keep gunicorn's 75 s.)
NEW_CONNECTION_IDLE_S = 15.0
# A body the app read to its end is drained (nothing left) within this, and the connection kept alive; a request
# answered without reading its body (refused first) closes its connection instead of waiting for the body.
UNREAD_BODY_WAIT_S = 0.2

class RequestTimeout(Exception):
    """A client too slow to send its request. Not an OSError, which gunicorn would log with a traceback."""


class DeadlineSocket(socket.socket):
    """A client connection whose reads share one deadline per request: a per-read timeout alone would let a
    client that sends a byte a second hold a thread forever. gunicorn makes the socket blocking when a thread
    starts on a request: the headers then have HEADERS_TIMEOUT_S; the app allows the body more (`allow`)."""

    deadline: float | None = None
    close_after_answer = False  # set by the app for a request answered without reading its body

    @classmethod
    def adopt(cls, connection: socket.socket) -> "DeadlineSocket":
        return cls(connection.family, connection.type, connection.proto, fileno=connection.detach())

    def setblocking(self, flag: bool) -> None:
        super().setblocking(flag)
        self.deadline = time.monotonic() + HEADERS_TIMEOUT_S if flag else None

    def allow(self, seconds: float) -> None:
        self.deadline = time.monotonic() + seconds

    def _arm(self) -> None:
        if self.deadline is not None:
            left = self.deadline - time.monotonic()
            if left <= 0:
                raise RequestTimeout("the client did not send its request in time")
            current = self.gettimeout()  # gunicorn's own, shorter one (closing a connection) stands
            self.settimeout(left if current is None else min(current, left))

    def recv(self, *args, **kwargs):
        self._arm()
        try:
            return super().recv(*args, **kwargs)
        except TimeoutError:
            if self.deadline is None:  # gunicorn's own timeout (draining a body): gunicorn handles it
                raise
            raise RequestTimeout("the client did not send its request in time") from None

    def recv_into(self, *args, **kwargs):
        self._arm()
        try:
            return super().recv_into(*args, **kwargs)
        except TimeoutError:
            if self.deadline is None:
                raise
            raise RequestTimeout("the client did not send its request in time") from None

    def sendall(self, *args, **kwargs):
        if self.deadline is not None:
            self.settimeout(SEND_TIMEOUT_S)  # a client that does not read its answer is dropped too
        return super().sendall(*args, **kwargs)


def json_error(client: socket.socket, status: int, reason: str, message: str) -> None:
    """gunicorn's own answers (a malformed request line, headers too large, a slow client) as JSON, like every
    other answer of this server, instead of gunicorn's HTML page."""
    body = json_body({"error": f"{reason}: {message}" if message else reason})
    head = (f"HTTP/1.1 {status} {reason}\r\nConnection: close\r\nContent-Type: {JSON}\r\n"
            f"Content-Length: {len(body)}\r\n\r\n").encode("latin-1")
    from gunicorn import util

    util.write_nonblock(client, head + body)


@functools.lru_cache(maxsize=None)
def thread_worker_class():
    """gunicorn's threaded worker, made safe against slow and idle clients: a new connection waits on the
    poller until it sends something (gunicorn's own worker holds a thread for up to 5 s first, so 100 idle
    connections stalled /ping for ~25 s), each request's reads share one deadline (DeadlineSocket), and the
    errors gunicorn answers itself are JSON."""
    import selectors
    from functools import partial

    from gunicorn import util
    from gunicorn.workers.gthread import TConn, ThreadWorker

    util.write_error = json_error  # the base worker calls util.write_error(...) at answer time

    class Connection(TConn):
        def close(self, graceful=False):
            # gunicorn's graceful close waits up to 2 s, on the worker's one event-loop thread, for the client to
            # close its side: 14 clients refused while still "sending" stalled every connection for 28 s. Taking
            # what has already arrived, without waiting, keeps the kernel from resetting the answer just sent.
            if graceful:
                try:
                    self.sock.shutdown(socket.SHUT_WR)
                    self.sock.setblocking(False)
                    while self.sock.recv(65536):
                        pass
                except OSError:  # nothing more buffered (BlockingIOError), or the client is gone
                    pass
            util.close(self.sock)

    class BoundedThreadWorker(ThreadWorker):
        def accept(self, listener):
            try:
                client, address = listener.accept()
            except OSError as exc:
                if exc.errno not in (errno.EAGAIN, errno.ECONNABORTED, errno.EWOULDBLOCK):
                    raise
                return
            self.nr_conns += 1
            connection = Connection(self.cfg, DeadlineSocket.adopt(client), address, listener.getsockname())
            connection.timeout = time.monotonic() + NEW_CONNECTION_IDLE_S  # silent for longer: closed
            self.pending_conns.append(connection)
            self.poller.register(connection.sock, selectors.EVENT_READ,
                                 partial(self.on_pending_socket_readable, connection))

        def _keepalive_after(self, conn, keepalive):
            # gunicorn drains a body the app did not read (a request refused before reading it) for up to 5 s
            # before reusing the connection: a client that never sends it held the thread that long each time.
            if not keepalive or getattr(conn.sock, "close_after_answer", False):
                return False
            if isinstance(conn.sock, DeadlineSocket):
                conn.sock.deadline = None  # the drain's own short timeout applies
            return bool(conn.parser.finish_body(deadline=time.monotonic() + UNREAD_BODY_WAIT_S))

        def handle_error(self, req, client, addr, exc):
            if isinstance(exc, RequestTimeout):
                self.log.warning("A client at %s was too slow to send its request; closed.", (addr or ("",))[0])
                try:
                    json_error(client, 408, "Request Timeout",
                               f"the request did not arrive within {HEADERS_TIMEOUT_S:.0f} s")
                except Exception:  # noqa: BLE001 - the client may be gone
                    pass
                return
            super().handle_error(req, client, addr, exc)

    return BoundedThreadWorker



def json_body(value) -> bytes:
    """Every JSON answer's bytes: UTF-8, names as they are (not \\u-escaped), one line."""
    return (json.dumps(value, ensure_ascii=False) + "\n").encode("utf-8")
