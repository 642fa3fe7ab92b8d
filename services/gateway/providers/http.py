"""What every provider adapter over HTTP shares: the pooled client, deadlines, SSE and error classification.

Every failure leaves this module as a `ProviderError` whose message is safe to show a client: it names the
provider and what went wrong, and carries at most a short, redacted excerpt of the provider's own error
message, never the key, a header, the base URL or a raw body.

The client is our own small keep-alive pool over httptools' parser (`http_client.py`, which says why not
aiohttp); httpx was measured too and spent far more (1.5 ms of CPU per request at 16 concurrent requests:
its pool checks every pooled connection's socket on each request).
"""

from __future__ import annotations

import asyncio
import json
import re
from collections.abc import AsyncIterator, Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import orjson

from libs import deadline
from libs.config import ProviderConfig
from libs.errors import DeadlineExceeded
from libs.logs import redact
from services.gateway.providers.base import CALLER_DEADLINE, ProviderError, note_request_sent
from services.gateway.providers.http_client import (
    MAX_BODY_BYTES,
    BodyTooLarge,
    ConnectFailed,
    ConnectionDropped,
    HttpError,
    HttpPool,
    HttpResponse,
    MalformedResponse,
)
from services.gateway.providers.keys import ProviderKey, ProviderKeys

# Time kept back from the caller's deadline so the Gateway can still answer after a provider times out.
DEADLINE_MARGIN_SECONDS = 0.05
MAX_PROVIDER_MESSAGE_CHARS = 200
# How long a finished stream's trailing bytes are awaited to keep its connection; past that it is closed.
DRAIN_SECONDS = 1.0
# Sized for a Gateway replica carrying thousands of concurrent requests to one provider; idle connections
# are kept so bursts do not pay for new TLS handshakes.
MAX_CONNECTIONS = 1024
KEEPALIVE_SECONDS = 30.0
# A streamed event's data line may carry a whole tool call's arguments: allow long lines.
MAX_SSE_LINE_BYTES = 16 * 1024 * 1024

_RETRYABLE_STATUSES = {408, 409, 429}
_CONFIG_STATUSES = {401, 402, 403}  # our key or account is wrong, not the caller's request
_KEY_REFUSED = {401, 403}  # this key is refused: another of the provider's keys may not be
# Long opaque tokens (keys, signatures) that a provider might echo back in an error message.
_OPAQUE_TOKEN = re.compile(r"[A-Za-z0-9_\-*.]{32,}")
_CONTROL_CHARS = re.compile(r"[\x00-\x1f\x7f]+")


@dataclass(frozen=True)
class SseEvent:
    event: str  # "" when the server sent no `event:` line (OpenAI)
    data: str


def sanitise_provider_message(message: str, secrets: Iterable[str] = ()) -> str:
    """A provider's error message, cut short and with our keys and anything key-shaped removed."""
    text = _CONTROL_CHARS.sub(" ", message)
    for secret in secrets:
        if secret:
            text = text.replace(secret, "[redacted]")
    text = _OPAQUE_TOKEN.sub("[redacted]", redact(text))
    text = " ".join(text.split())
    if len(text) > MAX_PROVIDER_MESSAGE_CHARS:
        text = text[: MAX_PROVIDER_MESSAGE_CHARS - 3] + "..."
    return text


def _error_message(payload: Any) -> str:
    """`error.message` from an OpenAI- or Anthropic-shaped error payload; "" for anything else."""
    error = payload.get("error") if isinstance(payload, dict) else None
    if isinstance(error, dict) and isinstance(error.get("message"), str):
        return error["message"]
    return ""


def _body_message(body: bytes) -> str:
    try:
        return _error_message(json.loads(body))
    except ValueError:
        return ""


def status_error(provider: str, status_code: int, body: bytes, secrets: Iterable[str] = ()) -> ProviderError:
    """Classifies a non-2xx answer: the provider's trouble is retryable, a request it refuses is not."""
    detail = sanitise_provider_message(_body_message(body), secrets)
    message = f"provider {provider} answered HTTP {status_code}" + (f": {detail}" if detail else "")
    kind = f"http_{status_code}"
    if status_code in _RETRYABLE_STATUSES or status_code >= 500:
        return ProviderError(message, retryable=True, status="UNAVAILABLE", kind=kind)
    if status_code in _CONFIG_STATUSES:
        return ProviderError(message, retryable=False, status="FAILED_PRECONDITION", kind=kind)
    if 400 <= status_code < 500:
        return ProviderError(message, retryable=False, status="INVALID_ARGUMENT", kind=kind)
    # Redirects and other surprises: this provider is misbehaving, another may not be.
    return ProviderError(message, retryable=True, status="UNAVAILABLE", kind=kind)


