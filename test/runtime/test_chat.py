"""Upstream's endpoints: /, /health, /healthz, /chat, and the loading/failure states."""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Any

import pytest
import torch
from kaito_inference.config import ServerConfig
from kaito_inference.engine import LoadedModel, load_model
from runtime_support import RunningServer, http_get, http_post, make_config

pytestmark = [pytest.mark.runtime, pytest.mark.timeout(60)]

SEED_HEADERS = {"accept": "application/json", "Content-Type": "application/json"}


def direct_greedy(server: RunningServer, input_ids: list[int], max_new_tokens: int) -> str:
    """What generate() itself produces for these ids: the reference the server must match."""
    engine = server.runtime.engine
    with torch.inference_mode():
        out = engine.model.generate(
            input_ids=torch.tensor([input_ids]),
            attention_mask=torch.ones(1, len(input_ids), dtype=torch.long),
            do_sample=False,
            max_new_tokens=max_new_tokens,
            pad_token_id=engine.tokenizer.pad_token_id,
        )
    text: str = engine.tokenizer.decode(out[0, len(input_ids) :], skip_special_tokens=True)
    return text


def test_root_and_health(base_server: RunningServer) -> None:
    assert http_get(base_server.url + "/").json() == {"message": "Server is running"}
    for path in ("/health", "/healthz"):
        r = http_get(base_server.url + path)
        assert r.status_code == 200
        assert r.json() == {"status": "Healthy"}


def test_seed_curl_request(base_server: RunningServer) -> None:
    """The seed document's call: POST /chat {"prompt": ...} with upstream's default generate kwargs."""
    prompt = "YOUR QUESTION HERE"
    r = http_post(base_server.url + "/chat", headers=SEED_HEADERS, content='{"prompt":"YOUR QUESTION HERE"}')
    assert r.status_code == 200, r.text
    result = r.json()["Result"]
    assert isinstance(result, str)
    # return_full_text defaults to true, and sampling produced something after the prompt.
    assert result.startswith(prompt)
    assert len(result) > len(prompt)


def test_chat_prompt_matches_direct_generate(base_server: RunningServer) -> None:
    prompt = "The quick brown fox"
    body = {"prompt": prompt, "generate_kwargs": {"do_sample": False, "max_new_tokens": 12}}
    full = http_post(base_server.url + "/chat", json=body).json()["Result"]
    body["return_full_text"] = False
    tail = http_post(base_server.url + "/chat", json=body).json()["Result"]
    expected = direct_greedy(base_server, base_server.runtime.engine.encode_prompt(prompt), 12)
    assert tail == expected
    assert full == prompt + expected


def test_chat_several_sequences_are_concatenated(base_server: RunningServer) -> None:
    """Upstream joins the generated_text of every returned sequence into one Result."""
    prompt = "Hello world"
    body = {
        "prompt": prompt,
        "generate_kwargs": {"num_return_sequences": 3, "max_new_tokens": 3, "do_sample": True},
    }
    r = http_post(base_server.url + "/chat", json=body)
    assert r.status_code == 200, r.text
    result = r.json()["Result"]
    assert result.startswith(prompt)
    assert result.count(prompt) >= 3


def test_chat_max_length_counts_prompt(base_server: RunningServer) -> None:
    """Upstream's max_length (default 200) is prompt + new tokens."""
    prompt = "Hello world! How are you"
    ids = base_server.runtime.engine.encode_prompt(prompt)
    body = {
        "prompt": prompt,
        "return_full_text": False,
        "generate_kwargs": {"do_sample": False, "max_length": len(ids) + 5},
    }
    r = http_post(base_server.url + "/chat", json=body)
    assert r.status_code == 200, r.text
    assert r.json()["Result"] == direct_greedy(base_server, ids, 5)


def test_chat_messages_use_chat_template(base_server: RunningServer) -> None:
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi there"}]
    body = {"messages": messages, "generate_kwargs": {"do_sample": False, "max_new_tokens": 10}}
    r = http_post(base_server.url + "/chat", json=body)
    assert r.status_code == 200, r.text
    engine = base_server.runtime.engine
    ids = engine.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
    assert r.json()["Result"] == direct_greedy(base_server, list(ids), 10)


