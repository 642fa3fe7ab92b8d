"""The HTTP/1.1 client the provider adapters send their POSTs with: a keep-alive pool per base URL.

Responses are parsed by httptools (llhttp, the parser Node.js uses, in C); the rest is the few things a
provider call needs: a pool of keep-alive connections (TLS for https), at most `max_connections` requests at
once, gzip/deflate bodies, a body read whole or line by line (server-sent events), reading paused while a
slow consumer has more than `HIGH_WATER_BYTES` unread, and a response refused once it holds more than
`max_body_bytes` unread (decompressed), or a compressed one past that many bytes in all, so that a
runaway body or a decompression bomb fails the call instead of filling the Gateway's memory. No
redirects, cookies or proxies: a provider is one fixed base URL. Deadlines are the caller's
(`asyncio.timeout` around each step); a response abandoned before its end closes its connection instead
of returning it to the pool.

Why not aiohttp (used before): on the same keep-alive POSTs to the fake provider, aiohttp spent 0.23 ms
of CPU per request one at a time and 0.09 ms sixteen at a time, this client 0.10 and 0.05 ms, and one at
a time it has the answer 0.15 ms sooner (README, "Hot path").
"""

from __future__ import annotations

import asyncio
import ssl
import zlib
from collections.abc import Callable, Mapping
from urllib.parse import urlsplit

import httptools

# Unread body bytes past which the socket is not read until the consumer catches up.
HIGH_WATER_BYTES = 256 * 1024
# Unread body bytes (decompressed) past which a response is refused: the largest real answers (256
# embeddings of 3,072 dimensions in JSON, ~16 MB) fit four times over; a body that compresses 1,000 to 1
# (a gzip of zeros) is stopped after 64 KiB of it, when it has cost 64 MiB and a fifth of a second.
MAX_BODY_BYTES = 64 * 1024 * 1024
MAX_HEADER_BYTES = 64 * 1024
_ENCODINGS = {"gzip", "x-gzip", "deflate"}


class HttpError(Exception):
    """A failure below HTTP's status codes; the message never holds an address or a header."""


class ConnectFailed(HttpError):
    pass


class MalformedResponse(HttpError):
    pass


class BodyTooLarge(MalformedResponse):
    pass


class ConnectionDropped(HttpError):
    pass


class _Decompressor:
    """A gzip or zlib ("deflate") body, expanded at most `room` bytes at a time.

    gzip lets members follow one another (RFC 1952), each with its own header and checksum: all are
    decoded. Bytes after a whole member that are not another one are ignored, as gzip(1) and urllib3 do. A
    body whose compressed stream stops before its end is refused at the end of the body, and one of more
    than `max_input_bytes` compressed is refused as it arrives: a real answer compresses to less than the
    limit its decompressed form has, while empty members or ignored bytes would decode to nothing forever.
    """

    def __init__(self, max_input_bytes: int) -> None:
        self._max_input_bytes = max_input_bytes
        self._input_bytes = 0
        self._stream = _stream()
        self._members = 0  # whole streams decoded
        self._partial = False  # the current stream has input but not its end yet
        self._ignoring = False

    def decompress(self, data: bytes, room: int) -> bytes:
        self._input_bytes += len(data)
        if self._input_bytes > self._max_input_bytes:
            raise BodyTooLarge(f"the compressed body is larger than {self._max_input_bytes} bytes")
        decoded = b""
        while data and not self._ignoring:
            try:
                decoded += self._stream.decompress(data, room - len(decoded))
            except zlib.error:
                if not self._members:
                    raise MalformedResponse("the body does not decompress") from None
                self._ignoring = True
                break
            self._partial = not self._stream.eof
            if self._partial or len(decoded) >= room:
                break
            self._members += 1
            data = self._stream.unused_data
            self._stream = _stream()
        return decoded

    def finish(self) -> None:
        if self._partial:
            raise MalformedResponse("the compressed body stops before the end of its stream")