def timeout_error(provider: str) -> ProviderError:
    """The provider took longer than its own time limit (`timeout_seconds`): held against it."""
    return ProviderError(
        f"provider {provider} did not answer within the deadline",
        retryable=True,
        status="DEADLINE_EXCEEDED",
        kind="timeout",
    )


def deadline_error(provider: str) -> ProviderError:
    """The caller's own deadline ran out while `provider` was answering. Not held against the provider: a
    client that sets a short deadline must not open a breaker that moves every tenant to a pricier model
    (the Router is told it was no verdict on the target), and no other target is tried, the time is up."""
    return ProviderError(
        f"the request's deadline passed while provider {provider} was answering",
        retryable=False,
        status="DEADLINE_EXCEEDED",
        kind=CALLER_DEADLINE,
    )


def transport_error(provider: str, exc: HttpError | ValueError) -> ProviderError:
    """Classifies a failure below HTTP; the exception's own text is not used, it may hold addresses."""
    if isinstance(exc, ConnectFailed):
        return ProviderError(f"could not connect to provider {provider}", retryable=True, kind="connect")
    if isinstance(exc, BodyTooLarge):
        return bad_response_error(provider, f"body larger than {MAX_BODY_BYTES // (1024 * 1024)} MiB")
    if isinstance(exc, (MalformedResponse, ValueError)):
        # A malformed status line or headers, a line too long: the provider is misbehaving.
        return bad_response_error(provider, "unreadable HTTP response")
    assert isinstance(exc, ConnectionDropped)
    return ProviderError(
        f"provider {provider} dropped the connection mid-response", retryable=True, kind="dropped"
    )


def bad_response_error(provider: str, what: str) -> ProviderError:
    return ProviderError(
        f"provider {provider} sent a malformed response ({what})", retryable=True, kind="bad_response"
    )


def _decode_line(raw: bytes) -> str:
    """One line of an event stream, without its line ending (LF or CRLF), invalid UTF-8 replaced."""
    return raw.decode("utf-8", "replace").rstrip("\r\n")


class SseParser:
    """Turns the lines of a `text/event-stream` body into events (https://html.spec.whatwg.org/#sse)."""

    def __init__(self) -> None:
        self._event = ""
        self._data: list[str] = []

    def feed(self, line: str) -> SseEvent | None:
        if not line:
            if not self._data:
                self._event = ""
                return None
            event = SseEvent(self._event, "\n".join(self._data))
            self._event, self._data = "", []
            return event
        if line.startswith(":"):
            return None
        name, _, value = line.partition(":")
        value = value.removeprefix(" ")
        if name == "event":
            self._event = value
        elif name == "data":
            self._data.append(value)
        return None

    def finish(self) -> SseEvent | None:
        """The last event when the body ended without its blank line."""
        return self.feed("")


