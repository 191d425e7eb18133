"""Benchmark of the inference server's overhead (SPEC §10: ``/chat`` tokens/s >= 0.95x direct generate()).

Builds a small random Llama locally (nothing downloaded), then, interleaving rounds so that background
load on the machine hits both sides alike:

* direct: ``model.generate()`` in this process on the model loaded by the server's own loader;
* /chat: the same request through the real server (``inference_api.py`` in a subprocess, HTTP on
  loopback), timed by the client from send to full response;
* streaming: time to first token of ``/v1/completions`` with ``stream=true`` (client side, first text
  chunk) against the direct time to first token (a streamer's first ``put`` after the prompt).

Every generation has a fixed length (``min_new_tokens == max_new_tokens``, greedy), so tokens/s compare
like with like. Run with the runtime's virtualenv::

    .venv-runtime/bin/python bench/runtime.py [--layers 6 --hidden 384 --new-tokens 128 --rounds 8]
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

# The runtime is not an installed package; the tiny tokenizer builder is shared with the tests.
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "presets" / "inference"))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "test" / "runtime"))

import httpx
import torch
from kaito_inference.config import ServerConfig
from kaito_inference.engine import load_model
from runtime_support import build_tokenizer

REPO = Path(__file__).resolve().parents[1]

PROMPT = "Kubernetes schedules pods onto nodes with GPUs, and KAITO deploys a model preset that answers chat requests."


def build_model(path: Path, tokenizer: Any, hidden: int, layers: int) -> int:
    """Save a random Llama of the given size; return its parameter count."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=hidden,
        intermediate_size=hidden * 4,
        num_hidden_layers=layers,
        num_attention_heads=max(1, hidden // 64),
        num_key_value_heads=max(1, hidden // 128),
        max_position_embeddings=2048,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    model = LlamaForCausalLM(config)
    model.save_pretrained(path, safe_serialization=True)
    return sum(p.numel() for p in model.parameters())


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def start_server(
    model_dir: Path, port: int, dtype: str, device_map: str, threads: int
) -> subprocess.Popen[bytes]:
    cmd = [
        sys.executable,
        str(REPO / "presets" / "inference" / "inference_api.py"),
        "--pipeline=text-generation",
        f"--pretrained_model_name_or_path={model_dir}",
        f"--torch_dtype={dtype}",
        f"--device_map={device_map}",
        "--served_model_name=bench",
        f"--adapters_dir={model_dir / 'no-adapters'}",
        f"--port={port}",
        "--host=127.0.0.1",
        "--log_level=warning",
    ]
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    proc = subprocess.Popen(cmd, start_new_session=True, env=env)
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"server exited with {proc.returncode}")
        try:
            if httpx.get(f"http://127.0.0.1:{port}/health", timeout=2).status_code == 200:
                return proc
        except httpx.TransportError:
            pass
        time.sleep(0.2)  # polling interval while the server loads
    proc.kill()
    raise SystemExit("server did not become healthy in 300 s")


def main() -> int:
    """Run the benchmark and print (and optionally write) the numbers."""
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--hidden", type=int, default=384)
    parser.add_argument("--layers", type=int, default=6)
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--rounds", type=int, default=8)
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--device-map", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads on both sides")
    parser.add_argument("--json", type=Path, default=None, help="also write the results here")
    args = parser.parse_args()
    # Same intra-op thread count on both sides; one thread also keeps OpenMP spin-waiting from turning
    # noise from other processes on a small machine into huge outliers.
    torch.set_num_threads(args.threads)

    with tempfile.TemporaryDirectory(prefix="kaito-bench-") as tmp:
        model_dir = Path(tmp)
        tokenizer = build_tokenizer(model_dir)
        params = build_model(model_dir, tokenizer, args.hidden, args.layers)
        cfg = ServerConfig(
            pretrained_model_name_or_path=str(model_dir),
            torch_dtype=args.dtype,
            device_map=args.device_map,
            adapters_dir=str(model_dir / "no-adapters"),
        )
        loaded = load_model(cfg)
        model, tok = loaded.model, loaded.tokenizer
        ids = tok(PROMPT)["input_ids"]
        n = args.new_tokens
        gen = {"do_sample": False, "max_new_tokens": n, "min_new_tokens": n, "pad_token_id": tok.pad_token_id}
        inputs = torch.tensor([ids], device=model.device)

        def direct() -> float:
            t0 = time.perf_counter()
            with torch.inference_mode():
                out = model.generate(input_ids=inputs, attention_mask=torch.ones_like(inputs), **gen)
            if model.device.type == "cuda":
                torch.cuda.synchronize()
            assert out.shape[1] - len(ids) == n
            return time.perf_counter() - t0

        def direct_ttft() -> float:
            from transformers.generation.streamers import BaseStreamer

            class First(BaseStreamer):  # type: ignore[misc]
                def __init__(self) -> None:
                    self.calls = 0
                    self.first: float | None = None

                def put(self, value: Any) -> None:
                    self.calls += 1
                    if self.calls == 2 and self.first is None:  # call 1 is the prompt
                        self.first = time.perf_counter()

                def end(self) -> None:
                    pass

            streamer = First()
            t0 = time.perf_counter()
            with torch.inference_mode():
                model.generate(
                    input_ids=inputs, attention_mask=torch.ones_like(inputs), streamer=streamer, **gen
                )
            assert streamer.first is not None
            return streamer.first - t0

        port = free_port()
        proc = start_server(model_dir, port, args.dtype, args.device_map, args.threads)
        base = f"http://127.0.0.1:{port}"
        body = {"prompt": PROMPT, "return_full_text": False, "generate_kwargs": gen}
        stream_body = {
            "model": "bench",
            "prompt": PROMPT,
            "max_tokens": n,
            "temperature": 0,
            "min_tokens": n,
            "stream": True,
        }
        try:
            with httpx.Client(base_url=base, timeout=600) as client:

                def chat() -> float:
                    t0 = time.perf_counter()
                    r = client.post("/chat", json=body)
                    r.raise_for_status()
                    return time.perf_counter() - t0

                def stream_ttft() -> tuple[float, float]:
                    t0 = time.perf_counter()
                    first: float | None = None
                    with client.stream("POST", "/v1/completions", json=stream_body) as r:
                        r.raise_for_status()
                        for line in r.iter_lines():
                            if first is None and line.startswith("data: {") and '"text":""' not in line:
                                first = time.perf_counter()
                    assert first is not None
                    return first - t0, time.perf_counter() - t0

                direct(), chat(), stream_ttft(), direct_ttft()  # warm-up both sides
                d_times, c_times, d_ttft, s_ttft, s_total = [], [], [], [], []
                for i in range(args.rounds):
                    # Pairs run back to back, in alternating order, so that load from other processes
                    # on the machine lands on both sides alike; per-pair ratios are reported too.
                    if i % 2 == 0:
                        d_times.append(direct())
                        c_times.append(chat())
                    else:
                        c_times.append(chat())
                        d_times.append(direct())
                    d_ttft.append(direct_ttft())
                    first, total = stream_ttft()
                    s_ttft.append(first)
                    s_total.append(total)
        finally:
            os.killpg(proc.pid, signal.SIGTERM)
            proc.wait(timeout=60)

    tokens = n * args.rounds
    results = {
        "model_params": params,
        "device": args.device_map,
        "dtype": args.dtype,
        "prompt_tokens": len(ids),
        "new_tokens": n,
        "rounds": args.rounds,
        "direct_tokens_per_s": tokens / sum(d_times),
        "chat_tokens_per_s": tokens / sum(c_times),
        "ratio_chat_over_direct": sum(d_times) / sum(c_times),
        "ratio_median_of_pairs": statistics.median(d / c for d, c in zip(d_times, c_times, strict=True)),
        "ratio_best_of": min(d_times) / min(c_times),
        "stream_tokens_per_s": tokens / sum(s_total),
        "direct_ttft_ms_median": 1000 * statistics.median(d_ttft),
        "stream_ttft_ms_median": 1000 * statistics.median(s_ttft),
        "stream_ttft_overhead_ms_median": 1000 * (statistics.median(s_ttft) - statistics.median(d_ttft)),
        "stream_ttft_overhead_ms_best_of": 1000 * (min(s_ttft) - min(d_ttft)),
        "torch_threads": args.threads,
    }
    for key, value in results.items():
        print(f"{key:34s} {value:.3f}" if isinstance(value, float) else f"{key:34s} {value}")
    target = 0.95
    verdict = "PASS" if results["ratio_median_of_pairs"] >= target else "FAIL"
    print(f"{'target (median of pairs)':34s} >= {target}: {verdict}")
    if args.json is not None:
        args.json.write_text(json.dumps(results, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
