"""The OpenAI-compatible API through the official ``openai`` client, streaming and concurrency included."""

from __future__ import annotations

import asyncio
import json
import threading
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
import torch
from kaito_inference.config import ServerConfig
from kaito_inference.engine import LoadedModel, load_model
from runtime_support import MODEL_ID, RunningServer, http_get, http_post, make_config, wait_for

pytestmark = [pytest.mark.runtime, pytest.mark.timeout(60)]

MESSAGES = [{"role": "user", "content": "Hello! How are you today?"}]


def client(server: RunningServer) -> openai.OpenAI:
    return openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0, timeout=60)


def aclient(server: RunningServer) -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0, timeout=60)


def greedy_reference(server: RunningServer, input_ids: list[int], max_new_tokens: int) -> tuple[str, int]:
    engine = server.runtime.engine
    with torch.inference_mode():
        out = engine.model.generate(
            input_ids=torch.tensor([input_ids]),
            attention_mask=torch.ones(1, len(input_ids), dtype=torch.long),
            do_sample=False,
            max_new_tokens=max_new_tokens,
            pad_token_id=engine.tokenizer.pad_token_id,
        )
    new = out[0, len(input_ids) :]
    return engine.tokenizer.decode(new, skip_special_tokens=True), len(new)


def chat_ids(server: RunningServer, messages: list[dict[str, str]]) -> list[int]:
    tok = server.runtime.engine.tokenizer
    return list(tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=True))


def metric(server: RunningServer, name: str, labels: str = "") -> float:
    """Read one sample from /metrics (0 when absent)."""
    for line in http_get(server.url + "/metrics").text.splitlines():
        if line.startswith(name + labels + " ") or (not labels and line.startswith(name + " ")):
            return float(line.rsplit(" ", 1)[1])
    return 0.0


def test_models_list(base_server: RunningServer) -> None:
    models = client(base_server).models.list()
    assert [m.id for m in models.data] == [MODEL_ID]
    assert models.data[0].owned_by == "kaito"
    assert models.data[0].model_extra["max_model_len"] == 256


def test_chat_completion_matches_generate(base_server: RunningServer) -> None:
    out = client(base_server).chat.completions.create(
        model=MODEL_ID, messages=MESSAGES, max_tokens=12, temperature=0
    )
    ids = chat_ids(base_server, MESSAGES)
    expected, n = greedy_reference(base_server, ids, 12)
    assert out.object == "chat.completion"
    assert out.choices[0].message.role == "assistant"
    assert out.choices[0].message.content == expected
    assert out.choices[0].finish_reason == "length"
    assert out.usage is not None
    assert (out.usage.prompt_tokens, out.usage.completion_tokens) == (len(ids), n)
    assert out.usage.total_tokens == len(ids) + n


def test_chat_stream_equals_non_stream(base_server: RunningServer) -> None:
    c = client(base_server)
    full = c.chat.completions.create(model=MODEL_ID, messages=MESSAGES, max_tokens=20, temperature=0)
    stream = c.chat.completions.create(
        model=MODEL_ID,
        messages=MESSAGES,
        max_tokens=20,
        temperature=0,
        stream=True,
        stream_options={"include_usage": True},
    )
    chunks = list(stream)
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(ch.choices[0].delta.content or "" for ch in chunks if ch.choices)
    finishes = [ch.choices[0].finish_reason for ch in chunks if ch.choices and ch.choices[0].finish_reason]
    assert text == full.choices[0].message.content
    assert finishes == ["length"]
    assert chunks[-1].usage is not None
    assert chunks[-1].usage.completion_tokens == full.usage.completion_tokens  # type: ignore[union-attr]


def test_sampling_with_seed_is_reproducible(base_server: RunningServer) -> None:
    c = client(base_server)
    kwargs: dict[str, Any] = {"model": MODEL_ID, "messages": MESSAGES, "max_tokens": 10, "temperature": 1.0}
    a = c.chat.completions.create(seed=7, **kwargs).choices[0].message.content
    b = c.chat.completions.create(seed=7, **kwargs).choices[0].message.content
    assert a == b
    many = c.chat.completions.create(n=3, seed=1, **kwargs)
    assert [ch.index for ch in many.choices] == [0, 1, 2]


