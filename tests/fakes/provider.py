"""A fake LLM provider over real HTTP/1.1, speaking the OpenAI and Anthropic wire formats.

Replies are deterministic: the last user message echoed back (a tool result is answered with
"tool result: ..."; a request offering tools gets a call to the first or the chosen tool), token counts
are whitespace-separated words. Faults are chosen per instance (`fault=`, `latency=`) or per request,
by the `x-fake-fault` header or by `fault=<spec>` inside the last user message:

    status:<code>     answer that HTTP status with the provider's error body (401 echoes the key it got,
                      as real providers do, so tests can check the adapter never repeats it)
    latency:<s>       answer after <s> seconds
    chunk_latency:<s> stream with <s> seconds between events
    hang              never answer (until the client goes away)
    hang_midstream    send half the answer (a stream's events, or a body's bytes), then nothing more
    drop_midstream    send half the answer, then drop the connection
    malformed         answer 200 with a body that is not the provider's format
    gzip_bomb         answer 200 with a gzip body of ~130 KB that expands to 128 MiB of zeros (not streams)
    no_usage          answer without `usage`, as some compatible servers do (not streams)

In-process:   `with FakeProvider() as fake: ... fake.openai_base_url ... fake.requests`
As a process: `python -m tests.fakes.provider --port N` (prints "listening on http://host:port").
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import functools
import itertools
import json
import re
import signal
import threading
import zlib
from dataclasses import dataclass
from typing import Any

from tests.fakes.wire import (
    BadRequest,
    Conversation,
    anthropic_conversation,
    anthropic_events,
    anthropic_message,
    count_words,
    dumps,
    embedding,
    error_body,
    openai_completion,
    openai_conversation,
    openai_events,
    reply_to,
)

FAULT_HEADER = "x-fake-fault"
MODELS = ("fake-gpt", "fake-claude", "fake-embedding")
_FAULT_IN_TEXT = re.compile(r"\bfault=([a-z_]+(?::[0-9.]+)?)")
_FAULT_KINDS = {
    "status",
    "latency",
    "chunk_latency",
    "hang",
    "hang_midstream",
    "drop_midstream",
    "malformed",
    "gzip_bomb",
    "no_usage",
}
_BOMB_BYTES = 128 * 1024 * 1024
_REASONS = {200: "OK", 400: "Bad Request", 401: "Unauthorized", 404: "Not Found", 429: "Too Many Requests"}
_MAX_HEAD_BYTES = 1 << 20


@dataclass(frozen=True)
class RecordedRequest:
    method: str
    path: str
    headers: dict[str, str]  # names in lower case
    body: Any  # the parsed JSON body, None when there was none or it was not JSON


@dataclass(frozen=True)
class Fault:
    kind: str
    value: float = 0.0

    @classmethod
    def parse(cls, spec: str) -> Fault | None:
        if not spec:
            return None
        kind, _, value = spec.partition(":")
        if kind not in _FAULT_KINDS:
            raise ValueError(f"unknown fault {spec!r}; known: {sorted(_FAULT_KINDS)}")
        return cls(kind, float(value or 0))


class _Failure(Exception):
    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


class _Exchange:
    """One request on one connection, and the ways of answering it."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, keep_alive: bool) -> None:
        self.reader = reader
        self.writer = writer
        self.keep_alive = keep_alive

    def _head(self, status: int, content_type: str, extra: str) -> bytes:
        connection = "" if self.keep_alive else "Connection: close\r\n"
        reason = _REASONS.get(status, "Error")
        return (
            f"HTTP/1.1 {status} {reason}\r\nContent-Type: {content_type}\r\n{connection}{extra}\r\n".encode()
        )

    async def send(self, status: int, body: bytes, content_type: str = "application/json") -> None:
        self.writer.write(self._head(status, content_type, f"Content-Length: {len(body)}\r\n") + body)
        await self.writer.drain()

    async def send_gzip(self, compressed: bytes) -> None:
        extra = f"Content-Encoding: gzip\r\nContent-Length: {len(compressed)}\r\n"
        self.writer.write(self._head(200, "application/json", extra) + compressed)
        await self.writer.drain()

    async def send_partial(self, body: bytes) -> None:
        """Promises the whole body, then sends only its first half."""
        self.writer.write(self._head(200, "application/json", f"Content-Length: {len(body)}\r\n"))
        self.writer.write(body[: len(body) // 2])
        await self.writer.drain()

    def start_stream(self) -> None:
        self.writer.write(
            self._head(200, "text/event-stream", "Transfer-Encoding: chunked\r\nCache-Control: no-cache\r\n")
        )

    async def send_chunk(self, data: bytes) -> None:
        self.writer.write(b"%x\r\n%s\r\n" % (len(data), data))
        await self.writer.drain()

    async def end_stream(self) -> None:
        self.writer.write(b"0\r\n\r\n")
        await self.writer.drain()

    async def wait_for_client_to_leave(self) -> None:
        self.keep_alive = False
        while await self.reader.read(65536):
            pass

    def drop(self) -> None:
        self.keep_alive = False
        self.writer.transport.abort()


class FakeProvider:
    def __init__(
        self,
        host: str = "127.0.0.1",
        port: int = 0,
        *,
        fault: str = "",
        latency: float = 0.0,
        api_key: str | None = None,
        max_recorded: int = 10_000,
    ) -> None:
        self.host = host
        self.port = port
        self.fault = fault  # applies to every request that does not name its own
        self.latency = latency  # added before every answer, as a real provider's thinking time
        self.api_key = api_key  # None: any non-empty key is accepted
        self.requests: collections.deque[RecordedRequest] = collections.deque(maxlen=max_recorded)
        self.connections_accepted = 0  # lets tests see whether a client reuses its connections
        self._ids = itertools.count(1)
        self._server: asyncio.Server | None = None
        self._connections: set[asyncio.Task] = set()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    @property
    def openai_base_url(self) -> str:
        return self.url + "/v1"

    @property
    def anthropic_base_url(self) -> str:
        return self.url

    def recorded(self, path: str) -> list[RecordedRequest]:
        return [r for r in list(self.requests) if r.path == path]

    # --- lifecycle -------------------------------------------------------------------------------

    async def open(self) -> None:
        self._server = await asyncio.start_server(
            self._serve_connection, self.host, self.port, limit=_MAX_HEAD_BYTES
        )
        self.port = self._server.sockets[0].getsockname()[1]

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
        for task in list(self._connections):
            task.cancel()
        await asyncio.gather(*self._connections, return_exceptions=True)
        if self._server is not None:
            await self._server.wait_closed()

    def start(self) -> FakeProvider:
        """Serves from a background thread with its own event loop; returns once the port is bound."""
        ready = threading.Event()
        failure: list[BaseException] = []

        def run() -> None:
            loop = asyncio.new_event_loop()
            self._loop = loop
            try:
                loop.run_until_complete(self.open())
            except BaseException as exc:
                failure.append(exc)
                ready.set()
                loop.close()
                return
            ready.set()
            loop.run_forever()
            loop.run_until_complete(self.close())
            loop.close()

        self._thread = threading.Thread(target=run, name="fake-provider", daemon=True)
        self._thread.start()
        ready.wait()
        if failure:
            raise failure[0]
        return self

    def stop(self) -> None:
        if self._loop is not None and self._thread is not None:
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join()
            self._loop = self._thread = None

    def __enter__(self) -> FakeProvider:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    # --- HTTP ------------------------------------------------------------------------------------

    async def _serve_connection(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._connections.add(task)
        self.connections_accepted += 1
        try:
            while True:
                request = await _read_request(reader)
                if request is None:
                    break
                method, path, version, headers, raw_body = request
                keep_alive = version == "HTTP/1.1" and headers.get("connection", "").lower() != "close"
                exchange = _Exchange(reader, writer, keep_alive)
                await self._answer(exchange, method, path, headers, raw_body)
                if not exchange.keep_alive:
                    break
        except (
            ConnectionError,
            asyncio.IncompleteReadError,
            asyncio.LimitOverrunError,
            asyncio.CancelledError,
        ):
            pass
        except BadRequest as exc:
            exchange = _Exchange(reader, writer, keep_alive=False)
            await exchange.send(400, error_body(False, 400, str(exc)))
        finally:
            writer.close()
            self._connections.discard(task)

    async def _answer(
        self, exchange: _Exchange, method: str, path: str, headers: dict[str, str], raw_body: bytes
    ) -> None:
        try:
            body = json.loads(raw_body) if raw_body else None
        except ValueError:
            body = None
        self.requests.append(RecordedRequest(method, path, headers, body))
        anthropic = path == "/v1/messages"
        try:
            if (method, path) == ("GET", "/health"):
                await exchange.send(200, b"ok", "text/plain")
                return
            if (method, path) == ("GET", "/v1/models"):
                self._authenticate(headers, anthropic="x-api-key" in headers)  # both APIs list models here
                data = [{"id": m, "object": "model", "created": 0, "owned_by": "fake"} for m in MODELS]
                await exchange.send(200, dumps({"object": "list", "data": data}))
                return
            if method != "POST" or path not in ("/v1/chat/completions", "/v1/embeddings", "/v1/messages"):
                raise _Failure(404, f"Unknown request URL: {method} {path}")
            key = self._authenticate(headers, anthropic)
            if path == "/v1/embeddings":
                conversation = None
            elif anthropic:
                conversation = anthropic_conversation(body, headers)
            else:
                conversation = openai_conversation(body)
            fault = self._fault(headers, conversation)
            if fault is not None and fault.kind == "status":
                raise _Failure(int(fault.value), self._fault_message(int(fault.value), key))
        except BadRequest as exc:
            await exchange.send(400, error_body(anthropic, 400, str(exc)))
            return
        except (KeyError, IndexError, TypeError, AttributeError) as exc:
            # A body of the wrong shape is the client's mistake, answered the way a real provider would.
            await exchange.send(400, error_body(anthropic, 400, f"malformed request body ({exc!r})"))
            return
        except _Failure as failure:
            await exchange.send(failure.status, error_body(anthropic, failure.status, failure.message))
            return
        delay = self.latency + (fault.value if fault is not None and fault.kind == "latency" else 0.0)
        if delay:
            await asyncio.sleep(delay)
        if fault is not None and fault.kind == "hang":
            await exchange.wait_for_client_to_leave()
            return
        if conversation is None:
            await self._answer_embeddings(exchange, body, fault)
        elif body.get("stream"):
            await self._answer_stream(exchange, body, conversation, fault, anthropic)
        else:
            await self._answer_unary(exchange, body, conversation, fault, anthropic)

    def _authenticate(self, headers: dict[str, str], anthropic: bool) -> str:
        if anthropic:
            key = headers.get("x-api-key", "")
        else:
            scheme, _, key = headers.get("authorization", "").partition(" ")
            key = key if scheme.lower() == "bearer" else ""
        if not key:
            raise _Failure(401, "You didn't provide an API key.")
        if self.api_key is not None and key != self.api_key:
            raise _Failure(401, self._fault_message(401, key))
        return key

    @staticmethod
    def _fault_message(status: int, key: str) -> str:
        # Real providers quote (part of) the rejected key back; the adapter must not pass it on.
        return f"Incorrect API key provided: {key}." if status == 401 else f"fake fault: status {status}"

    def _fault(self, headers: dict[str, str], conversation: Conversation | None) -> Fault | None:
        spec = headers.get(FAULT_HEADER, "")
        if not spec and conversation is not None:
            found = _FAULT_IN_TEXT.search(conversation.last_text)
            spec = found.group(1) if found else ""
        try:
            return Fault.parse(spec or self.fault)
        except ValueError as exc:
            raise BadRequest(str(exc)) from None

    # --- answers ---------------------------------------------------------------------------------

    async def _answer_embeddings(self, exchange: _Exchange, body: Any, fault: Fault | None) -> None:
        try:
            inputs = body["input"]
            # OpenAI's forms: a string, a list of strings, one token array, a list of token arrays.
            if isinstance(inputs, str) or (inputs and all(isinstance(i, int) for i in inputs)):
                inputs = [inputs]
            if not isinstance(inputs, list) or not all(
                isinstance(i, str) or (isinstance(i, list) and all(isinstance(t, int) for t in i))
                for i in inputs
            ):
                raise ValueError("input")
            dimensions = int(body.get("dimensions", 16))
            model = str(body["model"])
        except (TypeError, KeyError, ValueError):
            await exchange.send(400, error_body(False, 400, "'model' and 'input' are required"))
            return
        tokens = sum(count_words(i) if isinstance(i, str) else len(i) for i in inputs)
        # A token array is embedded as the text of its ids: the same ids give the same vector.
        inputs = [i if isinstance(i, str) else " ".join(map(str, i)) for i in inputs]
        payload = {
            "object": "list",
            "data": [
                {"object": "embedding", "index": i, "embedding": embedding(text, dimensions)}
                for i, text in enumerate(inputs)
            ],
            "model": model,
            "usage": {"prompt_tokens": tokens, "total_tokens": tokens},
        }
        await self._send_unary(exchange, dumps(_usage_kept(payload, fault)), fault)

    async def _answer_unary(
        self,
        exchange: _Exchange,
        body: dict,
        conversation: Conversation,
        fault: Fault | None,
        anthropic: bool,
    ) -> None:
        reply = reply_to(conversation)
        number = next(self._ids)
        payload = (
            anthropic_message(body, reply, number) if anthropic else openai_completion(body, reply, number)
        )
        await self._send_unary(exchange, dumps(_usage_kept(payload, fault)), fault)

    async def _send_unary(self, exchange: _Exchange, payload: bytes, fault: Fault | None) -> None:
        kind = fault.kind if fault is not None else ""
        if kind == "malformed":
            await exchange.send(200, b"<html>this is not JSON</html>")
        elif kind == "gzip_bomb":
            await exchange.send_gzip(_gzip_bomb())
        elif kind in ("drop_midstream", "hang_midstream"):
            await exchange.send_partial(payload)
            if kind == "drop_midstream":
                exchange.drop()
            else:
                await exchange.wait_for_client_to_leave()
        else:
            await exchange.send(200, payload)

    async def _answer_stream(
        self,
        exchange: _Exchange,
        body: dict,
        conversation: Conversation,
        fault: Fault | None,
        anthropic: bool,
    ) -> None:
        reply = reply_to(conversation)
        number = next(self._ids)
        events = anthropic_events(body, reply, number) if anthropic else openai_events(body, reply, number)
        kind = fault.kind if fault is not None else ""
        gap = fault.value if kind == "chunk_latency" else 0.0
        exchange.start_stream()
        if kind == "malformed":
            events = [b"data: {this is not json\n\n"]
        for i, event in enumerate(events):
            if i and gap:
                await asyncio.sleep(gap)
            await exchange.send_chunk(event)
            # Half the stream goes out before a mid-stream fault strikes.
            if i == len(events) // 2 and kind == "drop_midstream":
                exchange.drop()
                return
            if i == len(events) // 2 and kind == "hang_midstream":
                await exchange.wait_for_client_to_leave()
                return
        await exchange.end_stream()


def _usage_kept(payload: dict[str, Any], fault: Fault | None) -> dict[str, Any]:
    """`payload` as sent: without its usage under the no_usage fault."""
    if fault is not None and fault.kind == "no_usage":
        return {key: value for key, value in payload.items() if key != "usage"}
    return payload


@functools.cache
def _gzip_bomb() -> bytes:
    compressor = zlib.compressobj(9, zlib.DEFLATED, 16 + zlib.MAX_WBITS)  # 16 +: a gzip header
    zeros = bytes(1024 * 1024)
    parts = [compressor.compress(zeros) for _ in range(_BOMB_BYTES // len(zeros))]
    return b"".join(parts) + compressor.flush()


async def _read_request(
    reader: asyncio.StreamReader,
) -> tuple[str, str, str, dict[str, str], bytes] | None:
    """(method, path, version, headers, body) of the next request; None when the client closed."""
    try:
        head = await reader.readuntil(b"\r\n\r\n")
    except asyncio.IncompleteReadError as exc:
        if not exc.partial.strip():
            return None
        raise
    request_line, *header_lines = head.decode("latin-1").split("\r\n")
    parts = request_line.split(" ")
    if len(parts) != 3:
        raise BadRequest(f"malformed request line {request_line[:100]!r}")
    method, target, version = parts
    headers: dict[str, str] = {}
    for line in header_lines:
        if line:
            name, _, value = line.partition(":")
            headers[name.strip().lower()] = value.strip()
    try:
        if "chunked" in headers.get("transfer-encoding", "").lower():
            body = await _read_chunked(reader)
        else:
            body = await reader.readexactly(int(headers.get("content-length", "0")))
    except ValueError:
        raise BadRequest("malformed body framing") from None
    return method, target.split("?", 1)[0], version, headers, body


async def _read_chunked(reader: asyncio.StreamReader) -> bytes:
    body = bytearray()
    while True:
        size = int((await reader.readuntil(b"\r\n")).split(b";")[0], 16)
        if size == 0:
            await reader.readuntil(b"\r\n")  # the blank line closing a body without trailers
            return bytes(body)
        body += await reader.readexactly(size)
        await reader.readexactly(2)


async def _serve_until_signalled(provider: FakeProvider) -> None:
    await provider.open()
    print(f"fake provider listening on {provider.url}", flush=True)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    await stop.wait()
    await provider.close()


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=0, help="0 picks a free port (printed on start)")
    parser.add_argument("--fault", default="", help="a fault for every request, e.g. status:500")
    parser.add_argument("--latency", type=float, default=0.0, help="seconds added before every answer")
    parser.add_argument("--api-key", default=None, help="accept only this key (default: any non-empty key)")
    args = parser.parse_args()
    Fault.parse(args.fault)  # a typo fails here, not on the first request
    provider = FakeProvider(
        args.host, args.port, fault=args.fault, latency=args.latency, api_key=args.api_key
    )
    asyncio.run(_serve_until_signalled(provider))


if __name__ == "__main__":
    main()
