"""The providers' HTTP/1.1 client against a real socket server that answers with scripted bytes."""

from __future__ import annotations

import asyncio
import gzip
import ssl
import tracemalloc
import zlib
from collections.abc import Awaitable, Callable

import pytest

from libs.tls import Identity, ca_path, cert_path, key_path
from services.gateway.providers.http_client import (
    BodyTooLarge,
    ConnectFailed,
    ConnectionDropped,
    HttpPool,
    MalformedResponse,
)
from tests.support import free_port
from tools import certs

Reply = Callable[[bytes, asyncio.StreamWriter], Awaitable[bool]]  # request head → keep the connection?


class ScriptedServer:
    """Reads each request (head and Content-Length body) and lets `reply` write raw bytes back."""

    def __init__(self, reply: Reply, tls: ssl.SSLContext | None = None) -> None:
        self.reply = reply
        self.tls = tls
        self.connections = 0
        self.requests: list[bytes] = []
        self.url = ""
        self._server: asyncio.Server | None = None
        self._writers: list[asyncio.StreamWriter] = []

    async def __aenter__(self) -> ScriptedServer:
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", 0, ssl=self.tls)
        scheme = "https" if self.tls else "http"
        self.url = f"{scheme}://localhost:{self._server.sockets[0].getsockname()[1]}/v1"
        return self

    async def __aexit__(self, *exc) -> None:
        self._server.close()
        for writer in self._writers:
            writer.close()  # ends each connection's loop
        await asyncio.sleep(0.01)

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        self._writers.append(writer)
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                length = next(
                    int(line.split(b":")[1])
                    for line in head.split(b"\r\n")
                    if line.lower().startswith(b"content-length")
                )
                self.requests.append(head + await reader.readexactly(length))
                if not await self.reply(head, writer):
                    break
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            writer.close()


def ok(body: bytes, *extra: str) -> bytes:
    headers = "".join(f"{h}\r\n" for h in extra)
    return f"HTTP/1.1 200 OK\r\nContent-Length: {len(body)}\r\n{headers}\r\n".encode() + body


def pool(server: ScriptedServer, **options) -> HttpPool:
    return HttpPool(server.url, keepalive_seconds=30, **({"max_connections": 8} | options))


async def post(client: HttpPool, body: bytes = b"{}") -> tuple[int, bytes]:
    response = await client.post("/chat", body, {"content-type": "application/json"})
    try:
        return response.status, await response.read()
    finally:
        response.release()


async def test_the_request_names_host_path_and_length_and_the_connection_is_kept():
    async def reply(head, writer):
        writer.write(ok(b'{"a":1}'))
        return True

    async with ScriptedServer(reply) as server:
        client = pool(server)
        assert await post(client, b'{"q":2}') == (200, b'{"a":1}')
        assert await post(client) == (200, b'{"a":1}')
        await client.close()

    first = server.requests[0].decode()
    port = server.url.split(":")[2].split("/")[0]
    assert first.startswith("POST /v1/chat HTTP/1.1\r\nHost: localhost:" + port + "\r\n")
    assert "content-type: application/json\r\nContent-Length: 7\r\n\r\n" in first and first.endswith(
        '{"q":2}'
    )
    assert server.connections == 1


async def test_connection_close_and_a_body_read_until_close_are_not_reused():
    answers = [ok(b"one", "Connection: close"), b"HTTP/1.1 200 OK\r\n\r\nuntil the end"]

    async def reply(head, writer):
        writer.write(answers.pop(0))
        return False

    async with ScriptedServer(reply) as server:
        client = pool(server)
        assert await post(client) == (200, b"one")
        assert await post(client) == (200, b"until the end")
        await client.close()
    assert server.connections == 2


