"""Benchmarks of the inference server (SPEC §10), on a small random Llama built locally (nothing downloaded).

``--mode load`` (the default): the server under 1, 4, 8 and 16 concurrent clients (each sends one
fixed-length greedy ``/v1/completions`` request per round) against the same model in this process:
``generate()`` of one prompt, and a static batch of 16 copies. Configurations run interleaved, round
after round, so that background load on a shared machine hits all of them alike; it prints the median
aggregate tokens/s of each, p50/p99 request latency, the ratios the targets are about and the load
average. Targets: 16 clients >= 4x one client and >= 0.8x the static batch; p99 at 16 clients <= 6x the
single-client p50; one client >= 0.95x direct generate().

``--mode overhead``: one client, interleaving rounds so that background load on the machine hits both
sides alike:

* direct: ``model.generate()`` in this process on the model loaded by the server's own loader;
* /chat: the same request through the real server (``inference_api.py`` in a subprocess, HTTP on
  loopback), timed by the client from send to full response;
* streaming: time to first token of ``/v1/completions`` with ``stream=true`` (client side, first text
  chunk) against the direct time to first token (a streamer's first ``put`` after the prompt).

Every generation has a fixed length (``min_new_tokens == max_new_tokens``, greedy), so tokens/s compare
like with like. Run with the runtime's virtualenv::

    .venv-runtime/bin/python bench/runtime.py [--mode load|overhead] [--layers 4 --hidden 384
        --new-tokens 64 --rounds 8 --threads 2]
"""

from __future__ import annotations

import argparse
import asyncio
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
        f"--torch_threads={threads}",
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


def prepare(model_dir: Path, args: argparse.Namespace) -> tuple[int, Any, list[int], dict[str, Any]]:
    """Build the model in ``model_dir`` and load it with the server's loader; return its parameter
    count, the model, the prompt's ids and fixed-length greedy generate() arguments."""
    tokenizer = build_tokenizer(model_dir)
    params = build_model(model_dir, tokenizer, args.hidden, args.layers)
    cfg = ServerConfig(
        pretrained_model_name_or_path=str(model_dir),
        torch_dtype=args.dtype,
        device_map=args.device_map,
        adapters_dir=str(model_dir / "no-adapters"),
        torch_threads=args.threads,
    )
    loaded = load_model(cfg)
    tok = loaded.tokenizer
    n = args.new_tokens
    gen = {"do_sample": False, "max_new_tokens": n, "min_new_tokens": n, "pad_token_id": tok.pad_token_id}
    return params, loaded.model, tok(PROMPT)["input_ids"], gen


def timed_generate(model: Any, ids: list[int], gen: dict[str, Any], batch: int) -> float:
    """Seconds for generate() on ``batch`` copies of the prompt (no padding needed)."""
    inputs = torch.tensor([ids] * batch, device=model.device)
    t0 = time.perf_counter()
    with torch.inference_mode():
        out = model.generate(input_ids=inputs, attention_mask=torch.ones_like(inputs), **gen)
    if model.device.type == "cuda":
        torch.cuda.synchronize()
    assert out.shape[1] - len(ids) == gen["max_new_tokens"]
    return time.perf_counter() - t0


def overhead(args: argparse.Namespace) -> dict[str, Any]:
    """One client: /chat and streaming against direct generate() (SPEC §10's 0.95x)."""
    # Same intra-op thread count on both sides; one thread also keeps OpenMP spin-waiting from turning
    # noise from other processes on a small machine into huge outliers.
    torch.set_num_threads(args.threads)

    with tempfile.TemporaryDirectory(prefix="kaito-bench-") as tmp:
        model_dir = Path(tmp)
        params, model, ids, gen = prepare(model_dir, args)
        n = args.new_tokens
        inputs = torch.tensor([ids], device=model.device)

        def direct() -> float:
            return timed_generate(model, ids, gen, 1)

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
    return results


def percentile(values: list[float], q: float) -> float:
    """Nearest-rank percentile (q in 0..100)."""
    ordered = sorted(values)
    rank = max(0, min(len(ordered) - 1, round(q / 100 * len(ordered) + 0.5) - 1))
    return ordered[rank]


