"""Continuous batching through the real server: answers are what each request gets alone, seeded sampling
is reproducible inside a batch, and a request that leaves frees its row at once."""

from __future__ import annotations

import asyncio
import socket
import threading
from pathlib import Path
from typing import Any

import httpx
import pytest
from kaito_inference.config import ServerConfig
from kaito_inference.engine import LoadedModel, load_model
from runtime_support import MODEL_ID, RunningServer, make_config, wait_for

pytestmark = [pytest.mark.runtime, pytest.mark.timeout(120)]


def watching_loader(
    widths: list[int], armed: threading.Event | None = None, go: threading.Event | None = None
) -> Any:
    """Load the real model and record the batch width of every forward pass; once ``armed`` is set,
    forward passes wait for ``go`` (so that requests pile up however fast the model is)."""

    def load(cfg: ServerConfig) -> LoadedModel:
        loaded = load_model(cfg)

        def hook(_module: Any, _args: Any, kwargs: dict[str, Any]) -> None:
            if armed is not None and go is not None and armed.is_set():
                assert go.wait(30), "test never released the model"
            widths.append(int(kwargs["input_ids"].shape[0]))

        loaded.model.register_forward_pre_hook(hook, with_kwargs=True)
        return loaded

    return load


def completion(prompt: str, max_tokens: int, **extra: Any) -> dict[str, Any]:
    return {"model": MODEL_ID, "prompt": prompt, "max_tokens": max_tokens, **extra}


REQUESTS: list[tuple[str, dict[str, Any]]] = [
    ("/v1/completions", completion("Kubernetes schedules pods", 12, temperature=0)),
    ("/v1/completions", completion("Hello world", 5, temperature=0)),
    ("/v1/completions", completion("The quick brown fox jumps over the lazy dog.", 20, temperature=0)),
    ("/v1/completions", completion("KAITO", 9, temperature=0, repetition_penalty=1.3)),
    ("/v1/completions", completion("A tiny random model", 16, temperature=0.8, seed=11)),
    ("/v1/completions", completion("A tiny random model", 16, temperature=1.2, top_k=20, seed=12)),
    ("/v1/completions", completion("A tiny random model", 10, temperature=1.0, top_p=0.7, seed=13, n=3)),
    (
        "/v1/chat/completions",
        {
            "model": MODEL_ID,
            "messages": [{"role": "user", "content": "Hi there"}],
            "max_tokens": 14,
            "temperature": 0,
        },
    ),
    (
        "/chat",
        {"prompt": "Hello world! How are", "generate_kwargs": {"do_sample": False, "max_new_tokens": 8}},
    ),
    (
        "/chat",
        {
            "prompt": "Kubernetes",
            "generate_kwargs": {"do_sample": False, "max_new_tokens": 11, "no_repeat_ngram_size": 2},
        },
    ),
]


def answer(path: str, body: dict[str, Any]) -> Any:
    """What a response says, whatever the endpoint (texts of every choice, finish reasons, usage)."""
    if path == "/chat":
        return body["Result"]
    texts = [c.get("text", c.get("message", {}).get("content")) for c in body["choices"]]
    return texts, [c["finish_reason"] for c in body["choices"]], body["usage"]


async def test_batched_answers_equal_answers_alone(tiny_model_dir: Path, server_factory: Any) -> None:
    """Requests with different lengths, prompts, sampling parameters and seeds, sent at once, get exactly
    what each gets alone; and they really ran in one batch."""
    widths: list[int] = []
    armed, go = threading.Event(), threading.Event()
    server: RunningServer = server_factory(
        make_config(tiny_model_dir), load_fn=watching_loader(widths, armed, go)
    )
    engine = server.runtime.engine
    async with httpx.AsyncClient(base_url=server.url, timeout=60) as h:
        alone = []
        for path, body in REQUESTS:
            r = await h.post(path, json=body)
            assert r.status_code == 200, r.text
            alone.append(answer(path, r.json()))
        assert max(widths) <= 3  # alone: only the n=3 request has several rows
        widths.clear()

        async def one(path: str, body: dict[str, Any]) -> Any:
            r = await h.post(path, json=body)
            assert r.status_code == 200, r.text
            return answer(path, r.json())

        async def release_when_all_admitted() -> None:
            try:
                await asyncio.to_thread(wait_for, lambda: engine.pending == len(REQUESTS), 20, "admission")
            finally:
                go.set()

        armed.set()
        together, _ = await asyncio.gather(
            asyncio.gather(*(one(p, b) for p, b in REQUESTS)), release_when_all_admitted()
        )
    assert together == alone
    # Held at the first request's first step, all ten joined the batch together: 12 rows (one has n=3).
    assert max(widths) == 12, f"requests were not batched together (widths {sorted(set(widths))})"