def _stream() -> zlib._Decompress:
    # 32 + MAX_WBITS: a gzip or a zlib header, whichever the stream has.
    return zlib.decompressobj(32 + zlib.MAX_WBITS)


class HttpResponse:
    """A response whose status and headers have arrived; its body is read with `read` or `readline`.

    `release` hands the connection back to the pool once the body was read to its end, and closes it
    otherwise; `close` always closes it.
    """

    def __init__(self, connection: _Connection, max_body_bytes: int) -> None:
        self._connection = connection
        self._max_body_bytes = max_body_bytes
        self.status = 0
        self.headers: dict[str, str] = {}
        self._header_bytes = 0
        self._buffer = bytearray()
        self._decoder: _Decompressor | None = None
        self._complete = False  # the whole body has arrived
        self._error: HttpError | None = None
        self._waiter: asyncio.Future[None] | None = None

    async def read(self) -> bytes:
        """The whole body (decompressed)."""
        while not self._complete:
            await self._more()
        data = bytes(self._buffer)
        self._buffer.clear()
        return data

    async def readline(self, max_length: int) -> bytes:
        """The next line with its line ending; the last bytes without one at the end; b"" after it."""
        start = 0
        while True:
            end = self._buffer.find(b"\n", start)
            if end >= 0:
                if end >= max_length:
                    raise MalformedResponse("a line of the body is too long")
                line = bytes(self._buffer[: end + 1])
                del self._buffer[: end + 1]
                return line
            if len(self._buffer) > max_length:
                raise MalformedResponse("a line of the body is too long")
            if self._complete:
                line = bytes(self._buffer)
                self._buffer.clear()
                return line
            start = len(self._buffer)
            await self._more()

    def release(self) -> None:
        self._connection.finish(self, reusable=self._complete and self._error is None)

    def close(self) -> None:
        self._connection.finish(self, reusable=False)

    async def _more(self) -> None:
        if self._error is not None:
            raise self._error
        self._connection.resume_reading()
        self._waiter = asyncio.get_running_loop().create_future()
        try:
            await self._waiter
        finally:
            self._waiter = None
        if self._error is not None:
            raise self._error

    # --- fed by the connection ---------------------------------------------------------------------

    def _header(self, name: bytes, value: bytes) -> None:
        self._header_bytes += len(name) + len(value)
        if self._header_bytes > MAX_HEADER_BYTES:
            raise MalformedResponse("response headers are too long")
        key = name.decode("latin-1").lower()
        text = value.decode("latin-1")
        self.headers[key] = f"{self.headers[key]}, {text}" if key in self.headers else text

    def _headers_done(self, status: int) -> None:
        self.status = status
        encoding = self.headers.get("content-encoding", "identity").strip().lower()
        if encoding in _ENCODINGS:
            self._decoder = _Decompressor(self._max_body_bytes)
        elif encoding not in {"", "identity"}:
            raise MalformedResponse("unsupported content-encoding")

    def _body(self, data: bytes) -> None:
        if self._decoder is not None:
            # At most one byte past the room left: a bomb is never expanded further than the limit.
            data = self._decoder.decompress(data, self._max_body_bytes - len(self._buffer) + 1)
        if len(self._buffer) + len(data) > self._max_body_bytes:
            raise BodyTooLarge(f"the body holds more than {self._max_body_bytes} unread bytes")
        self._buffer += data
        self._wake()

    def _end(self) -> None:
        """The body is complete: its length reached, its last chunk read, or its connection closed."""
        if self._decoder is not None:
            try:
                self._decoder.finish()
            except MalformedResponse as error:
                self._fail(error)
                return
        self._complete = True
        self._wake()

    def _fail(self, error: HttpError) -> None:
        if not self._complete and self._error is None:
            self._error = error
        self._wake()

    def _wake(self) -> None:
        if self._waiter is not None and not self._waiter.done():
            self._waiter.set_result(None)

    def _unread_bytes(self) -> int:
        return len(self._buffer)


