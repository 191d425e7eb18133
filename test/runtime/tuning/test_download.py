"""The URL init step: real HTTP downloads into the data directory, names, failures, secrets kept out."""

from __future__ import annotations

import base64
import functools
import http.server
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
from kaito_tuning import redaction as tuning_redaction
from kaito_tuning.download import file_names, main, redact

from presets.oci import redaction as oci_redaction
from test.redaction_cases import CASES

pytestmark = [pytest.mark.runtime, pytest.mark.timeout(60)]


class _Handler(http.server.SimpleHTTPRequestHandler):
    def do_GET(self) -> None:
        if self.path.startswith("/redirect/"):
            self.send_response(302)
            self.send_header("Location", "/files/" + self.path.rsplit("/", 1)[-1])
            self.send_header("Content-Length", "0")
            self.end_headers()
            return
        super().do_GET()

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture
def server(tmp_path: Path) -> Iterator[str]:
    root = tmp_path / "www"
    (root / "files").mkdir(parents=True)
    (root / "files" / "train.parquet").write_bytes(b"PAR1 fake parquet bytes")
    (root / "files" / "extra.jsonl").write_text('{"text": "a"}\n')
    (root / "files" / "empty.csv").write_text("")
    httpd = http.server.ThreadingHTTPServer(
        ("127.0.0.1", 0), functools.partial(_Handler, directory=str(root))
    )
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}"
    httpd.shutdown()
    httpd.server_close()


def test_downloads_every_url_into_the_data_dir(
    server: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    dest = tmp_path / "mnt" / "data"
    monkeypatch.setenv(
        "DATA_URLS", f"{server}/files/train.parquet?download=true&sig=SECRET {server}/redirect/extra.jsonl"
    )
    term = tmp_path / "term"
    assert main(["--dest", str(dest), "--termination-log", str(term)]) == 0
    assert sorted(p.name for p in dest.iterdir()) == ["extra.jsonl", "train.parquet"]
    assert (dest / "train.parquet").read_bytes() == b"PAR1 fake parquet bytes"
    assert term.read_text().strip() == f"downloaded 2 file(s) into {dest}"


def test_failures_exit_1_without_leaking_the_query(
    server: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    dest = tmp_path / "data"
    term = tmp_path / "term"
    args = ["--dest", str(dest), "--attempts", "2", "--retry-delay", "0", "--termination-log", str(term)]
    assert main([*args, f"{server}/files/missing.parquet?sig=SECRET"]) == 1
    assert "missing.parquet: HTTP 404 after 2 attempt(s)" in term.read_text()
    assert main([*args, f"{server}/files/empty.csv"]) == 1
    assert "empty response body" in term.read_text()
    assert not any(dest.iterdir())  # no partial files left behind
    captured = capsys.readouterr()
    assert "SECRET" not in captured.out + captured.err + term.read_text()
    assert main(["--dest", str(dest), "--termination-log", str(term)]) == 2


def test_file_names() -> None:
    assert file_names(
        [
            "https://h/a/train.parquet?download=true",
            "https://h/b/train.parquet",
            "https://h/",
            "https://h/x%20y.csv",
        ]
    ) == ["train.parquet", "1-train.parquet", "dataset-2", "x_y.csv"]
    assert (
        redact("https://acct.blob.core.windows.net/c/d.json?sv=1&sig=abc")
        == "https://acct.blob.core.windows.net/c/d.json"
    )
    assert (
        redact("https://bob:hunter2@h.example:8443/d.json?x=1") == "https://[redacted]@h.example:8443/d.json"
    )


class _BasicAuthHandler(http.server.BaseHTTPRequestHandler):
    """Serves /data.jsonl only to ``alice:hunter2`` (Basic)."""

    def do_GET(self) -> None:
        expected = "Basic " + base64.b64encode(b"alice:hunter2").decode()
        if self.headers.get("Authorization") != expected:
            self.send_response(401)
            self.send_header("WWW-Authenticate", 'Basic realm="data"')
            self.send_header("Content-Length", "0")
            self.end_headers()
            return
        body = b'{"text": "a"}\n'
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture
def basic_auth_server() -> Iterator[int]:
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _BasicAuthHandler)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    yield int(httpd.server_address[1])
    httpd.shutdown()
    httpd.server_close()


def test_userinfo_is_sent_as_basic_auth_and_never_logged(
    basic_auth_server: int,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    caplog: pytest.LogCaptureFixture,
) -> None:
    """``user:password@`` authenticates (a real server checks it) and appears in no output on failure."""
    dest, term = tmp_path / "data", tmp_path / "term"
    args = ["--dest", str(dest), "--attempts", "1", "--termination-log", str(term)]
    assert main([*args, f"http://alice:hunter2@127.0.0.1:{basic_auth_server}/data.jsonl"]) == 0
    assert (dest / "data.jsonl").read_text() == '{"text": "a"}\n'
    assert main([*args, f"http://alice:wrong-pw@127.0.0.1:{basic_auth_server}/data.jsonl"]) == 1
    message = term.read_text()
    assert f"http://[redacted]@127.0.0.1:{basic_auth_server}/data.jsonl: HTTP 401" in message
    captured = capsys.readouterr()
    for secret in ("hunter2", "wrong-pw", "alice:"):
        assert secret not in captured.out + captured.err + message + caplog.text


@pytest.mark.parametrize(("text", "expected"), CASES)
def test_runtime_redaction_copies(text: str, expected: str) -> None:
    """The runtime's copies of the operator's redaction module pass the operator's cases."""
    assert tuning_redaction.redact(text) == expected
    assert oci_redaction.redact(text) == expected
