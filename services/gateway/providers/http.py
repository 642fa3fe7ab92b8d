"""What every provider adapter over HTTP shares: the pooled client, deadlines, SSE and error classification.

Every failure leaves this module as a `ProviderError` whose message is safe to show a client: it names the
provider and what went wrong, and carries at most a short, redacted excerpt of the provider's own error
message, never the key, a header, the base URL or a raw body.
"""

from __future__ import annotations

import asyncio
import json
import re
from collections.abc import AsyncIterator, Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import httpx

from libs import deadline
from libs.config import ProviderConfig
from libs.errors import DeadlineExceeded
from libs.logs import redact
from services.gateway.providers.base import ProviderError
from services.gateway.providers.keys import ProviderKey, ProviderKeys

# Time kept back from the caller's deadline so the Gateway can still answer after a provider times out.
DEADLINE_MARGIN_SECONDS = 0.05
MAX_PROVIDER_MESSAGE_CHARS = 200
# How long a finished stream's trailing bytes are awaited to keep its connection; past that it is closed.
DRAIN_SECONDS = 1.0
# Sized for a Gateway replica carrying thousands of concurrent requests to one provider; idle connections
# are kept so bursts do not pay for new TLS handshakes.
POOL_LIMITS = httpx.Limits(max_connections=1024, max_keepalive_connections=1024, keepalive_expiry=30.0)

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
    return ProviderError(
        f"provider {provider} did not answer within the deadline",
        retryable=True,
        status="DEADLINE_EXCEEDED",
        kind="timeout",
    )


def transport_error(provider: str, exc: httpx.RequestError) -> ProviderError:
    """Classifies a failure below HTTP; the exception's own text is not used, it may hold addresses."""
    if isinstance(exc, httpx.TimeoutException):
        return timeout_error(provider)
    if isinstance(exc, httpx.ConnectError):
        return ProviderError(f"could not connect to provider {provider}", retryable=True, kind="connect")
    if isinstance(exc, httpx.DecodingError):
        return bad_response_error(provider, "body could not be decoded")
    return ProviderError(
        f"provider {provider} dropped the connection mid-response", retryable=True, kind="dropped"
    )


def bad_response_error(provider: str, what: str) -> ProviderError:
    return ProviderError(
        f"provider {provider} sent a malformed response ({what})", retryable=True, kind="bad_response"
    )


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
        self._client = httpx.AsyncClient(
            base_url=config.base_url,
            limits=POOL_LIMITS,
            timeout=config.timeout_seconds,
            follow_redirects=False,
        )

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
            raise timeout_error(self.name) from None

    async def _post_json(self, path: str, body: dict[str, Any]) -> dict[str, Any]:
        tried: frozenset[str] = frozenset()
        while (key := self._key(tried)) is not None:
            timeout = self._timeout()
            try:
                # httpx's timeouts bound each network step; this bounds the whole exchange.
                async with asyncio.timeout(timeout):
                    response = await self._client.post(
                        path, json=body, headers=self._auth_headers(key.secret), timeout=timeout
                    )
            except TimeoutError:
                raise timeout_error(self.name) from None
            except httpx.RequestError as exc:
                raise transport_error(self.name, exc) from None
            if response.status_code in _KEY_REFUSED and self._refused_key(key, response.status_code, tried):
                tried |= {key.secret}
                continue
            break
        if response.status_code != 200:
            raise status_error(self.name, response.status_code, response.content, self._keys.secrets())
        try:
            payload = response.json()
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
        tried: frozenset[str] = frozenset()
        while (key := self._key(tried)) is not None:
            timeout = self._timeout()
            request = self._client.build_request(
                "POST", path, json=body, headers=self._auth_headers(key.secret), timeout=timeout
            )
            try:
                async with asyncio.timeout(timeout):
                    response = await self._client.send(request, stream=True)
            except TimeoutError:
                raise timeout_error(self.name) from None
            except httpx.RequestError as exc:
                raise transport_error(self.name, exc) from None
            if response.status_code in _KEY_REFUSED and self._refused_key(key, response.status_code, tried):
                await response.aclose()
                tried |= {key.secret}
                continue
            break
        try:
            if response.status_code != 200:
                raise status_error(
                    self.name, response.status_code, await self._error_body(response), self._keys.secrets()
                )
            parser = SseParser()
            lines = response.aiter_lines()
            while True:
                try:
                    async with asyncio.timeout(self._timeout()):
                        line = await anext(lines)
                except StopAsyncIteration:
                    break
                except TimeoutError:
                    raise timeout_error(self.name) from None
                except httpx.RequestError as exc:
                    raise transport_error(self.name, exc) from None
                event = parser.feed(line)
                if event is not None:
                    yield event
                    if is_last(event):
                        await self._drain(lines)
                        return
            last = parser.finish()
            if last is not None:
                yield last
        finally:
            await response.aclose()

    async def _error_body(self, response: httpx.Response) -> bytes:
        try:
            async with asyncio.timeout(self._timeout()):
                return await response.aread()
        except (TimeoutError, httpx.RequestError, ProviderError):
            return b""

    async def _drain(self, lines: AsyncIterator[str]) -> None:
        """Reads what follows the last event so the connection goes back to the pool; the answer is
        complete, so trouble here costs only the connection."""
        try:
            async with asyncio.timeout(min(self._timeout(), DRAIN_SECONDS)):
                async for _ in lines:
                    pass
        except (TimeoutError, httpx.RequestError, ProviderError):
            pass

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
        await self._client.aclose()