class _Connection(asyncio.Protocol):
    """One keep-alive connection; carries one request at a time."""

    def __init__(self, pool: HttpPool) -> None:
        self._pool = pool
        self._transport: asyncio.Transport | None = None
        self._parser = httptools.HttpResponseParser(self)
        self._response: HttpResponse | None = None
        self._headers_arrived: asyncio.Future[None] | None = None
        self._paused = False
        self._keep_alive = False  # the last response allows another request (read when it ended)
        self.closed = False
        self.idle_since = 0.0

    async def request(
        self, head: bytes, body: bytes, on_sent: Callable[[], None] | None = None
    ) -> HttpResponse:
        response = self._response = HttpResponse(self, self._pool.max_body_bytes)
        self._headers_arrived = asyncio.get_running_loop().create_future()
        self._keep_alive = False
        try:
            if self.closed or self._transport is None:
                raise ConnectionDropped("the connection closed before the request was sent")
            self._transport.write(head + body)
            if on_sent is not None:
                on_sent()
            await self._headers_arrived
        except BaseException:
            self.finish(response, reusable=False)  # the answer to this request could still arrive on it
            raise
        return response

    def finish(self, response: HttpResponse, *, reusable: bool) -> None:
        """`response` is done with: back to the pool when it was read to the end of a kept-alive
        message, else closed (what is left of it would be read as the next response). A response
        finished before (released, then closed) is ignored: the connection may carry another by now."""
        if response is not self._response:
            return
        self._response = None
        if reusable and not self.closed and self._keep_alive:
            self.resume_reading()
            self._pool.put_back(self)
        else:
            self.close()
        self._pool.request_done()

    def close(self) -> None:
        if not self.closed:
            self.closed = True
            if self._transport is not None:
                self._transport.close()
            self._pool.forget(self)

    def resume_reading(self) -> None:
        if self._paused and self._transport is not None and not self.closed:
            self._paused = False
            self._transport.resume_reading()

    # --- asyncio.Protocol --------------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        if self._response is None or self._response._complete:
            self.close()  # bytes nobody asked for: this connection cannot be trusted with a request
            return
        try:
            self._parser.feed_data(data)
        except httptools.HttpParserError as exc:
            # A callback's own error (a header too long, a body that does not decompress) is the cause.
            cause = exc.__context__
            self._failed(
                cause if isinstance(cause, HttpError) else MalformedResponse("unreadable HTTP response")
            )
        else:
            response = self._response
            if response is not None and response._unread_bytes() > HIGH_WATER_BYTES and not self._paused:
                self._paused = True
                self._transport.pause_reading()  # type: ignore[union-attr]

    def connection_lost(self, exc: Exception | None) -> None:
        was_closed, self.closed = self.closed, True
        if not was_closed:
            self._pool.forget(self)
        response = self._response
        if response is None:
            return
        if self._read_until_close(response):
            response._end()  # a body without a length ends with its connection
            return
        self._failed(ConnectionDropped("the connection closed before the response ended"))

    # --- httptools callbacks -----------------------------------------------------------------------

    def on_message_begin(self) -> None:
        if self._response is not None and self._response._complete:
            raise MalformedResponse("bytes after the end of the response")

    def on_header(self, name: bytes, value: bytes) -> None:
        self._response._header(name, value)  # type: ignore[union-attr]

    def on_headers_complete(self) -> None:
        status = self._parser.get_status_code()
        if status < 200:
            self._response.headers.clear()  # type: ignore[union-attr]  # 1xx: the real answer follows
            return
        self._response._headers_done(status)  # type: ignore[union-attr]
        if self._headers_arrived is not None and not self._headers_arrived.done():
            self._headers_arrived.set_result(None)

    def on_body(self, data: bytes) -> None:
        self._response._body(data)  # type: ignore[union-attr]

    def on_message_complete(self) -> None:
        response = self._response
        if response is not None and response.status >= 200:
            self._keep_alive = self._parser.should_keep_alive()  # llhttp forgets it once the message ends
            response._end()

    # -----------------------------------------------------------------------------------------------

    def _failed(self, error: HttpError) -> None:
        response = self._response
        if self._headers_arrived is not None and not self._headers_arrived.done():
            self._headers_arrived.set_exception(error)
        if response is not None:
            response._fail(error)
        self.close()

    @staticmethod
    def _read_until_close(response: HttpResponse) -> bool:
        headers = response.headers
        return (
            response.status >= 200
            and not response._complete
            and "content-length" not in headers
            and "chunked" not in headers.get("transfer-encoding", "").lower()
        )


