"""Flag parsing and the real launch command (``accelerate launch ... inference_api.py ...``) in a subprocess."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import httpx
import pytest
from kaito_inference.config import ConfigError, parse_args
from runtime_support import RUNTIME_DIR, free_port

from test.waiting import wait_until

pytestmark = [pytest.mark.runtime]

ENTRY = RUNTIME_DIR / "inference_api.py"
# The transformers preset command upstream renders (@v0.4.0, phi-3), accelerate params included.
UPSTREAM_ACCELERATE = ["--num_processes=1", "--num_machines=1", "--machine_rank=0", "--gpu_ids=all"]
UPSTREAM_RUN_PARAMS = ["--torch_dtype=auto", "--pipeline=text-generation", "--trust_remote_code"]


@pytest.mark.timeout(10)
def test_parse_upstream_flags() -> None:
    cfg = parse_args(
        [*UPSTREAM_RUN_PARAMS, "--chat_template=/workspace/chat_templates/phi-3.jinja"], environ={}
    )
    assert cfg.torch_dtype == "auto"
    assert cfg.pipeline == "text-generation"
    assert cfg.trust_remote_code is True
    assert cfg.pretrained_model_name_or_path == "/workspace/tfs/weights"
    assert cfg.chat_template == "/workspace/chat_templates/phi-3.jinja"
    assert cfg.port == 5000
    assert cfg.device_map == "auto"
    assert cfg.extra_model_kwargs == {}


@pytest.mark.timeout(10)
def test_parse_extras_bools_and_local_rank() -> None:
    cfg = parse_args(
        [
            "--trust_remote_code",
            "false",
            "--allow_remote_files=True",
            "--low_cpu_mem_usage",
            "--attn_implementation",
            "sdpa",
            "--foo=1",
        ],
        environ={"LOCAL_RANK": "2"},
    )
    assert cfg.trust_remote_code is False
    assert cfg.allow_remote_files is True
    assert cfg.port == 5002  # upstream: 5000 + LOCAL_RANK
    # Unknown flags are forwarded to from_pretrained as upstream did.
    assert cfg.extra_model_kwargs == {"low_cpu_mem_usage": True, "attn_implementation": "sdpa", "foo": "1"}


@pytest.mark.timeout(10)
@pytest.mark.parametrize(
    ("argv", "fragment"),
    [
        (["--pipeline=summarization"], "Unsupported pipeline"),
        (["--combination_type=magic"], "combination_type"),
        (["stray"], "unexpected argument"),
        (["--max_concurrent_generations=0"], "at least 1"),
        (["--torch_dtype=int3"], "Invalid torch dtype"),
    ],
)
def test_parse_rejects_bad_flags(argv: list[str], fragment: str) -> None:
    with pytest.raises(ConfigError, match=fragment):
        parse_args(argv, environ={})


def wait_http(url: str, proc: subprocess.Popen[bytes], timeout: float) -> httpx.Response:
    """Poll ``url`` until it answers 200 (the process must stay alive meanwhile)."""

    def ok() -> httpx.Response | None:
        if proc.poll() is not None:
            raise ServerExited(f"server exited with {proc.returncode}")
        try:
            r = httpx.get(url, timeout=2)
        except httpx.TransportError as exc:
            raise AssertionError(repr(exc)) from None
        assert r.status_code == 200, f"{r.status_code} {r.text}"
        return r

    return wait_until(ok, timeout, f"{url} to answer 200", interval=0.2)


class ServerExited(Exception):
    """The server process died while we waited for it (no point waiting out the deadline)."""


@pytest.mark.timeout(180)
def test_upstream_launch_command_serves_seed_request(tiny_model_dir: Path, tmp_path: Path) -> None:
    port = free_port()
    accelerate = Path(sys.executable).with_name("accelerate")
    cmd = [
        str(accelerate),
        "launch",
        *UPSTREAM_ACCELERATE,
        str(ENTRY),
        *UPSTREAM_RUN_PARAMS,
        f"--pretrained_model_name_or_path={tiny_model_dir}",
        f"--adapters_dir={tmp_path / 'adapter'}",
        "--served_model_name=phi-3-mini-4k-instruct",
        f"--port={port}",
    ]
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": "", "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    log = tmp_path / "server.log"
    with log.open("wb") as out:
        # Own process group: accelerate's launcher does not forward SIGTERM to the server it starts, so
        # the group gets the signal, as every process in a pod does when the kubelet stops it.
        proc = subprocess.Popen(
            cmd, stdout=out, stderr=subprocess.STDOUT, env=env, cwd=tmp_path, start_new_session=True
        )
        try:
            assert wait_http(f"http://127.0.0.1:{port}/health", proc, 150).json() == {"status": "Healthy"}
            r = httpx.post(
                f"http://127.0.0.1:{port}/chat",
                headers={"accept": "application/json", "Content-Type": "application/json"},
                content='{"prompt":"YOUR QUESTION HERE"}',
                timeout=60,
            )
            assert r.status_code == 200, r.text
            assert r.json()["Result"].startswith("YOUR QUESTION HERE")
            models = httpx.get(f"http://127.0.0.1:{port}/v1/models", timeout=30).json()
            assert models["data"][0]["id"] == "phi-3-mini-4k-instruct"
        finally:
            os.killpg(proc.pid, signal.SIGTERM)
            try:
                proc.wait(timeout=60)
            finally:
                if proc.poll() is None:
                    os.killpg(proc.pid, signal.SIGKILL)
                    proc.wait()
    # The server itself shut down cleanly (uvicorn's last line) and nothing listens any more.
    wait_until(
        lambda: "Finished server process" in log.read_text(), 30, "uvicorn's shutdown line", interval=0.1
    )
    assert "Traceback" not in log.read_text()
    with pytest.raises(httpx.TransportError):
        httpx.get(f"http://127.0.0.1:{port}/health", timeout=2)


@pytest.mark.timeout(120)
def test_python_launch_drains_and_exits_zero_on_sigterm(tiny_model_dir: Path, tmp_path: Path) -> None:
    """The recommended ``exec python3 inference_api.py ...`` form: SIGTERM ends it cleanly with 0."""
    port = free_port()
    cmd = [
        sys.executable,
        str(ENTRY),
        "--pipeline=conversational",
        "--torch_dtype=float32",
        "--device_map=cpu",
        f"--pretrained_model_name_or_path={tiny_model_dir}",
        f"--adapters_dir={tmp_path / 'adapter'}",
        f"--port={port}",
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env, cwd=tmp_path)
    try:
        wait_http(f"http://127.0.0.1:{port}/healthz", proc, 90)
        r = httpx.post(
            f"http://127.0.0.1:{port}/chat",
            json={"messages": [{"role": "user", "content": "hi"}], "generate_kwargs": {"max_new_tokens": 4}},
            timeout=60,
        )
        assert r.status_code == 200, r.text
        assert isinstance(r.json()["Result"], str)
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            out, _ = proc.communicate(timeout=60)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    assert proc.returncode == 0, out.decode()
    assert b"Traceback" not in out


@pytest.mark.timeout(60)
def test_broken_adapter_exits_non_zero_with_clear_message(tmp_path: Path) -> None:
    (tmp_path / "adapter" / "my-adapter").mkdir(parents=True)
    proc = subprocess.run(
        [
            sys.executable,
            str(ENTRY),
            "--pretrained_model_name_or_path=/nonexistent",
            f"--adapters_dir={tmp_path / 'adapter'}",
        ],
        capture_output=True,
        text=True,
        timeout=50,
        check=False,
    )
    assert proc.returncode == 1
    assert "adapter 'my-adapter'" in proc.stderr
    assert "directory is empty" in proc.stderr
    assert "Traceback" not in proc.stderr


@pytest.mark.timeout(60)
def test_bad_flag_exits_2(tmp_path: Path) -> None:
    proc = subprocess.run(
        [sys.executable, str(ENTRY), "--pipeline=translation"],
        capture_output=True,
        text=True,
        timeout=50,
        check=False,
    )
    assert proc.returncode == 2
    assert "Unsupported pipeline" in proc.stderr
