"""Hostile and malformed input on every endpoint: every request is answered (no 5xx), none hangs (each has a
deadline), and the server is healthy and correct afterwards.

Bodies are mutated field by field from a valid request of each endpoint (wrong types, extreme and
non-finite numbers, lone surrogates, invalid UTF-8, huge and empty values, unknown and dangerous
``generate_kwargs``); raw sockets send half bodies and hang up mid-request and mid-stream.
"""

from __future__ import annotations

import asyncio
import json
import socket
import time
from pathlib import Path
from typing import Any

import httpx
import pytest
from runtime_support import MODEL_ID, RunningServer, make_config, wait_for

pytestmark = [pytest.mark.runtime, pytest.mark.timeout(300)]

DEADLINE = 30.0  # per request; a hang fails the test instead of blocking it
BODY_TIMEOUT = 1.0
MAX_BODY = 256 * 1024

BASES: dict[str, dict[str, Any]] = {
    "/chat": {"prompt": "Hello world", "generate_kwargs": {"max_new_tokens": 3}},
    "/v1/completions": {"model": MODEL_ID, "prompt": "Hello world", "max_tokens": 3},
    "/v1/chat/completions": {
        "model": MODEL_ID,
        "messages": [{"role": "user", "content": "Hello"}],
        "max_tokens": 3,
    },
}
FIELDS: dict[str, list[str]] = {
    "/chat": [
        "prompt",
        "messages",
        "return_full_text",
        "clean_up_tokenization_spaces",
        "prefix",
        "handle_long_generation",
        "generate_kwargs",
    ],
    "/v1/completions": [
        "model",
        "prompt",
        "max_tokens",
        "temperature",
        "top_p",
        "n",
        "stop",
        "stream",
        "stream_options",
        "seed",
        "presence_penalty",
        "echo",
        "suffix",
        "best_of",
        "top_k",
        "min_p",
        "repetition_penalty",
        "min_tokens",
        "logprobs",
        "user",
    ],
    "/v1/chat/completions": [
        "model",
        "messages",
        "max_tokens",
        "max_completion_tokens",
        "temperature",
        "top_p",
        "n",
        "stop",
        "stream",
        "seed",
        "tools",
        "top_k",
        "repetition_penalty",
        "min_tokens",
    ],
}
GENERATE_KWARGS = [
    "max_length",
    "min_length",
    "do_sample",
    "num_beams",
    "temperature",
    "top_k",
    "top_p",
    "typical_p",
    "min_p",
    "repetition_penalty",
    "no_repeat_ngram_size",
    "max_new_tokens",
    "min_new_tokens",
    "num_return_sequences",
    "pad_token_id",
    "eos_token_id",
]
# Raw JSON fragments (not all expressible with json.dumps): extremes, non-finite, wrong types.
VALUES = [
    "null",
    "true",
    "0",
    "-1",
    "1e-320",
    "1e308",
    "-1e308",
    "1e999",
    "NaN",
    "Infinity",
    "-Infinity",
    str(2**64),
    str(-(2**63) - 1),
    str(10**40),
    '""',
    '"x"',
    '"\\ud800"',
    '"\\udfff\\ud800"',
    "[]",
    "[1,2,3]",
    "[[]]",
    "[-1]",
    "[99999999999]",
    '["\\ud83d"]',
    "{}",
    '{"a":1}',
    '"' + "y" * 70_000 + '"',
]
# generate() options transformers accepts but that change its return type, need objects or crash.
HOSTILE_GENERATE_KWARGS: list[dict[str, Any]] = [
    {"return_dict_in_generate": True, "output_scores": True},
    {"num_beam_groups": 2, "num_beams": 2, "diversity_penalty": 1.0},
    {"forced_bos_token_id": 10**9},
    {"forced_eos_token_id": -5},
    {"begin_suppress_tokens": [10**9]},
    {"suppress_tokens": [-1]},
    {"bad_words_ids": [[10**9]]},
    {"num_beams": 4},
    {"streamer": "stdout"},
    {"logits_processor": []},
    {"eos_token_id": [10**9]},
    {"eos_token_id": []},
    {"pad_token_id": 10**9},
    {"temperature": 1e-300, "do_sample": True},
    {"temperature": 1e-30, "top_p": 1e-30, "do_sample": True},
    {"top_k": 1, "top_p": 1e-9, "typical_p": 1e-9, "min_p": 1.0, "do_sample": True},
    {"repetition_penalty": 1e-300, "do_sample": True},
    {"repetition_penalty": 100, "do_sample": False},
    {"min_new_tokens": 10**9, "max_new_tokens": 2},
    {"max_length": 1},
    {"num_return_sequences": 16, "max_new_tokens": 2},
    {"no_repeat_ngram_size": 1, "max_new_tokens": 5},
    {"seed": 3},
]