def test_completions_and_stream(base_server: RunningServer) -> None:
    c = client(base_server)
    prompt = "Kubernetes schedules pods"
    ids = base_server.runtime.engine.encode_prompt(prompt)
    expected, n = greedy_reference(base_server, ids, 8)
    out = c.completions.create(model=MODEL_ID, prompt=prompt, max_tokens=8, temperature=0)
    assert out.object == "text_completion"
    assert out.choices[0].text == expected
    assert out.usage is not None and out.usage.completion_tokens == n
    echo = c.completions.create(model=MODEL_ID, prompt=prompt, max_tokens=8, temperature=0, echo=True)
    assert echo.choices[0].text == prompt + expected
    streamed = "".join(
        ch.choices[0].text
        for ch in c.completions.create(
            model=MODEL_ID, prompt=prompt, max_tokens=8, temperature=0, stream=True
        )
        if ch.choices
    )
    assert streamed == expected
    both = c.completions.create(model=MODEL_ID, prompt=[prompt, "Hello"], max_tokens=4, temperature=0)
    assert [ch.index for ch in both.choices] == [0, 1]
    # OpenAI's default max_tokens for completions is 16.
    default = c.completions.create(model=MODEL_ID, prompt=prompt, temperature=0)
    assert default.usage is not None and default.usage.completion_tokens == 16


def test_stop_sequences(base_server: RunningServer) -> None:
    c = client(base_server)
    full = c.chat.completions.create(model=MODEL_ID, messages=MESSAGES, max_tokens=30, temperature=0)
    text = full.choices[0].message.content or ""
    stop = next(text[i : i + 2] for i in range(6, len(text) - 2) if "\ufffd" not in text[i : i + 2])
    expected = text[: text.find(stop)]
    cut = c.chat.completions.create(
        model=MODEL_ID, messages=MESSAGES, max_tokens=30, temperature=0, stop=[stop]
    )
    assert cut.choices[0].message.content == expected
    assert cut.choices[0].finish_reason == "stop"
    assert cut.usage is not None and cut.usage.completion_tokens < 30
    stream = c.chat.completions.create(
        model=MODEL_ID, messages=MESSAGES, max_tokens=30, temperature=0, stop=stop, stream=True
    )
    chunks = list(stream)
    assert "".join(ch.choices[0].delta.content or "" for ch in chunks) == expected
    assert chunks[-1].choices[0].finish_reason == "stop"


def test_long_completion_prompt_is_400(base_server: RunningServer) -> None:
    # Long enough to be tokenized on a worker thread rather than inline.
    with pytest.raises(openai.BadRequestError, match="maximum context length"):
        client(base_server).completions.create(model=MODEL_ID, prompt="lazy dog " * 800, max_tokens=4)


def test_unknown_model_is_404(base_server: RunningServer) -> None:
    with pytest.raises(openai.NotFoundError) as err:
        client(base_server).chat.completions.create(model="gpt-4", messages=MESSAGES)
    assert MODEL_ID in str(err.value)


