"""The gateway's upstream client (gateway/http/native.py) against scripted HTTP/1.1 servers.

Each server here is a few lines of asyncio that answers in one exact way (a stale
keep-alive close, a 1xx before the answer, ...): protocol edge cases that no engine
produces on demand. The whole gateway against a fake engine is test_gateway_faults.py.
"""

from __future__ import annotations

import asyncio

import pytest

from sagellm_cli.gateway.http.native import NativeUpstream, UnsupportedURL
from sagellm_cli.gateway.http.upstream import UpstreamConnectError

OK = b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: 2\r\n\r\n{}"


async def _server(answer):
    """A server on 127.0.0.1 calling `answer(request_head, reader, writer)` per request."""
    seen: list[bytes] = []
    conns: list[asyncio.StreamWriter] = []

    async def handle(reader, writer):
        conns.append(writer)
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                length = 0
                for line in head.split(b"\r\n"):
                    if line.lower().startswith(b"content-length:"):
                        length = int(line.split(b":", 1)[1])
                await reader.readexactly(length)
                seen.append(head)
                if not await answer(head, reader, writer):
                    break
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            writer.close()

    server = await asyncio.start_server(handle, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    return server, f"http://127.0.0.1:{port}", seen, conns


def _run(coro):
    return asyncio.run(asyncio.wait_for(coro, 20))


def test_the_gateway_uses_the_native_client(tmp_path):
    from sagellm_cli.core.state import StateStore
    from sagellm_cli.gateway.config import GatewayConfig
    from sagellm_cli.gateway.http.app import Gateway

    config = GatewayConfig(admin_token="t", connect_timeout_s=2.5)
    gateway = Gateway(config, StateStore(tmp_path / "state.json"))
    assert isinstance(gateway.upstream, NativeUpstream)
    assert gateway.upstream.connect_timeout == 2.5


def test_https_and_other_schemes_are_refused_before_connecting():
    async def main():
        client = NativeUpstream()
        await client.start()
        for url in ("https://127.0.0.1:1/v1/chat/completions", "ftp://x/", "http:///nohost"):
            with pytest.raises(UnsupportedURL, match="plain http:// only"):
                await client.post(url, b"{}", {})
        assert client.idle_connections() == 0
        await client.close()

    _run(main())


def test_keep_alive_reuse_and_idle_connections_are_closed():
    async def answer(head, reader, writer):
        await asyncio.sleep(0.05)  # so that the requests overlap
        writer.write(OK)
        return True

    async def main():
        server, url, seen, conns = await _server(answer)
        client = NativeUpstream(idle_timeout=0.5)
        await client.start()

        async def one():
            resp = await client.post(url + "/v1/chat/completions", b"{}", {"X-A": "1"})
            assert resp.status == 200 and await resp.read() == b"{}"
            await resp.close()

        await asyncio.gather(*(one() for _ in range(5)))
        assert client.idle_connections() == 5 and len(conns) == 5
        await one()  # reuses one of them
        assert len(conns) == 5 and len(seen) == 6
        assert b"X-A: 1\r\n" in seen[0] and seen[0].startswith(b"POST /v1/chat/completions ")
        await asyncio.sleep(1.2)  # past idle_timeout: the pool shrinks to nothing
        assert client.idle_connections() == 0
        assert all(w.is_closing() or w.transport.is_closing() for w in conns)
        await client.close()
        server.close()

    _run(main())


def test_a_request_is_never_sent_twice_when_a_reused_connection_drops():
    answered = []

    async def answer(head, reader, writer):
        if not answered:
            answered.append(head)
            writer.write(OK)
            return True
        return False  # read the request, then close without answering

    async def main():
        server, url, seen, _ = await _server(answer)
        client = NativeUpstream()
        await client.start()
        resp = await client.post(url + "/x", b"{}", {})
        await resp.read()
        await resp.close()
        with pytest.raises(UpstreamConnectError, match="not re-sent"):
            await client.post(url + "/x", b'{"n": 2}', {})
        await asyncio.sleep(0.1)
        assert len(seen) == 2  # the second request reached the server exactly once
        await client.close()
        server.close()

    _run(main())


def test_informational_responses_are_skipped():
    async def answer(head, reader, writer):
        writer.write(b"HTTP/1.1 103 Early Hints\r\nLink: </a>\r\n\r\n" + OK)
        return True

    async def main():
        server, url, _, _ = await _server(answer)
        client = NativeUpstream()
        await client.start()
        for _ in range(2):
            resp = await client.post(url + "/x", b"{}", {})
            assert resp.status == 200 and resp.content_type == "application/json"
            assert await resp.read() == b"{}"
            await resp.close()
        assert client.idle_connections() == 1
        await client.close()
        server.close()

    _run(main())


def test_an_unfinished_stream_closes_its_connection_and_headers_cannot_inject():
    async def answer(head, reader, writer):
        writer.write(
            b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\n"
            b"Transfer-Encoding: chunked\r\n\r\n6\r\ndata: \r\n"
        )
        await reader.read()  # until the client closes the connection
        return False

    async def main():
        server, url, _, conns = await _server(answer)
        client = NativeUpstream()
        await client.start()
        resp = await client.post(url + "/x", b"{}", {})
        chunks = resp.chunks()
        assert await chunks.__anext__() == b"data: "
        await resp.close()
        await asyncio.sleep(0.1)
        assert client.idle_connections() == 0
        assert conns[0].transport.is_closing() or conns[0].is_closing()
        with pytest.raises(ValueError, match="line break"):
            await client.post(url + "/x", b"{}", {"X-A": "1\r\nX-Evil: 1"})
        await client.close()
        server.close()

    _run(main())