def cases() -> list[tuple[str, bytes]]:
    """(path, raw body) pairs: each valid base with one field replaced by each hostile value."""
    out: list[tuple[str, bytes]] = []
    for path, base in BASES.items():
        for name in FIELDS[path]:
            for raw in VALUES:
                fields = {k: json.dumps(v) for k, v in base.items()}
                fields[name] = raw
                out.append((path, ("{" + ",".join(f'"{k}":{v}' for k, v in fields.items()) + "}").encode()))
        # Empty and non-object bodies, invalid UTF-8, truncated JSON.
        for raw_body in (
            b"",
            b"null",
            b"[]",
            b"{}",
            b'"x"',
            b"\xff\xfe{}",
            b'{"prompt":"\xc3\x28"}',
            b'{"a":',
        ):
            out.append((path, raw_body))
        stream = {**base, "stream": True} if path != "/chat" else base
        out.append((path, json.dumps({**stream, "seed": 2**80}).encode()))
        out.append((path, json.dumps({**stream, "stop": ["a"] * 100}).encode()))
        out.append((path, json.dumps({**stream, "stop": "\ud800"}, ensure_ascii=True).encode()))
    for kwargs in HOSTILE_GENERATE_KWARGS:
        gen = {"max_new_tokens": 3, **kwargs}
        out.append(("/chat", json.dumps({"prompt": "Hello", "generate_kwargs": gen}).encode()))
    for name in GENERATE_KWARGS:
        for raw in VALUES:
            out.append(
                (
                    "/chat",
                    (f'{{"prompt":"Hi","generate_kwargs":{{"max_new_tokens":3,"{name}":{raw}}}}}').encode(),
                )
            )
    hostile_messages = [
        [{"role": "user", "content": [{"type": "text", "text": "\ud800"}]}],
        [{"role": "user", "content": [{"type": "text"}]}],
        [{"role": "\ud800", "content": "x"}],
        [{"role": "user", "content": {"nested": True}}],
        [{"role": "user", "content": "x" * 60_000}],
        [{"role": "user"}] * 2000,
    ]
    for messages in hostile_messages:
        for path in ("/chat", "/v1/chat/completions"):
            body = {**BASES[path], "messages": messages}
            body.pop("prompt", None)
            out.append((path, json.dumps(body).encode()))
    out.append(("/v1/completions", json.dumps({**BASES["/v1/completions"], "prompt": ["a"] * 1000}).encode()))
    # Nesting deeper than the JSON parser's recursion limit, an integer of more digits than Python parses.
    out.append(("/v1/completions", b'{"model":"m","prompt":' + b"[" * 100_000 + b"]" * 100_000 + b"}"))
    out.append(("/chat", b'{"prompt":"x","generate_kwargs":{"max_new_tokens":' + b"1" * 5000 + b"}}"))
    out.append(
        ("/v1/completions", json.dumps({**BASES["/v1/completions"], "stop": ["z" * 100_000]}).encode())
    )
    out.append(
        ("/v1/completions", json.dumps({**BASES["/v1/completions"], "prompt": [[1, 2]] * 1000}).encode())
    )
    out.append(("/v1/completions", json.dumps({**BASES["/v1/completions"], "prompt": [1] * 5000}).encode()))
    out.append(
        ("/v1/completions", b'{"model":"%s","prompt":"' % MODEL_ID.encode() + b"z" * (MAX_BODY + 10) + b'"}')
    )
    return out


async def send(h: httpx.AsyncClient, path: str, body: bytes) -> tuple[int, bytes]:
    """POST and read the whole answer (streams included) within the deadline."""
    async with asyncio.timeout(DEADLINE):
        async with h.stream("POST", path, content=body, headers={"content-type": "application/json"}) as r:
            data = await r.aread()
            return r.status_code, data


def raw_exchange(url: str, payload: bytes, read: bool, timeout: float) -> bytes:
    """Send raw bytes on a fresh connection; optionally read until the server closes it."""
    host, port = url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=timeout) as s:
        s.sendall(payload)
        if not read:
            return b""
        chunks = []
        while True:
            chunk = s.recv(65536)
            if not chunk:
                return b"".join(chunks)
            chunks.append(chunk)


def fuzz_config(tiny_model_dir: Path) -> Any:
    return make_config(tiny_model_dir, body_timeout_s=BODY_TIMEOUT, max_body_bytes=MAX_BODY)