class HttpProvider:
    """One provider reached over HTTP: a pooled client bound to the configured base URL, and its key."""

    def __init__(self, name: str, config: ProviderConfig) -> None:
        self.name = name
        self._config = config
        self._keys = ProviderKeys(name, config)
        # Made on first use: the pool's connections belong to the event loop it is used in. Deadlines are
        # enforced around each step (asyncio.timeout), from the caller's remaining time.
        self._pool: HttpPool | None = None
        self._base_url = config.base_url

    def _client(self) -> HttpPool:
        if self._pool is None:
            self._pool = HttpPool(
                self._base_url, max_connections=MAX_CONNECTIONS, keepalive_seconds=KEEPALIVE_SECONDS
            )
        return self._pool

    async def _send(self, path: str, body: bytes, key: ProviderKey) -> HttpResponse:
        """The provider's response, headers read (the body not yet), within the caller's deadline."""
        headers = {
            "content-type": "application/json",
            "accept-encoding": "gzip, deflate",
            **self._auth_headers(key.secret),
        }
        timeout = self._timeout()
        try:
            async with asyncio.timeout(timeout):
                return await self._client().post(path, body, headers, note_request_sent)
        except TimeoutError:
            raise self._expired() from None
        except (HttpError, ValueError) as exc:
            raise transport_error(self.name, exc) from None

    async def _respond(self, path: str, body: dict[str, Any]) -> HttpResponse:
        """Sends `body` with the provider's keys in turn: a key refused with 401/403 is set aside and the
        next one tried, once each. The response of the last try, whatever its status."""
        payload = orjson.dumps(body)  # UTF-8 JSON, 0.15 µs instead of json's 3 µs
        tried: frozenset[str] = frozenset()
        while (key := self._key(tried)) is not None:
            response = await self._send(path, payload, key)
            if response.status in _KEY_REFUSED and self._refused_key(key, response.status, tried):
                response.release()
                tried |= {key.secret}
                continue
            return response
        raise AssertionError("unreachable: _key raises when no key was tried")

    def _auth_headers(self, api_key: str) -> dict[str, str]:
        raise NotImplementedError

    def _key(self, tried: frozenset[str]) -> ProviderKey | None:
        """The key for the next try: None once this request has tried every key (after a refusal)."""
        key = self._keys.pick(tried)
        if key is None and not tried:
            raise ProviderError(
                f"provider {self.name} has no API key configured (set {self._keys.source})",
                retryable=False,
                status="FAILED_PRECONDITION",
                kind="no_api_key",
            )
        return key

    def _refused_key(self, key: ProviderKey, status_code: int, tried: frozenset[str]) -> bool:
        """After a 401/403 for `key`: set it aside; True when another key is left to try."""
        self._keys.refused(key, status_code)
        return self._keys.pick(tried | {key.secret}) is not None

    def _timeout(self) -> float:
        """Seconds this step may take: the caller's remaining time less a margin, at most the config's."""
        try:
            return deadline.outbound_timeout(margin=DEADLINE_MARGIN_SECONDS, cap=self._config.timeout_seconds)
        except DeadlineExceeded:
            raise deadline_error(self.name) from None

    def _expired(self) -> ProviderError:
        """A step ran out of time: was it the caller's deadline (its timeout is the caller's remaining time
        less the margin, so about the margin is left now) or the provider's own limit?"""
        if deadline.spent(2 * DEADLINE_MARGIN_SECONDS):
            return deadline_error(self.name)
        return timeout_error(self.name)

    async def _post_json(self, path: str, body: dict[str, Any]) -> dict[str, Any]:
        response = await self._respond(path, body)
        try:
            async with asyncio.timeout(self._timeout()):
                content = await response.read()
        except TimeoutError:
            raise self._expired() from None
        except (HttpError, ValueError) as exc:
            raise transport_error(self.name, exc) from None
        finally:
            response.release()
        if response.status != 200:
            raise status_error(self.name, response.status, content, self._keys.secrets())
        try:
            payload = json.loads(content)
        except ValueError:
            raise bad_response_error(self.name, "body is not JSON") from None
        if not isinstance(payload, dict):
            raise bad_response_error(self.name, "body is not a JSON object")
        return payload

    async def _post_sse(
        self, path: str, body: dict[str, Any], *, is_last: Callable[[SseEvent], bool]
    ) -> AsyncIterator[SseEvent]:
        """The events of a streamed answer, up to the one `is_last` recognises.

        Each wait for the next line is bounded by the caller's deadline, so a stalled stream fails in time.
        """
        response = await self._respond(path, body)
        try:
            if response.status != 200:
                raise status_error(
                    self.name, response.status, await self._error_body(response), self._keys.secrets()
                )
            parser = SseParser()
            while True:
                try:
                    async with asyncio.timeout(self._timeout()):
                        raw = await response.readline(MAX_SSE_LINE_BYTES)
                except TimeoutError:
                    raise self._expired() from None
                except (HttpError, ValueError) as exc:
                    raise transport_error(self.name, exc) from None
                if not raw:
                    break
                event = parser.feed(_decode_line(raw))
                if event is not None:
                    yield event
                    if is_last(event):
                        await self._drain(response)
                        return
            last = parser.finish()
            if last is not None:
                yield last
        finally:
            response.release()

    async def _error_body(self, response: HttpResponse) -> bytes:
        try:
            async with asyncio.timeout(self._timeout()):
                return await response.read()
        except (TimeoutError, HttpError, ProviderError):
            return b""

    async def _drain(self, response: HttpResponse) -> None:
        """Reads what follows the last event so the connection goes back to the pool; the answer is
        complete, so trouble here costs only the connection."""
        try:
            async with asyncio.timeout(min(self._timeout(), DRAIN_SECONDS)):
                await response.read()
        except (TimeoutError, HttpError, ProviderError):
            response.close()

    def _parse_json(self, data: str) -> dict[str, Any]:
        try:
            payload = json.loads(data)
        except ValueError:
            raise bad_response_error(self.name, "stream event is not JSON") from None
        if not isinstance(payload, dict):
            raise bad_response_error(self.name, "stream event is not a JSON object")
        return payload

    @contextmanager
    def _reading(self, what: str) -> Iterator[None]:
        """Turns a provider answer of an unexpected shape into a retryable error instead of a crash."""
        try:
            yield
        except (KeyError, IndexError, TypeError, AttributeError, ValueError):
            raise bad_response_error(self.name, what) from None

    def _stream_error(self, payload: dict[str, Any]) -> ProviderError:
        """An error the provider reported inside a stream that had already started."""
        detail = sanitise_provider_message(_error_message(payload), self._keys.secrets())
        message = f"provider {self.name} failed mid-stream" + (f": {detail}" if detail else "")
        return ProviderError(message, retryable=True, kind="stream_error")

    def _dropped(self) -> ProviderError:
        return ProviderError(
            f"provider {self.name} ended the stream before it finished", retryable=True, kind="dropped"
        )

    async def close(self) -> None:
        if self._pool is not None:
            await self._pool.close()
