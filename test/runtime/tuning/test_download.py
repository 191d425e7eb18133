"""The URL init step: real HTTP downloads into the data directory, names, failures, secrets kept out."""

from __future__ import annotations

import functools
import http.server
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
from kaito_tuning.download import file_names, main, redact

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
