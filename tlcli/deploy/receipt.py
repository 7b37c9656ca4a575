"""The deadline on receiving a request's headers, which uvicorn lacks.

uvicorn bounds the size of a request's headers (h11's limit) and the idle time between requests
on a kept-alive connection (``timeout_keep_alive``, reset by every byte), but not the time a
client takes to send its headers: one that stops mid-headers, or sends a byte every few seconds
(slowloris), held its connection forever, and enough of them exhaust the server. Here each
connection's protocol is uvicorn's own, wrapped (by composition: only ``asyncio.Protocol``'s
interface of it is used) with a timer. The timer is armed when the connection opens and again
when an answer has been sent, and disarmed when the app receives the next request, that is once
its headers are complete; when it fires, the connection is closed, after a 408 with a one-line
JSON error if the client had begun a request (an idle one is closed as uvicorn closes it). The
body is the app's to bound (``server.build_app``'s ``body_seconds``), since only the app reads it.

The app learns which connection a request came on from the ASGI scope's ``client`` address, the
peer address of the connection; uvicorn's proxy headers are turned off so nothing rewrites it.
"""

from __future__ import annotations

import asyncio
import functools

from tlcli import strict_json


def _408(seconds: float) -> bytes:
    body = strict_json.dumps({"error": f"request headers not received within {seconds:g} s; send each "
                                       "request at once"}).encode()
    return (b"HTTP/1.1 408 Request Timeout\r\ncontent-type: application/json\r\nconnection: close\r\n"
            b"content-length: %d\r\n\r\n" % len(body)) + body


class _Deadlined(asyncio.Protocol):
    """``inner`` (an HTTP protocol of uvicorn) with the header deadline of the module docstring.
    ``connections`` maps each open connection's peer address to its protocol, for ``_Tracked``."""

    def __init__(self, inner_class, connections: dict, seconds: float, **options):
        self.inner = inner_class(**options)
        self.connections, self.seconds = connections, seconds
        self.transport = self.timer = self.key = None
        self.began = False  # bytes have come since the timer was armed

    def connection_made(self, transport) -> None:
        self.transport = transport
        peer = transport.get_extra_info("peername")
        if isinstance(peer, tuple) and len(peer) >= 2:
            self.key = (str(peer[0]), int(peer[1]))
            self.connections[self.key] = self
        self.inner.connection_made(transport)
        self.arm()

    def connection_lost(self, exc) -> None:
        self.disarm()
        if self.connections.get(self.key) is self:
            del self.connections[self.key]
        self.inner.connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        self.began = True
        self.inner.data_received(data)

    def eof_received(self):
        return self.inner.eof_received()

    def pause_writing(self) -> None:
        self.inner.pause_writing()

    def resume_writing(self) -> None:
        self.inner.resume_writing()

    def arm(self) -> None:
        self.disarm()
        self.began = False
        self.timer = asyncio.get_running_loop().call_later(self.seconds, self._expire)

    def disarm(self) -> None:
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None

    def _expire(self) -> None:
        self.timer = None
        if not self.transport.is_closing():
            if self.began:
                self.transport.write(_408(self.seconds))
            self.transport.close()


class _Tracked:
    """The ASGI app, telling each request's connection when the request has arrived (its headers
    are in: the deadline stops) and when its answer has been sent (the next one starts)."""

    def __init__(self, app, connections: dict):
        self.app, self.connections = app, connections

    async def __call__(self, scope, receive, send):
        client = scope.get("client")
        conn = self.connections.get(tuple(client)) if scope["type"] == "http" and client else None
        if conn is None:
            return await self.app(scope, receive, send)
        conn.disarm()
        try:
            return await self.app(scope, receive, send)
        finally:
            if not conn.transport.is_closing():
                conn.arm()


def uvicorn_server(app, *, header_seconds: float, **options):
    """A ``uvicorn.Server`` for ``app`` whose connections get the header deadline (``options``
    are ``uvicorn.Config``'s; HTTP/1.1 through h11, no proxy headers)."""
    import uvicorn
    from uvicorn.protocols.http.h11_impl import H11Protocol

    connections: dict = {}
    protocol = functools.partial(_Deadlined, H11Protocol, connections, header_seconds)
    return uvicorn.Server(uvicorn.Config(_Tracked(app, connections), http=protocol, proxy_headers=False,
                                         **options))