@pytest.mark.parametrize(
    ("kwargs", "fragment"),
    [
        ({"max_tokens": 10**9}, "maximum context length"),
        ({"max_tokens": -1}, "max_tokens"),
        ({"temperature": 5}, "temperature"),
        ({"n": 2, "stream": True}, "n > 1"),
        ({"messages": []}, "messages"),
        ({"messages": [{"role": "user", "content": "x" * 2000}]}, "maximum context length"),
        (
            {"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]},
            "text",
        ),
        ({"tools": [{"type": "function", "function": {"name": "f"}}]}, "tools"),
        ({"frequency_penalty": 1.0}, "frequency_penalty"),
        ({"logit_bias": {"1": 5}}, "logit_bias"),
        ({"response_format": {"type": "json_object"}}, "response_format"),
        ({"logprobs": True}, "logprobs"),
    ],
)
def test_bad_openai_requests_are_400(
    base_server: RunningServer, kwargs: dict[str, Any], fragment: str
) -> None:
    args: dict[str, Any] = {"model": MODEL_ID, "messages": MESSAGES, **kwargs}
    with pytest.raises(openai.BadRequestError) as err:
        client(base_server).chat.completions.create(**args)
    assert fragment in str(err.value)
    assert "Traceback" not in str(err.value)


def test_prometheus_metrics(base_server: RunningServer) -> None:
    before = metric(base_server, "kaito_inference_generation_tokens_total", '{endpoint="/v1/completions"}')
    reqs = metric(base_server, "kaito_inference_requests_total", '{code="200",endpoint="/v1/completions"}')
    client(base_server).completions.create(model=MODEL_ID, prompt="Hello", max_tokens=5, temperature=0)
    after = metric(base_server, "kaito_inference_generation_tokens_total", '{endpoint="/v1/completions"}')
    assert after - before == 5
    reqs_after = metric(
        base_server, "kaito_inference_requests_total", '{code="200",endpoint="/v1/completions"}'
    )
    assert reqs_after - reqs == 1
    text = http_get(base_server.url + "/metrics").text
    for name in (
        "kaito_inference_time_to_first_token_seconds_bucket",
        "kaito_inference_request_duration_seconds_bucket",
        "kaito_inference_prompt_tokens_total",
        "kaito_inference_queue_seconds_count",
        "kaito_inference_model_ready 1.0",
    ):
        assert name in text


async def test_concurrent_requests(base_server: RunningServer) -> None:
    """Many requests at once (batched together): each gets its own right answer."""
    prompts = [f"Prompt number {i} about nodes" for i in range(8)]
    expected = [
        greedy_reference(base_server, base_server.runtime.engine.encode_prompt(p), 10)[0] for p in prompts
    ]
    c = aclient(base_server)

    async def one(i: int) -> str:
        if i % 3 == 0:
            text = ""
            stream = await c.completions.create(
                model=MODEL_ID, prompt=prompts[i], max_tokens=10, temperature=0, stream=True
            )
            async for ch in stream:
                text += ch.choices[0].text if ch.choices else ""
            return text
        if i % 3 == 1:
            async with httpx.AsyncClient(timeout=60) as h:
                r = await h.post(
                    base_server.url + "/chat",
                    json={
                        "prompt": prompts[i],
                        "return_full_text": False,
                        "generate_kwargs": {"do_sample": False, "max_new_tokens": 10},
                    },
                )
                return str(r.json()["Result"])
        out = await c.completions.create(model=MODEL_ID, prompt=prompts[i], max_tokens=10, temperature=0)
        return out.choices[0].text

    results = await asyncio.gather(*(one(i) for i in range(len(prompts))))
    assert results == expected
    await c.close()


def gated_loader(entered: threading.Event, release: threading.Event, block_at: int = 3) -> Any:
    """Load the real model but make forward pass number ``block_at`` wait until the test releases it."""

    def load(cfg: ServerConfig) -> LoadedModel:
        loaded = load_model(cfg)
        calls = {"n": 0}

        def hook(_module: Any, _args: Any) -> None:
            calls["n"] += 1
            if calls["n"] == block_at:
                entered.set()
                assert release.wait(30), "test never released the forward pass"

        loaded.model.register_forward_pre_hook(hook)
        loaded.model.forward_calls = calls
        return loaded

    return load


async def test_event_loop_serves_while_generating(tiny_model_dir: Path, server_factory: Any) -> None:
    """A generation stuck inside forward() must not stop health, metrics or other endpoints."""
    entered, release = threading.Event(), threading.Event()
    server = server_factory(make_config(tiny_model_dir), load_fn=gated_loader(entered, release))
    async with httpx.AsyncClient(base_url=server.url, timeout=30) as h:
        pending = asyncio.create_task(
            h.post(
                "/chat", json={"prompt": "hi", "generate_kwargs": {"do_sample": False, "max_new_tokens": 5}}
            )
        )
        try:
            await asyncio.to_thread(lambda: entered.wait(30))
            assert entered.is_set()
            for path in ("/health", "/v1/models", "/metrics"):
                r = await h.get(path)
                assert r.status_code == 200
            assert not pending.done()
            assert (
                'kaito_inference_generations_in_progress{endpoint="/chat"} 1.0'
                in (await h.get("/metrics")).text
            )
        finally:
            release.set()
        r = await pending
        assert r.status_code == 200


async def test_stream_disconnect_stops_generation(tiny_model_dir: Path, server_factory: Any) -> None:
    """Tokens reach the client while the model still works; a client that leaves stops the work."""
    entered, release = threading.Event(), threading.Event()
    server = server_factory(make_config(tiny_model_dir), load_fn=gated_loader(entered, release, block_at=8))
    engine = server.runtime.engine
    try:
        async with httpx.AsyncClient(base_url=server.url, timeout=30) as h:
            body = {"model": MODEL_ID, "prompt": "Hello", "max_tokens": 200, "temperature": 0, "stream": True}
            async with h.stream("POST", "/v1/completions", json=body) as r:
                assert r.status_code == 200
                lines = r.aiter_lines()

                async def first_text() -> str:
                    async for line in lines:
                        if line.startswith("data: {") and '"text":""' not in line:
                            return line
                    raise AssertionError("stream ended without text")

                # Generation cannot finish before the test releases forward pass 8, so text arriving
                # now was streamed while the model was still working.
                assert '"text":' in await asyncio.wait_for(first_text(), 20)
                await asyncio.to_thread(lambda: entered.wait(30))
                assert entered.is_set()
            # Leaving the block closed the connection while the generation waits inside forward():
            # the request is released at once, without waiting for the model.
            await asyncio.to_thread(wait_for, lambda: engine.pending == 0, 10, "request released")
    finally:
        release.set()
    await asyncio.to_thread(
        wait_for, lambda: engine.scheduler.running_rows == 0, 10, "row to leave the batch"
    )
    assert engine.model.forward_calls["n"] < 12, "generation ran on after the client left"


def test_models_retrieve(base_server: RunningServer) -> None:
    """The official client's models.retrieve (GET /v1/models/{id}); an unknown id is a 404."""
    c = client(base_server)
    model = c.models.retrieve(MODEL_ID)
    assert model.id == MODEL_ID
    assert model.object == "model"
    with pytest.raises(openai.NotFoundError) as err:
        c.models.retrieve("gpt-4")
    assert err.value.code == "model_not_found"


def test_token_id_prompts(base_server: RunningServer) -> None:
    """OpenAI's token-id prompts: one list of ids is one prompt, a list of lists is several."""
    c = client(base_server)
    ids = base_server.runtime.engine.encode_prompt("Kubernetes schedules pods")
    expected, _n = greedy_reference(base_server, ids, 6)
    one = c.completions.create(model=MODEL_ID, prompt=ids, max_tokens=6, temperature=0)
    assert [ch.text for ch in one.choices] == [expected]
    assert one.usage is not None and one.usage.prompt_tokens == len(ids)
    other = base_server.runtime.engine.encode_prompt("Hello world")
    many = c.completions.create(model=MODEL_ID, prompt=[ids, other], max_tokens=6, temperature=0)
    assert [ch.text for ch in many.choices] == [expected, greedy_reference(base_server, other, 6)[0]]
    with pytest.raises(openai.BadRequestError, match="vocabulary"):
        c.completions.create(model=MODEL_ID, prompt=[1, 10**6], max_tokens=2)
    with pytest.raises(openai.BadRequestError):
        c.completions.create(model=MODEL_ID, prompt=[1, -5], max_tokens=2)


def test_include_usage_chunks_carry_null_usage(base_server: RunningServer) -> None:
    """Under include_usage every chunk before the last has "usage": null; the last has the counts."""
    body = {
        "model": MODEL_ID,
        "prompt": "Hello",
        "max_tokens": 5,
        "temperature": 0,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    with httpx.stream("POST", base_server.url + "/v1/completions", json=body, timeout=60) as r:
        assert r.status_code == 200
        events = [json.loads(line[6:]) for line in r.iter_lines() if line.startswith("data: {")]
    assert len(events) >= 3
    assert all("usage" in e and e["usage"] is None for e in events[:-1])
    assert events[-1]["usage"]["completion_tokens"] == 5
    assert events[-1]["choices"] == []
    # Without include_usage no chunk has the key (OpenAI sends none).
    body["stream_options"] = None
    with httpx.stream("POST", base_server.url + "/v1/completions", json=body, timeout=60) as r:
        events = [json.loads(line[6:]) for line in r.iter_lines() if line.startswith("data: {")]
    assert events and all("usage" not in e for e in events)


def test_error_code_is_a_string_or_null(base_server: RunningServer) -> None:
    r = http_post(base_server.url + "/v1/chat/completions", json={"model": MODEL_ID, "messages": []})
    assert r.status_code == 400
    assert r.json()["error"]["code"] is None or isinstance(r.json()["error"]["code"], str)
    r = http_post(base_server.url + "/v1/chat/completions", json={"model": "nope", "messages": MESSAGES})
    assert r.status_code == 404
    assert r.json()["error"]["code"] == "model_not_found"


def test_bad_seed_on_a_stream_is_400_before_the_stream(base_server: RunningServer) -> None:
    body = {"model": MODEL_ID, "prompt": "hi", "max_tokens": 2, "stream": True, "seed": 2**70}
    r = http_post(base_server.url + "/v1/completions", json=body)
    assert r.status_code == 400
    assert r.headers["content-type"].startswith("application/json")
    assert r.json()["error"]["param"] is None or "seed" in r.json()["error"]["message"]
    assert "seed" in r.json()["error"]["message"]


def test_chat_template_flag_and_missing_template(
    tiny_model_dir: Path, tmp_path: Path, server_factory: Any
) -> None:
    template = tmp_path / "plain.jinja"
    template.write_text("{% for m in messages %}{{ m['content'] }}\n{% endfor %}")
    custom = server_factory(make_config(tiny_model_dir, chat_template=str(template)))
    out = client(custom).chat.completions.create(
        model=MODEL_ID, messages=MESSAGES, max_tokens=2, temperature=0
    )
    expected_ids = custom.runtime.engine.tokenizer(MESSAGES[0]["content"] + "\n", add_special_tokens=False)
    assert out.usage is not None and out.usage.prompt_tokens == len(expected_ids["input_ids"])

    def without_template(cfg: ServerConfig) -> LoadedModel:
        loaded = load_model(cfg)
        loaded.tokenizer.chat_template = None
        return loaded

    bare = server_factory(make_config(tiny_model_dir), load_fn=without_template)
    with pytest.raises(openai.BadRequestError, match="no chat template"):
        client(bare).chat.completions.create(model=MODEL_ID, messages=MESSAGES, max_tokens=2)
    r = http_post(bare.url + "/chat", json={"messages": MESSAGES})
    assert r.status_code == 400
    assert "no chat template" in r.json()["detail"]


async def test_overload_is_503(tiny_model_dir: Path, server_factory: Any) -> None:
    """Beyond --max_pending_generations, requests are refused at once instead of queueing."""
    entered, release = threading.Event(), threading.Event()
    cfg = make_config(tiny_model_dir, max_pending_generations=1)
    server = server_factory(cfg, load_fn=gated_loader(entered, release))
    async with httpx.AsyncClient(base_url=server.url, timeout=60) as h:
        busy = asyncio.create_task(
            h.post(
                "/chat", json={"prompt": "hi", "generate_kwargs": {"do_sample": False, "max_new_tokens": 5}}
            )
        )
        try:
            await asyncio.to_thread(lambda: entered.wait(30))
            r = await h.post("/chat", json={"prompt": "hi"})
            assert r.status_code == 503
            assert "server busy" in r.json()["detail"]
            body = {"model": MODEL_ID, "prompt": "hi", "max_tokens": 2, "stream": True}
            r = await h.post("/v1/completions", json=body)
            assert r.status_code == 503
            assert r.headers["retry-after"] == "5"
            assert "server busy" in r.json()["error"]["message"]
        finally:
            release.set()
        assert (await busy).status_code == 200
        r = await h.post("/chat", json={"prompt": "hi", "generate_kwargs": {"max_new_tokens": 2}})
        assert r.status_code == 200