class HttpPool:
    """Keep-alive connections to one base URL (http or https); at most `max_connections` requests at once,
    the rest wait their turn. Idle connections are kept `keepalive_seconds`, the latest used first."""

    def __init__(
        self,
        base_url: str,
        *,
        max_connections: int,
        keepalive_seconds: float,
        max_body_bytes: int = MAX_BODY_BYTES,
    ) -> None:
        parts = urlsplit(base_url)
        if parts.scheme not in {"http", "https"} or not parts.hostname:
            raise ValueError(f"not an http(s) URL: {base_url!r}")
        self._host = parts.hostname
        self._port = parts.port or (443 if parts.scheme == "https" else 80)
        self._path = parts.path.rstrip("/")
        self._ssl = ssl.create_default_context() if parts.scheme == "https" else None
        name = f"[{self._host}]" if ":" in self._host else self._host
        default_port = self._port == (443 if parts.scheme == "https" else 80)
        self._authority = name if default_port else f"{name}:{self._port}"
        self._slots = asyncio.Semaphore(max_connections)
        self._keepalive = keepalive_seconds
        self.max_body_bytes = max_body_bytes
        self._idle: list[_Connection] = []
        self._open: set[_Connection] = set()

    async def post(
        self, path: str, body: bytes, headers: Mapping[str, str], on_sent: Callable[[], None] | None = None
    ) -> HttpResponse:
        """Sends the request and returns once the response's headers are in; `on_sent` runs once the
        request is handed to the connection."""
        head = self._head(path, body, headers)
        await self._slots.acquire()
        try:
            connection = await self._connection()
        except BaseException:
            self._slots.release()
            raise
        return await connection.request(head, body, on_sent)

    def _head(self, path: str, body: bytes, headers: Mapping[str, str]) -> bytes:
        lines = [f"POST {self._path}{path} HTTP/1.1", f"Host: {self._authority}"]
        for name, value in headers.items():
            if "\r" in value or "\n" in value or "\r" in name or "\n" in name:
                raise ValueError(f"header {name!r} holds a line break")
            lines.append(f"{name}: {value}")
        lines.append(f"Content-Length: {len(body)}")
        return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")

    async def _connection(self) -> _Connection:
        loop = asyncio.get_running_loop()
        while self._idle:
            connection = self._idle.pop()
            if loop.time() - connection.idle_since < self._keepalive:
                return connection
            connection.close()
        try:
            _, connection = await loop.create_connection(
                lambda: _Connection(self), self._host, self._port, ssl=self._ssl
            )
        except OSError as exc:  # refused, unreachable, a TLS handshake or certificate refused
            raise ConnectFailed("could not connect") from exc
        self._open.add(connection)
        return connection

    def put_back(self, connection: _Connection) -> None:
        connection.idle_since = asyncio.get_running_loop().time()
        self._idle.append(connection)

    def request_done(self) -> None:
        self._slots.release()

    def forget(self, connection: _Connection) -> None:
        self._open.discard(connection)
        if connection in self._idle:
            self._idle.remove(connection)

    async def close(self) -> None:
        for connection in list(self._open):
            connection.close()
        self._idle.clear()
