"""`fastserve bench --backend openai`: a request the server fails is counted, not fatal to the run."""

from __future__ import annotations

import asyncio

import httpx

from fastserve.bench.load import send_openai
from fastserve.bench.report import format_summary, summarize


async def _drop_then_serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    """A real socket server: closes the first connection before any response, streams on the rest."""
    await reader.readuntil(b"\r\n\r\n")
    if not _drop_then_serve.dropped:
        _drop_then_serve.dropped = True
        writer.close()
        return
    events = [
        b'data: {"choices": [{"text": "a", "finish_reason": null}]}\n\n',
        b'data: {"choices": [{"text": "b", "finish_reason": "length"}], "usage": {"completion_tokens": 2}}\n\n',
        b"data: [DONE]\n\n",
    ]
    body = b"".join(events)
    head = b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\nconnection: close\r\n"
    writer.write(head + b"content-length: %d\r\n\r\n" % len(body) + body)
    await writer.drain()
    writer.close()


async def _two_requests() -> list:
    _drop_then_serve.dropped = False
    server = await asyncio.start_server(_drop_then_serve, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    url = f"http://127.0.0.1:{port}/v1/completions"
    async with server, httpx.AsyncClient(timeout=10) as client:
        start = asyncio.get_running_loop().time()
        return [await send_openai(client, url, "m", f"r{i}", [5, 6, 7], 2, start) for i in range(2)]


def test_a_dropped_connection_is_a_failed_request_and_the_run_goes_on(capsys):
    failed, served = asyncio.run(_two_requests())
    assert failed.finish_reason == "error" and failed.output_tokens == 0
    assert "request r0 failed" in capsys.readouterr().err
    assert served.finish_reason == "length" and served.output_tokens == 2
    rows = [
        {**vars(r), "arrival": 0.0, "first_token": t, "finish": t + 1.0}
        for r, t in ((failed, 0.1), (served, 0.5))
    ]
    result = summarize(rows)
    assert (result["num_requests"], result["completed"], result["failed"]) == (2, 1, 1)
    assert result["ttft"]["mean"] == 0.5  # the failed request's times are not latencies
    assert "Failed requests:" in format_summary(result)