async def test_gzip_and_deflate_bodies_are_decompressed_and_chunked_ones_joined():
    text = b"data: " + b"x" * 5000 + b"\n\n"
    answers = [
        ok(gzip.compress(b'{"zipped":true}'), "Content-Encoding: gzip"),
        ok(zlib.compress(b'{"deflated":true}'), "Content-Encoding: deflate"),
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n"
        + b"".join(
            b"%x\r\n%s\r\n" % (len(text[i : i + 700]), text[i : i + 700]) for i in range(0, len(text), 700)
        )
        + b"0\r\n\r\n",
    ]

    async def reply(head, writer):
        writer.write(answers.pop(0))
        return True

    async with ScriptedServer(reply) as server:
        client = pool(server)
        assert (await post(client))[1] == b'{"zipped":true}'
        assert (await post(client))[1] == b'{"deflated":true}'
        response = await client.post("/chat", b"{}", {})
        assert await response.readline(10_000) == b"data: " + b"x" * 5000 + b"\n"
        assert await response.readline(10_000) == b"\n"
        assert await response.readline(10_000) == b""
        response.release()
        await client.close()
    assert server.connections == 1


async def test_gzip_members_one_after_another_are_all_decoded_and_trailing_bytes_ignored():
    members = gzip.compress(b'{"first":') + gzip.compress(b'"member",') + gzip.compress(b'"last":true}')
    answers = [
        ok(members, "Content-Encoding: gzip"),
        # Bytes after a whole member that are not another member: ignored, as gzip(1) and urllib3 do.
        ok(gzip.compress(b'{"whole":true}') + b"\0\0\0\0", "Content-Encoding: gzip"),
    ]

    async def reply(head, writer):
        body = answers.pop(0)
        for i in range(0, len(body), 7):  # members split across reads
            writer.write(body[i : i + 7])
            await writer.drain()
        return True

    async with ScriptedServer(reply) as server:
        client = pool(server)
        assert await post(client) == (200, b'{"first":"member","last":true}')
        assert await post(client) == (200, b'{"whole":true}')
        await client.close()


async def test_a_compressed_body_that_decodes_to_nothing_is_still_bounded():
    limit = 4096
    answers = [
        ok(gzip.compress(b"{}") + b"\0" * limit, "Content-Encoding: gzip"),  # ignored bytes after a member
        ok(gzip.compress(b"") * 300, "Content-Encoding: gzip"),  # 300 empty members, ~6 KB
        ok(gzip.compress(b"{}") * 100, "Content-Encoding: gzip"),  # 100 members within the limit
    ]

    async def reply(head, writer):
        writer.write(answers.pop(0))
        return True

    async with ScriptedServer(reply) as server:
        client = pool(server, max_body_bytes=limit)
        for _ in range(2):
            with pytest.raises(BodyTooLarge, match="compressed body is larger than 4096 bytes"):
                await post(client)
        assert await post(client) == (200, b"{}" * 100)
        await client.close()


@pytest.mark.parametrize(
    ("encoding", "body"),
    [
        ("gzip", gzip.compress(b'{"cut":"inside its stream"}')[:-6]),
        ("deflate", zlib.compress(b'{"cut":"inside its stream"}')[:-3]),
    ],
    ids=["gzip", "deflate"],
)
async def test_a_compressed_body_cut_inside_its_stream_is_refused(encoding, body):
    answers = [ok(body, f"Content-Encoding: {encoding}"), ok(b"", f"Content-Encoding: {encoding}")]

    async def reply(head, writer):
        writer.write(answers.pop(0))
        return True

    async with ScriptedServer(reply) as server:
        client = pool(server)
        # HTTP framed the body whole (its Content-Length arrived); the compressed stream inside did not end.
        with pytest.raises(MalformedResponse, match="stops before the end of its stream"):
            await post(client)
        assert await post(client) == (200, b"")  # an empty body is not a cut one
        await client.close()


async def test_an_informational_response_is_skipped():
    async def reply(head, writer):
        writer.write(b"HTTP/1.1 103 Early Hints\r\nLink: </x>\r\n\r\n" + ok(b"real"))
        return True

    async with ScriptedServer(reply) as server:
        client = pool(server)
        response = await client.post("/chat", b"{}", {})
        assert (response.status, "link" in response.headers, await response.read()) == (200, False, b"real")
        response.release()
        await client.close()