@pytest.mark.parametrize(
    ("body", "status", "fragment"),
    [
        ({}, 400, "prompt required"),
        ({"prompt": ""}, 400, "prompt required"),
        ({"prompt": 3}, 422, "string"),
        ({"prompt": "x", "return_full_text": "maybe"}, 422, "bool"),
        ({"prompt": "x", "generate_kwargs": {"max_new_tokens": "many"}}, 422, "integer"),
        ({"prompt": "x", "generate_kwargs": {"max_new_tokens": 0}}, 422, "greater"),
        ({"prompt": "x", "generate_kwargs": {"max_length": 10**9}}, 400, "context length"),
        ({"prompt": "x", "generate_kwargs": {"max_new_tokens": 100000}}, 400, "context length"),
        ({"prompt": "x", "generate_kwargs": {"streamer": "stdout"}}, 400, "streamer"),
        ({"prompt": "x", "generate_kwargs": {"no_such_option": 1}}, 400, "no_such_option"),
        ({"prompt": "x", "generate_kwargs": {"temperature": -1}}, 422, "greater"),
        ({"messages": [{"content": "no role"}]}, 422, "role"),
        ({"messages": "hello"}, 422, "list"),
        ({"prompt": "x", "handle_long_generation": "sideways"}, 400, "hole"),
        ({"prompt": "lazy dog " * 800}, 400, "context length"),
    ],
)
def test_chat_bad_input_is_4xx_json(
    base_server: RunningServer, body: dict[str, Any], status: int, fragment: str
) -> None:
    r = http_post(base_server.url + "/chat", json=body)
    assert r.status_code == status, r.text
    assert r.headers["content-type"].startswith("application/json")
    assert fragment in r.text
    assert "Traceback" not in r.text


def test_chat_long_prompt_hole_keeps_the_end(base_server: RunningServer) -> None:
    body = {
        "prompt": "lazy dog " * 800,
        "handle_long_generation": "hole",
        "return_full_text": False,
        "generate_kwargs": {"do_sample": False, "max_new_tokens": 4},
    }
    r = http_post(base_server.url + "/chat", json=body)
    assert r.status_code == 200, r.text
    assert isinstance(r.json()["Result"], str)


def test_chat_malformed_json(base_server: RunningServer) -> None:
    r = http_post(
        base_server.url + "/chat", content=b'{"prompt": ', headers={"content-type": "application/json"}
    )
    assert r.status_code == 422
    assert r.json()["detail"][0]["type"] == "json_invalid"


def test_conversational_pipeline_requires_messages(tiny_model_dir: Path, server_factory: Any) -> None:
    server = server_factory(make_config(tiny_model_dir, pipeline="conversational"))
    r = http_post(server.url + "/chat", json={"prompt": "hello"})
    # A prompt alone is accepted in text-generation mode only; conversational wants messages.
    assert r.status_code == 200
    r = http_post(server.url + "/chat", json={"messages": []})
    assert r.status_code == 400
    assert r.json() == {"detail": "Conversational parameter messages required"}
    r = http_post(server.url + "/chat", json={})
    assert r.json() == {"detail": "Conversational parameter messages required"}


def test_503_while_loading(tiny_model_dir: Path, server_factory: Any) -> None:
    release = threading.Event()

    def gated_load(cfg: ServerConfig) -> LoadedModel:
        assert release.wait(30), "test never released the load"
        return load_model(cfg)

    server = server_factory(make_config(tiny_model_dir), load_fn=gated_load, wait=False)
    try:
        r = http_get(server.url + "/health")
        assert (r.status_code, r.json()["status"]) == (503, "Loading")
        r = http_post(server.url + "/chat", json={"prompt": "hi"})
        assert r.status_code == 503
        assert r.headers["retry-after"] == "5"
        assert r.json() == {"detail": "Model is loading"}
        r = http_get(server.url + "/v1/models")
        assert r.status_code == 503
        assert r.json()["error"]["message"] == "Model is loading"
        metrics = http_get(server.url + "/metrics").text
        assert "kaito_inference_model_ready 0.0" in metrics
    finally:
        release.set()
    server.wait_ready()
    assert http_get(server.url + "/health").status_code == 200
    assert http_post(server.url + "/chat", json={"prompt": "hi"}).status_code == 200


def test_load_failure_is_reported(tmp_path: Path, server_factory: Any) -> None:
    server = server_factory(make_config(tmp_path / "does-not-exist"))
    assert server.runtime.state == "failed"
    assert server.failures and "model failed to load" in server.failures[0]
    r = http_get(server.url + "/health")
    assert r.status_code == 503
    assert r.json()["status"] == "Failed"
    r = http_post(server.url + "/chat", json={"prompt": "hi"})
    assert r.status_code == 503
    assert "Traceback" not in r.text
