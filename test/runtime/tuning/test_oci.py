"""OCI push/pull against a real registry (Debian's docker-registry on loopback), auth and pull compatibility."""

from __future__ import annotations

import base64
import gzip
import hashlib
import http.server
import io
import json
import tarfile
import threading
import urllib.error
import urllib.request
from pathlib import Path
from typing import ClassVar

import pytest
from registry_support import PASSWORD, USER, Registry, TokenServer, docker_config, start_registry

from presets.oci import (
    ARTIFACT_TYPE,
    AuthError,
    Credentials,
    CredentialsError,
    RegistryClient,
    RegistryError,
    load_credentials,
    parse_reference,
    pull_to_directory,
    push_directory,
)
from presets.oci.cli import COMPLETED_MARKER, FAILED_MARKER, main
from presets.oci.reference import ReferenceError

pytestmark = [pytest.mark.runtime, pytest.mark.timeout(60)]


def adapter_files(root: Path, size: int = 300_000, seed: int = 1) -> Path:
    """An adapter-shaped directory: config + a binary 'weights' file with random content."""
    root.mkdir(parents=True, exist_ok=True)
    (root / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": 4}))
    (root / "adapter_model.safetensors").write_bytes(
        b"".join(hashlib.sha256(f"{seed}-{i}".encode()).digest() for i in range(size // 32))
    )
    return root


def manifest_of(registry: Registry, repo: str, tag: str) -> dict[str, object]:
    req = urllib.request.Request(
        f"http://{registry.host}/v2/{repo}/manifests/{tag}",
        headers={"Accept": "application/vnd.oci.image.manifest.v1+json"},
    )
    with urllib.request.urlopen(req, timeout=10) as resp:
        data: dict[str, object] = json.loads(resp.read())
        return data


@pytest.mark.parametrize(
    ("text", "registry", "repository", "tag", "digest", "api_host"),
    [
        (
            "myacr.azurecr.io/adapters/phi-3:0.0.1",
            "myacr.azurecr.io",
            "adapters/phi-3",
            "0.0.1",
            None,
            "myacr.azurecr.io",
        ),
        ("127.0.0.1:5000/a:v1", "127.0.0.1:5000", "a", "v1", None, "127.0.0.1:5000"),
        ("localhost/a/b", "localhost", "a/b", None, None, "localhost"),
        ("busybox", "docker.io", "library/busybox", None, None, "registry-1.docker.io"),
        ("user/img:1", "docker.io", "user/img", "1", None, "registry-1.docker.io"),
        ("r.io/x@sha256:" + "a" * 64, "r.io", "x", None, "sha256:" + "a" * 64, "r.io"),
    ],
)
def test_parse_reference(
    text: str, registry: str, repository: str, tag: str | None, digest: str | None, api_host: str
) -> None:
    ref = parse_reference(text)
    assert (ref.registry, ref.repository, ref.tag, ref.digest, ref.api_host) == (
        registry,
        repository,
        tag,
        digest,
        api_host,
    )
    assert ref.target == (digest or tag or "latest")


@pytest.mark.parametrize(
    "text", ["", "https://r.io/a:b", "r.io/UPPER:1", "r.io/a:b@sha256:short", "r.io/a:bad/tag:x:"]
)
def test_parse_reference_rejects(text: str) -> None:
    with pytest.raises(ReferenceError):
        parse_reference(text)


def test_docker_config_credentials(tmp_path: Path) -> None:
    config = tmp_path / "config.json"
    auth = base64.b64encode(b"bob:p@ss:word").decode()
    config.write_text(
        json.dumps(
            {
                "auths": {
                    "https://index.docker.io/v1/": {"auth": auth},
                    "http://reg.local:5000": {"username": "u", "password": "p"},
                    "acr.azurecr.io": {"identitytoken": "refresh-token-value"},
                },
                "credsStore": "desktop",
            }
        )
    )
    hub = load_credentials([config], "docker.io")
    assert hub is not None and (hub.username, hub.password) == ("bob", "p@ss:word")
    local = load_credentials([config], "reg.local:5000")
    assert local is not None and local.basic_header() == "Basic " + base64.b64encode(b"u:p").decode()
    acr = load_credentials([config], "acr.azurecr.io")
    assert acr is not None and acr.identity_token == "refresh-token-value" and acr.basic_header() is None
    assert load_credentials([config], "other.io") is None
    # Secrets stay out of repr (and so out of logs and tracebacks).
    assert "p@ss" not in repr(hub) and "refresh-token-value" not in repr(acr)


def test_docker_config_errors_do_not_echo_content(tmp_path: Path) -> None:
    bad = tmp_path / "bad.json"
    bad.write_text('{"auths": {"r.io": {"auth": "c2VjcmV0"}}}')  # base64("secret"), no colon
    with pytest.raises(CredentialsError) as err:
        load_credentials([bad], "r.io")
    assert "c2VjcmV0" not in str(err.value) and "secret" not in str(err.value)
    with pytest.raises(CredentialsError, match="does not exist"):
        load_credentials([tmp_path / "missing.json"], "r.io")


def test_push_pull_roundtrip_is_byte_identical_and_deterministic(registry: Registry, tmp_path: Path) -> None:
    src = adapter_files(tmp_path / "src")
    (src / "fine_tuning_completed.txt").write_text("marker, not content")
    (src / ".hidden").write_text("not content")
    (src / "checkpoint-1").mkdir()
    ref = parse_reference(f"{registry.host}/kaito/adapter:v1")
    client = RegistryClient(ref, None, plain_http=True)
    first = push_directory(client, src, annotations={"sh.kaito.model.name": "tiny"})
    second = push_directory(
        RegistryClient(ref, None, plain_http=True), src, annotations={"sh.kaito.model.name": "tiny"}
    )
    assert first == second  # deterministic layer: same files, same digest

    manifest = manifest_of(registry, "kaito/adapter", "v1")
    assert manifest["artifactType"] == ARTIFACT_TYPE
    assert manifest["annotations"] == {"sh.kaito.model.name": "tiny"}
    layers = manifest["layers"]
    assert isinstance(layers, list) and [layer["mediaType"] for layer in layers] == [
        "application/vnd.oci.image.layer.v1.tar+gzip"
    ]

    dest = tmp_path / "mnt" / "adapter" / "tiny"
    names = pull_to_directory(
        RegistryClient(parse_reference(f"{registry.host}/kaito/adapter@{first}"), None, plain_http=True), dest
    )
    assert names == ["adapter_config.json", "adapter_model.safetensors"]
    for name in names:
        assert (dest / name).read_bytes() == (src / name).read_bytes()
    assert sorted(p.name for p in dest.iterdir()) == names


def test_cli_with_basic_auth_and_push_secret(
    auth_registry: Registry, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    src = adapter_files(tmp_path / "results", seed=2)
    (src / "training_args.bin").write_bytes(b"not pushed")
    secret_dir = tmp_path / "docker-config"
    secret_dir.mkdir()
    docker_config(secret_dir / "config.json", auth_registry.host, USER, PASSWORD)
    image = f"{auth_registry.host}/kaito/tuned:0.0.1"
    term = tmp_path / "termination-log"

    # No credentials: a clear refusal (exit 3) naming the fix.
    assert main(["push", "--plain-http", str(src), image, "--termination-log", str(term)]) == 3
    assert "no credentials for" in term.read_text() and "--docker-config" in term.read_text()

    code = main(
        [
            "push",
            "--plain-http",
            "--docker-config",
            str(secret_dir),
            "--file",
            "adapter_config.json",
            "--file",
            "adapter_model.safetensors",
            "--termination-log",
            str(term),
            str(src),
            image,
        ]
    )
    assert code == 0, term.read_text()
    assert term.read_text().startswith(f"pushed {image}@sha256:")

    dest = tmp_path / "mnt" / "adapter" / "tuned"
    config_file = secret_dir / "config.json"
    assert main(["pull", "--plain-http", "--docker-config", str(config_file), image, str(dest)]) == 0
    assert sorted(p.name for p in dest.iterdir()) == ["adapter_config.json", "adapter_model.safetensors"]
    assert (dest / "adapter_model.safetensors").read_bytes() == (
        src / "adapter_model.safetensors"
    ).read_bytes()

    wrong = tmp_path / "wrong.json"
    docker_config(wrong, auth_registry.host, USER, "not-the-password")
    assert main(["pull", "--plain-http", "--docker-config", str(wrong), image, str(tmp_path / "x")]) == 3
    out = capsys.readouterr()
    for text in (out.out, out.err, term.read_text()):
        assert PASSWORD not in text and "not-the-password" not in text
        assert base64.b64encode(f"{USER}:{PASSWORD}".encode()).decode() not in text


def test_check_push_answers_before_training_and_writes_nothing(
    auth_registry: Registry, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """The tuning Job's first step: the push secret's credentials may push, or the exit code says why."""
    image = f"{auth_registry.host}/kaito/checked:0.0.1"
    term = tmp_path / "termination-log"
    good = tmp_path / "good"
    good.mkdir()
    docker_config(good / "config.json", auth_registry.host, USER, PASSWORD)
    assert (
        main(
            [
                "check-push",
                "--plain-http",
                "--docker-config",
                str(good),
                image,
                "--termination-log",
                str(term),
            ]
        )
        == 0
    )
    assert term.read_text().strip() == f"push to {image} allowed"
    # Nothing was pushed: the probe upload was cancelled and no tag exists.
    creds = base64.b64encode(f"{USER}:{PASSWORD}".encode()).decode()
    req = urllib.request.Request(
        f"http://{auth_registry.host}/v2/kaito/checked/tags/list", headers={"Authorization": f"Basic {creds}"}
    )
    with pytest.raises(urllib.error.HTTPError) as err:
        urllib.request.urlopen(req, timeout=10)
    assert err.value.code == 404

    wrong = tmp_path / "wrong.json"
    docker_config(wrong, auth_registry.host, USER, "not-the-password")
    assert (
        main(
            [
                "check-push",
                "--plain-http",
                "--docker-config",
                str(wrong),
                image,
                "--termination-log",
                str(term),
            ]
        )
        == 3
    )
    assert "401" in term.read_text() and "not-the-password" not in term.read_text()

    # The imagePushSecret does not exist: the optional secret volume is an empty directory.
    empty = tmp_path / "empty-secret-volume"
    empty.mkdir()
    assert (
        main(
            [
                "check-push",
                "--plain-http",
                "--docker-config",
                str(empty),
                image,
                "--termination-log",
                str(term),
            ]
        )
        == 2
    )
    assert "does not exist" in term.read_text()
    assert PASSWORD not in capsys.readouterr().err


def test_cli_errors_map_to_exit_codes(registry: Registry, tmp_path: Path) -> None:
    term = tmp_path / "term"
    assert (
        main(
            [
                "pull",
                "--plain-http",
                f"{registry.host}/kaito/absent:1",
                str(tmp_path / "d"),
                "--termination-log",
                str(term),
            ]
        )
        == 4
    )
    assert "HTTP 404" in term.read_text()
    assert main(["pull", "--plain-http", "Not A Ref", str(tmp_path / "d")]) == 2
    assert main(["push", "--plain-http", str(tmp_path / "nowhere"), f"{registry.host}/kaito/x:1"]) == 4
    src = adapter_files(tmp_path / "src")
    assert (
        main(["push", "--plain-http", "--file", "missing.bin", str(src), f"{registry.host}/kaito/x:1"]) == 4
    )
    # Nothing listens on port 9 (discard): a transport error after the retries.
    assert main(["push", "--plain-http", "--retries", "0", str(src), "127.0.0.1:9/kaito/x:1"]) == 1


def test_push_wait_mode_follows_the_trainer_markers(registry: Registry, tmp_path: Path) -> None:
    src = adapter_files(tmp_path / "results")
    image = f"{registry.host}/kaito/waited:1"
    (src / FAILED_MARKER).write_text("error: dataset: no rows")
    term = tmp_path / "term"
    assert main(["push", "--plain-http", "--wait", str(src), image, "--termination-log", str(term)]) == 5
    assert "the trainer failed" in term.read_text() and "no rows" in term.read_text()
    (src / FAILED_MARKER).unlink()
    assert main(["push", "--plain-http", "--wait", "--wait-timeout", "0.1", str(src), image]) == 5
    (src / COMPLETED_MARKER).write_text("Fine-Tuning completed")
    assert main(["push", "--plain-http", "--wait", "--file", "adapter_config.json", str(src), image]) == 0


def _tar_gz(entries: dict[str, bytes | None]) -> tuple[bytes, str]:
    """A tar+gzip layer; a value of None is a directory. Returns (blob, diff_id)."""
    raw = io.BytesIO()
    with tarfile.open(fileobj=raw, mode="w") as tar:
        for name, data in entries.items():
            info = tarfile.TarInfo(name)
            if data is None:
                info.type = tarfile.DIRTYPE
                tar.addfile(info)
            else:
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    uncompressed = raw.getvalue()
    return gzip.compress(uncompressed), "sha256:" + hashlib.sha256(uncompressed).hexdigest()


def test_pull_reads_docker_style_images_and_oras_files(registry: Registry, tmp_path: Path) -> None:
    """Upstream v0.4.0 pushed busybox-based docker images with /data; `oras push` makes file layers."""
    ref = parse_reference(f"{registry.host}/kaito/legacy:1")
    client = RegistryClient(ref, None, plain_http=True)
    base, base_diff = _tar_gz({"bin/": None, "bin/sh": b"#!busybox", "data/": None, "data/stale.txt": b"old"})
    top, top_diff = _tar_gz(
        {
            "data/.wh.stale.txt": b"",
            "data/adapter_config.json": b'{"peft_type": "LORA"}',
            "data/../../escape.txt": b"must not be written",
        }
    )
    plain = b"weights-bytes"
    blobs = [base, top, plain]
    config = json.dumps({"rootfs": {"type": "layers", "diff_ids": [base_diff, top_diff]}}).encode()
    for blob in [*blobs, config]:
        path = tmp_path / "blob"
        path.write_bytes(blob)
        client.upload_blob(path, "sha256:" + hashlib.sha256(blob).hexdigest(), len(blob))

    def desc(blob: bytes, media_type: str, **annotations: str) -> dict[str, object]:
        d: dict[str, object] = {
            "mediaType": media_type,
            "digest": "sha256:" + hashlib.sha256(blob).hexdigest(),
            "size": len(blob),
        }
        if annotations:
            d["annotations"] = annotations
        return d

    manifest = {
        "schemaVersion": 2,
        "mediaType": "application/vnd.docker.distribution.manifest.v2+json",
        "config": desc(config, "application/vnd.docker.container.image.v1+json"),
        "layers": [
            desc(base, "application/vnd.docker.image.rootfs.diff.tar.gzip"),
            desc(top, "application/vnd.docker.image.rootfs.diff.tar.gzip"),
            # `oras push file` style: a non-tar layer named by its title annotation.
            desc(
                plain,
                "application/vnd.kaito.weights",
                **{"org.opencontainers.image.title": "adapter_model.bin"},
            ),
        ],
    }
    client.put_manifest(
        json.dumps(manifest).encode(), "application/vnd.docker.distribution.manifest.v2+json", "1"
    )

    dest = tmp_path / "work" / "mnt" / "adapter" / "legacy"
    names = pull_to_directory(client, dest)
    assert names == ["adapter_config.json", "adapter_model.bin"]
    assert (dest / "adapter_model.bin").read_bytes() == plain
    assert not (dest / "stale.txt").exists()  # removed by the whiteout of the upper layer
    assert not any(p.name == "escape.txt" for p in (tmp_path / "work").rglob("*"))
    assert not (dest / "bin").exists()  # only /data is taken


class _Recorder(http.server.BaseHTTPRequestHandler):
    """A registry front that demands basic auth and redirects blob GETs to a second 'storage' server."""

    seen: ClassVar[list[tuple[int, str | None]]] = []
    storage_url: ClassVar[str] = ""
    blob: ClassVar[bytes] = b"blob-bytes-behind-a-redirect"

    def _reply(self, status: int, body: bytes = b"", **headers: str) -> None:
        self.send_response(status)
        for key, value in headers.items():
            self.send_header(key.replace("_", "-"), value)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def do_GET(self) -> None:
        auth = self.headers.get("Authorization")
        self.seen.append((int(self.server.server_address[1]), auth))
        if not self.path.startswith("/v2/"):
            self._reply(200, self.blob)
        elif auth is None:
            self._reply(401, WWW_Authenticate='Basic realm="test"')
        else:
            self._reply(307, Location=f"{self.storage_url}/signed?sig=abc")

    def log_message(self, *args: object) -> None:
        pass


def test_credentials_are_not_forwarded_to_redirect_targets(tmp_path: Path) -> None:
    """Blob GETs may redirect to signed storage URLs on another host: the credentials stay home."""
    servers = [http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Recorder) for _ in range(2)]
    for server in servers:
        threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        registry_port, storage_port = (int(s.server_address[1]) for s in servers)
        _Recorder.storage_url = f"http://127.0.0.1:{storage_port}"
        creds = Credentials(username="u", password="secret")
        client = RegistryClient(parse_reference(f"127.0.0.1:{registry_port}/a:b"), creds, plain_http=True)
        digest = "sha256:" + hashlib.sha256(_Recorder.blob).hexdigest()
        client.download_blob(digest, tmp_path / "blob")
        assert (tmp_path / "blob").read_bytes() == _Recorder.blob
    finally:
        for server in servers:
            server.shutdown()
            server.server_close()
    assert [auth for port, auth in _Recorder.seen if port == registry_port] == [None, creds.basic_header()]
    assert [auth for port, auth in _Recorder.seen if port == storage_port] == [None]


def test_bearer_token_auth_with_password_and_identity_token(tmp_path: Path) -> None:
    """The token flow of ACR/GHCR/Docker Hub against distribution's own token verification."""
    tokens = TokenServer(tmp_path / "token", users={USER: PASSWORD}, refresh_tokens={"refresh-abc"})
    registry = start_registry(tmp_path / "registry", token_server=tokens)
    try:
        src = adapter_files(tmp_path / "results", seed=3)
        image = f"{registry.host}/kaito/bearer:1"
        password_config = docker_config(tmp_path / "password.json", registry.host, USER, PASSWORD)
        assert main(["push", "--plain-http", "--docker-config", str(password_config), str(src), image]) == 0

        # What `az acr login` writes: a placeholder user and an identity (refresh) token.
        identity_config = tmp_path / "identity.json"
        placeholder = base64.b64encode(b"00000000-0000-0000-0000-000000000000:").decode()
        identity_config.write_text(
            json.dumps({"auths": {registry.host: {"auth": placeholder, "identitytoken": "refresh-abc"}}})
        )
        dest = tmp_path / "pulled"
        assert main(["pull", "--plain-http", "--docker-config", str(identity_config), image, str(dest)]) == 0
        for name in ("adapter_config.json", "adapter_model.safetensors"):
            assert (dest / name).read_bytes() == (src / name).read_bytes()

        assert ("GET", "password", "repository:kaito/bearer:pull,push") in tokens.requests
        assert ("POST", "refresh_token", "repository:kaito/bearer:pull") in tokens.requests

        term = tmp_path / "term"
        assert (
            main(["pull", "--plain-http", image, str(tmp_path / "anon"), "--termination-log", str(term)]) == 3
        )
        assert "token request" in term.read_text() and "HTTP 401" in term.read_text()
        identity_config.write_text(json.dumps({"auths": {registry.host: {"identitytoken": "revoked"}}}))
        assert (
            main(
                ["pull", "--plain-http", "--docker-config", str(identity_config), image, str(tmp_path / "x")]
            )
            == 3
        )
    finally:
        registry.stop()
        tokens.stop()


def test_pull_replaces_the_directory_only_when_complete(registry: Registry, tmp_path: Path) -> None:
    src = adapter_files(tmp_path / "src", seed=4)
    image = f"{registry.host}/kaito/replace:1"
    assert main(["push", "--plain-http", str(src), image]) == 0
    dest = tmp_path / "mnt" / "adapter" / "replace"
    (dest / "old-dir").mkdir(parents=True)
    (dest / "adapter_model.bin").write_bytes(b"stale weights of an earlier adapter")
    # A failed pull leaves what was there untouched (and no staging directory behind).
    assert main(["pull", "--plain-http", f"{registry.host}/kaito/replace:missing", str(dest)]) == 4
    assert sorted(p.name for p in dest.iterdir()) == ["adapter_model.bin", "old-dir"]
    assert main(["pull", "--plain-http", image, str(dest)]) == 0
    assert sorted(p.name for p in dest.iterdir()) == ["adapter_config.json", "adapter_model.safetensors"]


def test_corrupt_blob_is_refused_and_leaves_the_target_untouched(registry: Registry, tmp_path: Path) -> None:
    src = adapter_files(tmp_path / "src", seed=5)
    image = f"{registry.host}/kaito/corrupt:1"
    assert main(["push", "--plain-http", str(src), image]) == 0
    layer = manifest_of(registry, "kaito/corrupt", "1")["layers"][0]  # type: ignore[index]
    hexdigest = str(layer["digest"]).removeprefix("sha256:")
    blob = registry.storage / "docker/registry/v2/blobs/sha256" / hexdigest[:2] / hexdigest / "data"
    data = bytearray(blob.read_bytes())
    data[len(data) // 2] ^= 0xFF  # same size, one flipped byte: only the digest check can notice
    blob.write_bytes(bytes(data))

    dest = tmp_path / "adapter"
    dest.mkdir()
    (dest / "keep.txt").write_text("previous content")
    term = tmp_path / "term"
    assert main(["pull", "--plain-http", image, str(dest), "--termination-log", str(term)]) == 1
    assert "blob digest mismatch" in term.read_text()
    assert [p.name for p in dest.iterdir()] == ["keep.txt"]


class _Flaky(http.server.BaseHTTPRequestHandler):
    """Answers 503 to the first ``failures`` requests, then 404 (so the outcome is deterministic)."""

    failures: ClassVar[int] = 2
    count: ClassVar[int] = 0

    def do_GET(self) -> None:
        type(self).count += 1
        status = 503 if self.count <= self.failures else 404
        body = json.dumps({"errors": [{"code": "MANIFEST_UNKNOWN", "message": "manifest unknown"}]}).encode()
        self.send_response(status)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args: object) -> None:
        pass


def test_server_errors_are_retried_then_reported() -> None:
    from presets.oci import NotFoundError, RegistryError

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Flaky)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        ref = parse_reference(f"127.0.0.1:{server.server_address[1]}/a:b")
        with pytest.raises(NotFoundError, match="manifest unknown"):
            RegistryClient(ref, None, plain_http=True, retries=2, backoff=0.01).get_manifest("b", ["*/*"])
        assert _Flaky.count == 3  # two 503s retried, then the 404 reported
        _Flaky.count = 0
        with pytest.raises(RegistryError, match="HTTP 503") as err:
            RegistryClient(ref, None, plain_http=True, retries=1, backoff=0.01).get_manifest("b", ["*/*"])
        assert err.value.status == 503 and _Flaky.count == 2
    finally:
        server.shutdown()
        server.server_close()


class _BearerFront(http.server.BaseHTTPRequestHandler):
    """A registry front that answers 401 with a Bearer challenge whose realm is ``realm``, and a token
    endpoint (``/token``) that records what reached it."""

    realm: ClassVar[str] = ""
    token_requests: ClassVar[list[tuple[str, str | None, bytes]]] = []

    def _reply(self, status: int, body: bytes = b"", **headers: str) -> None:
        self.send_response(status)
        for key, value in headers.items():
            self.send_header(key.replace("_", "-"), value)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def _token(self) -> None:
        length = int(self.headers.get("Content-Length") or 0)
        self.token_requests.append((self.command, self.headers.get("Authorization"), self.rfile.read(length)))
        self._reply(200, json.dumps({"token": "tok"}).encode())

    def do_GET(self) -> None:
        if self.path.startswith("/token"):
            return self._token()
        if self.headers.get("Authorization") == "Bearer tok":
            return self._reply(200, b"{}")
        return self._reply(401, WWW_Authenticate=f'Bearer realm="{self.realm}",service="r"')

    def do_POST(self) -> None:
        self._token()

    def log_message(self, *args: object) -> None:
        pass


@pytest.mark.parametrize(
    "creds",
    [Credentials(username="u", password="hunter2"), Credentials(identity_token="refresh-abc")],
    ids=["basic", "identity-token"],
)
def test_credentials_never_go_to_a_plain_http_realm_unless_plain_http_was_asked(creds: Credentials) -> None:
    """The registry names the token realm; an http one gets neither a password nor a refresh token.

    The client talks https to its registry (``plain_http=False``); the request goes to an absolute
    http URL (as upload locations do) of a real server whose challenge names an http realm.
    """
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _BearerFront)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        base = f"http://127.0.0.1:{server.server_address[1]}"
        _BearerFront.realm = f"{base}/token"
        _BearerFront.token_requests = []
        ref = parse_reference(f"127.0.0.1:{server.server_address[1]}/a:b")
        client = RegistryClient(ref, creds, plain_http=False, retries=0)
        with pytest.raises(AuthError, match=r"refusing to send credentials .* over plain http"):
            client.request("GET", f"{base}/v2/a/manifests/b", scope="repository:a:pull")
        assert _BearerFront.token_requests == [], "the credentials reached the http realm"
        # Asked for plain http (a registry without TLS): the same realm is fine.
        plain = RegistryClient(ref, creds, plain_http=True, retries=0)
        assert plain.request("GET", "/v2/a/manifests/b", scope="repository:a:pull").status == 200
        assert len(_BearerFront.token_requests) == 1
    finally:
        server.shutdown()
        server.server_close()


def test_error_messages_carry_no_userinfo_or_signature(tmp_path: Path) -> None:
    """A redirect to a storage URL with ``user:password@`` and a signature: the failure names the
    host and path only (the message reaches the termination log, the Workspace status and Events)."""
    servers = [http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Recorder) for _ in range(2)]
    for server in servers:
        threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        registry_port, storage_port = (int(s.server_address[1]) for s in servers)
        _Recorder.storage_url = f"http://store:hunter2@127.0.0.1:{storage_port}"
        client = RegistryClient(
            parse_reference(f"127.0.0.1:{registry_port}/a:b"),
            Credentials(username="u", password="pw"),
            plain_http=True,
            retries=0,
        )
        with pytest.raises(RegistryError) as failed:
            client.download_blob("sha256:" + "0" * 64, tmp_path / "blob")
    finally:
        for server in servers:
            server.shutdown()
            server.server_close()
        _Recorder.storage_url = ""
    message = str(failed.value)
    assert "hunter2" not in message and "sig=abc" not in message, message
    assert f"[redacted]@127.0.0.1:{storage_port}/signed" in message, message