async def test_requests_join_a_running_batch(tiny_model_dir: Path, server_factory: Any) -> None:
    """A request that arrives while another decodes joins it between steps, and leaves when done."""
    widths: list[int] = []
    armed, go = threading.Event(), threading.Event()

    def load(cfg: ServerConfig) -> LoadedModel:
        loaded = load_model(cfg)

        def hook(_module: Any, _args: Any, kwargs: dict[str, Any]) -> None:
            if armed.is_set():
                # Hold the running generation until the second request has been admitted, so that it
                # must join a batch in progress however fast the model is.
                assert go.wait(30), "test never released the model"
                widths.append(int(kwargs["input_ids"].shape[0]))

        loaded.model.register_forward_pre_hook(hook, with_kwargs=True)
        return loaded

    server: RunningServer = server_factory(make_config(tiny_model_dir), load_fn=load)
    engine = server.runtime.engine
    try:
        async with httpx.AsyncClient(base_url=server.url, timeout=60) as h:
            long = completion("Kubernetes schedules pods", 100, temperature=0, stream=True)
            async with h.stream("POST", "/v1/completions", json=long) as r:
                lines = r.aiter_lines()
                async for line in lines:
                    if line.startswith("data: {"):
                        break
                armed.set()
                short = asyncio.create_task(
                    h.post("/v1/completions", json=completion("Hello world", 4, temperature=0))
                )
                await asyncio.to_thread(wait_for, lambda: engine.pending == 2, 20, "second request admitted")
                go.set()
                assert (await short).status_code == 200
                rest = [line async for line in lines]
            assert "data: [DONE]" in rest
    finally:
        go.set()
    # The held step (width 1), the newcomer's prefill alone (width 1), then both rows decoding together
    # (width 2) until the short one is done, then the long one alone again.
    assert 2 in widths, widths
    assert widths[-1] == 1, widths
    assert widths.count(2) <= 4, widths


async def test_cancelled_request_frees_its_row(tiny_model_dir: Path, server_factory: Any) -> None:
    """With room for a single row, a non-streamed request whose client hangs up leaves the batch at once:
    the next request does not wait for the 200 tokens the first asked for."""
    widths: list[int] = []
    cfg = make_config(tiny_model_dir, max_concurrent_generations=1)
    server: RunningServer = server_factory(cfg, load_fn=watching_loader(widths))
    engine = server.runtime.engine
    host, port = server.url.removeprefix("http://").split(":")
    body = b'{"prompt": "Hello", "generate_kwargs": {"do_sample": false, "max_new_tokens": 200}}'
    with socket.create_connection((host, int(port)), timeout=10) as s:
        s.sendall(
            b"POST /chat HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            + f"Content-Length: {len(body)}\r\n\r\n".encode()
            + body
        )
        await asyncio.to_thread(wait_for, lambda: len(widths) >= 3, 20, "generation to start")
    # The socket is closed: the server notices, cancels, and the row leaves the batch.
    await asyncio.to_thread(wait_for, lambda: engine.pending == 0, 10, "request released")
    await asyncio.to_thread(wait_for, lambda: engine.scheduler.running_rows == 0, 10, "row freed")
    steps = len(widths)
    assert steps < 150, "the abandoned generation ran to its end"
    async with httpx.AsyncClient(base_url=server.url, timeout=60) as h:
        r = await h.post("/chat", json={"prompt": "hi", "generate_kwargs": {"max_new_tokens": 3}})
    assert r.status_code == 200
    assert len(widths) - steps <= 4  # its prefill + 2 decode steps (+1 if the cancel raced a step)


async def test_seeded_request_is_reproducible_under_load(tiny_model_dir: Path, server_factory: Any) -> None:
    """The same seeded request, sent alone and then among many others, gets the same text each time."""
    server: RunningServer = server_factory(make_config(tiny_model_dir))
    seeded = completion("Hello world", 24, temperature=1.0, seed=2**63 + 5)
    async with httpx.AsyncClient(base_url=server.url, timeout=60) as h:
        alone = (await h.post("/v1/completions", json=seeded)).json()["choices"][0]["text"]
        noise = [completion(f"noise {i}", 8 + i, temperature=1.0) for i in range(8)]
        outs = await asyncio.gather(
            *(h.post("/v1/completions", json=b) for b in [*noise[:4], seeded, *noise[4:], seeded])
        )
    assert all(o.status_code == 200 for o in outs)
    assert outs[4].json()["choices"][0]["text"] == alone
    assert outs[-1].json()["choices"][0]["text"] == alone