@pytest.mark.parametrize(
    ("answer", "error"),
    [
        (b"HTTP/1.1 OK\r\n\r\n", MalformedResponse),  # no status code
        (b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\nContent-Encoding: br\r\n\r\nhello", MalformedResponse),
        (b"HTTP/1.1 200 OK\r\nX-Long: " + b"v" * 70_000 + b"\r\n\r\n", MalformedResponse),
        (b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nhalf", ConnectionDropped),
        (b"", ConnectionDropped),
    ],
    ids=["status-line", "unknown-encoding", "long-header", "short-body", "nothing"],
)
async def test_broken_answers_fail_with_their_kind_and_the_connection_is_dropped(answer, error):
    async def reply(head, writer):
        writer.write(answer)
        return False

    async with ScriptedServer(reply) as server:
        client = pool(server)
        with pytest.raises(error):
            await post(client)
        assert client._open == set() and client._idle == []
        await client.close()


async def test_a_corrupt_gzip_body_and_bytes_after_the_answer_are_refused():
    answers = [ok(b"not gzip at all", "Content-Encoding: gzip"), ok(b"fine") + b"HTTP/1.1 200 OK\r\n"]

    async def reply(head, writer):
        writer.write(answers.pop(0))
        return True

    async with ScriptedServer(reply) as server:
        client = pool(server)
        with pytest.raises(MalformedResponse):
            await post(client)
        # The answer itself is whole; the bytes after it make the connection unfit for another request.
        assert await post(client) == (200, b"fine")
        await asyncio.sleep(0.05)
        assert client._idle == []
        await client.close()
    assert server.connections == 2


async def test_a_body_past_the_limit_is_refused_however_well_it_compresses():
    limit = 1024 * 1024
    answers = [
        ok(gzip.compress(bytes(16 * limit)), "Content-Encoding: gzip"),  # 16 KB that expand to 16 MiB
        ok(b"a" * (limit + 1)),
        b"HTTP/1.1 200 OK\r\nConnection: close\r\n\r\n" + b"b" * (limit + 1),  # read until close
        ok(gzip.compress(b"c" * limit), "Content-Encoding: gzip"),  # the limit exactly
    ]

    async def reply(head, writer):
        answer = answers.pop(0)
        writer.write(answer)
        return b"Connection: close" not in answer

    async with ScriptedServer(reply) as server:
        client = pool(server, max_body_bytes=limit)
        for _ in range(3):
            with pytest.raises(BodyTooLarge, match=f"more than {limit} unread bytes"):
                await post(client)
        assert await post(client) == (200, b"c" * limit)
        await client.close()
    assert server.connections == 4  # a refused body's connection is not used again


async def test_a_decompression_bomb_is_never_expanded_past_the_limit():
    limit = 1024 * 1024
    bomb = gzip.compress(bytes(64 * limit))  # 64 KB

    async def reply(head, writer):
        writer.write(ok(bomb, "Content-Encoding: gzip"))
        return True

    async with ScriptedServer(reply) as server:
        client = pool(server, max_body_bytes=limit)
        tracemalloc.start()
        try:
            with pytest.raises(BodyTooLarge):
                await post(client)
            _, peak = tracemalloc.get_traced_memory()
        finally:
            tracemalloc.stop()
        await client.close()
    assert peak < 8 * limit, f"{peak} bytes held at once for a limit of {limit}"


async def test_a_line_longer_than_allowed_is_refused():
    async def reply(head, writer):
        writer.write(ok(b"y" * 3000 + b"\n"))
        return True

    async with ScriptedServer(reply) as server:
        client = pool(server)
        response = await client.post("/chat", b"{}", {})
        with pytest.raises(MalformedResponse):
            await response.readline(1000)
        response.close()
        await client.close()


async def test_a_slow_reader_pauses_the_socket_and_still_gets_every_byte():
    lines = [b"data: %d %s\n" % (i, b"z" * 1000) for i in range(2000)]  # ~2 MB, far above the high water
    body = b"".join(lines)

    async def reply(head, writer):
        writer.write(ok(body))
        await writer.drain()
        return True

    async with ScriptedServer(reply) as server:
        client = pool(server)
        response = await client.post("/chat", b"{}", {})
        got = []
        paused_seen = False
        while line := await response.readline(10_000):
            got.append(line)
            paused_seen = paused_seen or response._connection._paused
            if len(got) % 100 == 0:
                await asyncio.sleep(0.001)
        response.release()
        assert got == lines and paused_seen
        assert await post(client) == (200, body)  # the connection went back to the pool, readable
        await client.close()
    assert server.connections == 1


async def test_an_abandoned_response_closes_its_connection_and_frees_its_slot():
    async def reply(head, writer):
        if b"hang" in head:
            writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\npart")
        else:
            writer.write(ok(b"done"))
        return True

    async with ScriptedServer(reply) as server:
        client = pool(server, max_connections=1)
        response = await client.post("/chat", b"{}", {"x-mode": "hang"})
        with pytest.raises(TimeoutError):
            async with asyncio.timeout(0.1):
                await response.read()
        response.release()  # not read to the end: closed, not pooled
        assert await post(client) == (200, b"done")  # the only slot is free again
        await client.close()
    assert server.connections == 2


async def test_requests_beyond_the_limit_wait_for_a_free_connection():
    gate = asyncio.Event()

    async def reply(head, writer):
        await gate.wait()
        writer.write(ok(b"x"))
        return True

    async with ScriptedServer(reply) as server:
        client = pool(server, max_connections=2)
        calls = [asyncio.create_task(post(client)) for _ in range(5)]
        await asyncio.sleep(0.1)
        assert server.connections == 2 and len(server.requests) == 2
        gate.set()
        assert await asyncio.gather(*calls) == [(200, b"x")] * 5
        await client.close()
    assert server.connections == 2


async def test_an_idle_connection_the_server_closed_is_not_used_again():
    async def reply(head, writer):
        writer.write(ok(b"bye"))
        return False  # closes after answering, without saying so

    async with ScriptedServer(reply) as server:
        client = pool(server)
        assert await post(client) == (200, b"bye")
        await asyncio.sleep(0.05)
        assert await post(client) == (200, b"bye")
        await client.close()
    assert server.connections == 2


async def test_refused_connections_and_line_breaks_in_headers_fail_before_sending():
    client = HttpPool(f"http://127.0.0.1:{free_port()}", max_connections=2, keepalive_seconds=30)
    with pytest.raises(ConnectFailed):
        await post(client)
    with pytest.raises(ValueError):
        await client.post("/chat", b"{}", {"authorization": "Bearer k\r\nX-Evil: 1"})
    assert client._slots._value == 2
    with pytest.raises(ValueError):
        HttpPool("ftp://example.com", max_connections=1, keepalive_seconds=1)


async def test_https_verifies_the_provider_against_the_trusted_cas(tmp_path, monkeypatch):
    certs.generate(tmp_path)
    tls = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    tls.load_cert_chain(cert_path(tmp_path, Identity.GATEWAY), key_path(tmp_path, Identity.GATEWAY))

    async def reply(head, writer):
        writer.write(ok(b"secret"))
        return True

    async with ScriptedServer(reply, tls) as server:
        untrusting = pool(server)  # the system's CAs only: our test CA is not among them
        with pytest.raises(ConnectFailed):
            await post(untrusting)
        monkeypatch.setenv("SSL_CERT_FILE", str(ca_path(tmp_path)))  # as an operator adds a private CA
        client = pool(server)
        assert await post(client) == (200, b"secret")
        await client.close()


async def test_a_response_released_twice_leaves_the_next_request_on_its_connection_alone():
    gate = asyncio.Event()

    async def reply(head, writer):
        if b"second" in head:
            await gate.wait()
        writer.write(ok(b"x"))
        return True

    async with ScriptedServer(reply) as server:
        client = pool(server, max_connections=1)
        first = await client.post("/chat", b"{}", {})
        assert await first.read() == b"x"
        first.release()
        waiting = asyncio.create_task(client.post("/chat", b"{}", {"x-mode": "second"}))
        await asyncio.sleep(0.05)
        first.close()  # stale: must not close the connection the second request is waiting on
        gate.set()
        async with asyncio.timeout(5):  # the connection closed under it would leave it waiting
            second = await waiting
        assert await second.read() == b"x"
        second.release()
        await client.close()
    assert server.connections == 1