async def test_no_input_gets_a_5xx_or_hangs(tiny_model_dir: Path, server_factory: Any) -> None:
    server: RunningServer = server_factory(fuzz_config(tiny_model_dir))
    all_cases = cases()
    failures: list[str] = []
    statuses: dict[int, int] = {}
    sem = asyncio.Semaphore(8)
    async with httpx.AsyncClient(base_url=server.url, timeout=DEADLINE) as h:

        async def one(path: str, body: bytes) -> None:
            async with sem:
                try:
                    status, data = await send(h, path, body)
                except TimeoutError:
                    failures.append(f"HANG {path} {body[:200]!r}")
                    return
                statuses[status] = statuses.get(status, 0) + 1
                if status >= 500 or b"Traceback" in data or b'"code":500' in data:
                    failures.append(f"{status} {path} {body[:200]!r}: {data[:300]!r}")

        await asyncio.gather(*(one(p, b) for p, b in all_cases))
        odd = [
            ("GET", "/v1/models/%FF"),
            ("GET", "/v1/models/%ED%A0%80"),
            ("GET", "/v1/models/" + "a" * 5000),
            ("GET", "/v1/models/a/b/../c"),
            ("GET", "/health?x=%FF"),
            ("PUT", "/chat"),
            ("DELETE", "/v1/models"),
            ("GET", "/v1/completions"),
            ("POST", "/metrics"),
        ]
        for method, path in odd:
            async with asyncio.timeout(DEADLINE):
                r = await h.request(method, path)
            if r.status_code >= 500:
                failures.append(f"{r.status_code} {method} {path}: {r.text[:200]}")
    assert not failures, f"{len(failures)} of {len(all_cases)} failed:\n" + "\n".join(failures[:40])
    assert statuses.get(200, 0) > 20 and statuses.get(400, 0) + statuses.get(422, 0) > 100, statuses
    await assert_healthy(server)


async def test_half_sent_bodies_and_disconnects(tiny_model_dir: Path, server_factory: Any) -> None:
    server: RunningServer = server_factory(fuzz_config(tiny_model_dir))
    engine = server.runtime.engine
    body = json.dumps(BASES["/chat"]).encode()
    head = f"POST /chat HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n"
    # A body shorter than its Content-Length: answered 408 and closed after the read deadline.
    started = time.monotonic()
    answer = await asyncio.to_thread(raw_exchange, server.url, head.encode() + body[:10], True, DEADLINE)
    assert answer.startswith(b"HTTP/1.1 408"), answer[:200]
    assert b"connection: close" in answer.lower()
    assert time.monotonic() - started < BODY_TIMEOUT + 10
    # A Content-Length over the limit: 413 at once, without reading the body.
    big = f"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: {MAX_BODY * 4}\r\n\r\n"
    answer = await asyncio.to_thread(raw_exchange, server.url, big.encode(), True, DEADLINE)
    assert answer.startswith(b"HTTP/1.1 413"), answer[:200]
    # Hang up mid-headers, mid-body and right after the request (before the answer).
    for payload in (
        b"POST /chat HTTP/1.1\r\nHost: x\r\nContent-Le",
        head.encode() + body[:5],
        head.encode() + body,
    ):
        await asyncio.to_thread(raw_exchange, server.url, payload, False, DEADLINE)
    # Hang up mid-stream, on both streaming endpoints.
    for path in ("/v1/completions", "/v1/chat/completions"):
        req = {**BASES[path], "max_tokens": 200, "stream": True}
        async with (
            httpx.AsyncClient(base_url=server.url, timeout=DEADLINE) as h,
            h.stream("POST", path, json=req) as r,
        ):
            assert r.status_code == 200
            async for line in r.aiter_lines():
                if line.startswith("data: {"):
                    break
    await asyncio.to_thread(wait_for, lambda: engine.pending == 0, 15, "abandoned requests to be released")
    await asyncio.to_thread(wait_for, lambda: engine.scheduler.running_rows == 0, 15, "rows to leave")
    await assert_healthy(server)


async def test_5xx_closes_the_connection(tiny_model_dir: Path, server_factory: Any) -> None:
    """If anything still fails inside the server, the answer is a JSON 500 with Connection: close, and
    the client's next request on a new connection works."""
    server: RunningServer = server_factory(fuzz_config(tiny_model_dir))

    def broken(*_args: Any) -> list[int]:
        raise RuntimeError("tokenizer exploded")

    engine = server.runtime.engine
    original = engine.encode_prompt
    engine.encode_prompt = broken
    try:
        async with httpx.AsyncClient(base_url=server.url, timeout=DEADLINE) as h:
            r = await h.post("/v1/completions", json=BASES["/v1/completions"])
            assert r.status_code == 500
            assert r.headers["connection"] == "close"
            assert r.json()["error"]["message"] == "Internal server error"
            engine.encode_prompt = original
            r = await h.post("/v1/completions", json=BASES["/v1/completions"])
            assert r.status_code == 200
    finally:
        engine.encode_prompt = original


async def assert_healthy(server: RunningServer) -> None:
    async with httpx.AsyncClient(base_url=server.url, timeout=DEADLINE) as h:
        assert (await h.get("/health")).status_code == 200
        r = await h.post(
            "/v1/completions", json={"model": MODEL_ID, "prompt": "Hello", "max_tokens": 4, "temperature": 0}
        )
        assert r.status_code == 200, r.text
        assert r.json()["usage"]["completion_tokens"] == 4