def load(args: argparse.Namespace) -> dict[str, Any]:
    """Concurrent clients through the server against direct and static-batch generate()."""
    torch.set_num_threads(args.threads)
    clients = [int(c) for c in args.clients.split(",")]
    with tempfile.TemporaryDirectory(prefix="kaito-bench-") as tmp:
        model_dir = Path(tmp)
        params, model, ids, gen = prepare(model_dir, args)
        n = args.new_tokens

        def generate(batch: int) -> float:
            return timed_generate(model, ids, gen, batch)

        port = free_port()
        proc = start_server(model_dir, port, args.dtype, args.device_map, args.threads)
        body = {"model": "bench", "prompt": PROMPT, "max_tokens": n, "min_tokens": n, "temperature": 0}

        async def run_clients(h: httpx.AsyncClient, count: int) -> tuple[float, list[float]]:
            async def one() -> float:
                t0 = time.perf_counter()
                r = await h.post("/v1/completions", json=body)
                r.raise_for_status()
                assert r.json()["usage"]["completion_tokens"] == n
                return time.perf_counter() - t0

            t0 = time.perf_counter()
            latencies = await asyncio.gather(*(one() for _ in range(count)))
            return time.perf_counter() - t0, list(latencies)

        rates: dict[str, list[float]] = {"direct": [], "static16": [], **{f"c{c}": [] for c in clients}}
        latencies: dict[int, list[float]] = {c: [] for c in clients}
        per_round: dict[int, list[list[float]]] = {c: [] for c in clients}
        loads: list[float] = []

        async def bench() -> None:
            limits = httpx.Limits(max_connections=64, max_keepalive_connections=64)
            async with httpx.AsyncClient(
                base_url=f"http://127.0.0.1:{port}", timeout=600, limits=limits
            ) as h:
                await run_clients(h, max(clients))  # warm-up
                generate(1), generate(16)
                for i in range(args.rounds):
                    order = ["direct", "static16", *(f"c{c}" for c in clients)]
                    # Rotate the order each round so no configuration always follows the same one.
                    order = order[i % len(order) :] + order[: i % len(order)]
                    for name in order:
                        if name == "direct":
                            rates[name].append(n / generate(1))
                        elif name == "static16":
                            rates[name].append(16 * n / generate(16))
                        else:
                            count = int(name[1:])
                            wall, lat = await run_clients(h, count)
                            rates[name].append(count * n / wall)
                            latencies[count].extend(lat)
                            per_round[count].append(lat)
                    loads.append(os.getloadavg()[0])

        try:
            asyncio.run(bench())
        finally:
            os.killpg(proc.pid, signal.SIGTERM)
            proc.wait(timeout=60)

    med = {k: statistics.median(v) for k, v in rates.items()}
    top = max(clients)
    results: dict[str, Any] = {
        "model_params": params,
        "layers": args.layers,
        "hidden": args.hidden,
        "device": args.device_map,
        "torch_threads": args.threads,
        "prompt_tokens": len(ids),
        "new_tokens": n,
        "rounds": args.rounds,
        "load_average_median": statistics.median(loads),
        "load_average_range": f"{min(loads):.1f}-{max(loads):.1f}",
        "direct_tokens_per_s": med["direct"],
        "static_batch16_tokens_per_s": med["static16"],
    }
    for c in clients:
        results[f"clients{c}_tokens_per_s"] = med[f"c{c}"]
        results[f"clients{c}_p50_ms"] = 1000 * statistics.median(latencies[c])
        results[f"clients{c}_p99_ms"] = 1000 * percentile(latencies[c], 99)
    one = clients[0]
    # Tail latency against the same round's single client: a load spike from other processes on a shared
    # machine then hits both sides of the ratio, as the interleaving intends.
    tail_by_round = statistics.median(
        percentile(hi, 99) / statistics.median(lo)
        for hi, lo in zip(per_round[top], per_round[one], strict=True)
    )
    checks = {
        f"clients{top} / clients{one} (>= 4)": (med[f"c{top}"] / med[f"c{one}"], 4.0, True),
        f"clients{top} / static batch 16 (>= 0.8)": (med[f"c{top}"] / med["static16"], 0.8, True),
        f"p99 at {top} / p50 at {one}, pooled (<= 6)": (
            percentile(latencies[top], 99) / statistics.median(latencies[one]),
            6.0,
            False,
        ),
        f"p99 at {top} / p50 at {one}, median of rounds (<= 6)": (tail_by_round, 6.0, False),
        f"clients{one} / direct generate() (>= 0.95)": (med[f"c{one}"] / med["direct"], 0.95, True),
    }
    for key, value in results.items():
        print(f"{key:52s} {value:.1f}" if isinstance(value, float) else f"{key:52s} {value}")
    for key, (value, target, at_least) in checks.items():
        ok = value >= target if at_least else value <= target
        results[key] = value
        print(f"{key:52s} {value:.2f} {'PASS' if ok else 'FAIL'}")
    return results


def main() -> int:
    """Run the benchmark and print (and optionally write) the numbers."""
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--mode", choices=("load", "overhead"), default="load")
    parser.add_argument("--hidden", type=int, default=384)
    parser.add_argument("--layers", type=int, default=None, help="default: 4 (load), 6 (overhead)")
    parser.add_argument("--new-tokens", type=int, default=None, help="default: 64 (load), 128 (overhead)")
    parser.add_argument("--rounds", type=int, default=8)
    parser.add_argument("--clients", default="1,4,8,16", help="concurrent clients of the load mode")
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--device-map", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads on both sides")
    parser.add_argument("--json", type=Path, default=None, help="also write the results here")
    args = parser.parse_args()
    if args.layers is None:
        args.layers = 4 if args.mode == "load" else 6
    if args.new_tokens is None:
        args.new_tokens = 64 if args.mode == "load" else 128
    results = load(args) if args.mode == "load" else overhead(args)
    if args.json is not None:
        args.json.write_text(json.dumps(results, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
