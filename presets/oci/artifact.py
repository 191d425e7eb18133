"""Pack a directory as an adapter artifact, push it; pull an artifact and unpack its ``/data``.

Artifact layout (the shape upstream KAITO's ORAS pusher produces from v0.4.5, so either side can read
the other's): an OCI image manifest whose single layer is a deterministic tar+gzip of
``data/<file>`` for each pushed file, with a minimal OCI image config (``rootfs.diff_ids``). Being a
valid image, it can also be mounted by a Kubernetes image volume (files under ``/data``). The manifest
carries ``artifactType: application/vnd.kaito.adapter.v1`` so registries and ``oras discover`` can tell
adapters apart from runnable images.

Pull accepts that shape, docker images whose ``/data`` holds the files (upstream v0.4.0's busybox-based
images: every layer's ``data/`` entries, applied in order, whiteouts honoured), and plain ORAS file
artifacts (non-tar layers named by ``org.opencontainers.image.title``).
"""

from __future__ import annotations

import gzip
import hashlib
import json
import logging
import os
import platform
import shutil
import tarfile
import tempfile
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any

from .client import RegistryClient, RegistryError

log = logging.getLogger("kaito_oci")

ARTIFACT_TYPE = "application/vnd.kaito.adapter.v1"
OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
OCI_INDEX = "application/vnd.oci.image.index.v1+json"
OCI_CONFIG = "application/vnd.oci.image.config.v1+json"
OCI_LAYER_TAR = "application/vnd.oci.image.layer.v1.tar"
OCI_LAYER_TGZ = "application/vnd.oci.image.layer.v1.tar+gzip"
DOCKER_MANIFEST = "application/vnd.docker.distribution.manifest.v2+json"
DOCKER_LIST = "application/vnd.docker.distribution.manifest.list.v2+json"
DOCKER_LAYER_TGZ = "application/vnd.docker.image.rootfs.diff.tar.gzip"
TITLE = "org.opencontainers.image.title"
DATA_PREFIX = "data"
MANIFEST_ACCEPT = [OCI_MANIFEST, DOCKER_MANIFEST, OCI_INDEX, DOCKER_LIST]
_TAR_TYPES = {OCI_LAYER_TAR, OCI_LAYER_TGZ, DOCKER_LAYER_TGZ, "application/vnd.docker.image.rootfs.diff.tar"}
_WHITEOUT = ".wh."
CONTROL_FILES = ("fine_tuning_completed.txt", "fine_tuning_failed.txt")
_OPAQUE = ".wh..wh..opq"


class ArtifactError(ValueError):
    """The directory cannot be packed, or the pulled artifact holds nothing usable."""


@dataclass(frozen=True)
class Blob:
    """A file on disk with its digest and size."""

    path: Path
    digest: str
    size: int

    def descriptor(self, media_type: str, annotations: dict[str, str] | None = None) -> dict[str, Any]:
        """The OCI descriptor for this blob."""
        desc: dict[str, Any] = {"mediaType": media_type, "digest": self.digest, "size": self.size}
        if annotations:
            desc["annotations"] = annotations
        return desc


class _HashingWriter:
    """File-like sink that hashes and counts what passes through to ``target``."""

    def __init__(self, target: Any) -> None:
        self.target = target
        self.hasher = hashlib.sha256()
        self.size = 0

    def write(self, data: bytes) -> int:
        self.hasher.update(data)
        self.size += len(data)
        written: int = self.target.write(data)
        return written

    def flush(self) -> None:
        self.target.flush()


def select_files(source: Path, names: Iterable[str]) -> list[Path]:
    """The files to push: ``names`` (relative to ``source``), or every top-level regular file except
    hidden ones and the trainer's marker files (they signal the pusher; they are not adapter content)."""
    if not source.is_dir():
        raise ArtifactError(f"{source} is not a directory")
    wanted = list(names)
    if wanted:
        files = []
        for name in wanted:
            rel = PurePosixPath(name)
            if rel.is_absolute() or ".." in rel.parts or len(rel.parts) != 1:
                raise ArtifactError(f"--file {name!r} must be a file name inside {source}")
            path = source / name
            if not path.is_file():
                present = sorted(p.name for p in source.iterdir())
                raise ArtifactError(
                    f"{path} does not exist (the directory holds: {', '.join(present) or 'nothing'})"
                )
            files.append(path)
        return files
    files = sorted(
        p
        for p in source.iterdir()
        if p.is_file() and not p.is_symlink() and not p.name.startswith(".") and p.name not in CONTROL_FILES
    )
    if not files:
        raise ArtifactError(f"{source} holds no files to push")
    return files


def build_layer(files: list[Path], workdir: Path) -> tuple[Blob, str]:
    """Write the tar+gzip layer (``data/<name>``, mtime 0, root-owned, sorted) -> (blob, diff_id).

    Deterministic so that pushing the same files twice gives the same digests.
    """
    layer_path = workdir / "layer.tar.gz"
    with layer_path.open("wb") as raw:
        compressed = _HashingWriter(raw)
        with gzip.GzipFile(filename="", mode="wb", fileobj=compressed, mtime=0) as gz:
            uncompressed = _HashingWriter(gz)
            with tarfile.open(fileobj=uncompressed, mode="w|", format=tarfile.PAX_FORMAT) as tar:  # type: ignore[call-overload]
                tar.addfile(_tarinfo(DATA_PREFIX + "/", tarfile.DIRTYPE, 0, 0o755))
                for path in sorted(files, key=lambda p: p.name):
                    info = _tarinfo(f"{DATA_PREFIX}/{path.name}", tarfile.REGTYPE, path.stat().st_size, 0o644)
                    with path.open("rb") as handle:
                        tar.addfile(info, handle)
    blob = Blob(layer_path, "sha256:" + compressed.hasher.hexdigest(), compressed.size)
    return blob, "sha256:" + uncompressed.hasher.hexdigest()


def _tarinfo(name: str, kind: bytes, size: int, mode: int) -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.type = kind
    info.size = size
    info.mode = mode
    info.mtime = 0
    info.uid = info.gid = 0
    info.uname = info.gname = ""
    return info


def _bytes_blob(data: bytes, path: Path) -> Blob:
    path.write_bytes(data)
    return Blob(path, "sha256:" + hashlib.sha256(data).hexdigest(), len(data))


def push_directory(
    client: RegistryClient,
    source: Path,
    *,
    files: Iterable[str] = (),
    annotations: dict[str, str] | None = None,
) -> str:
    """Push the selected files of ``source`` as an adapter artifact to ``client.ref``; return the
    manifest digest."""
    ref = client.ref
    if ref.digest:
        raise ArtifactError(f"push needs a tag, not a digest: {ref}")
    chosen = select_files(source, files)
    with tempfile.TemporaryDirectory(prefix="kaito-oci-") as tmp:
        workdir = Path(tmp)
        layer, diff_id = build_layer(chosen, workdir)
        config = {
            "architecture": "amd64",
            "os": "linux",
            "config": {},
            "rootfs": {"type": "layers", "diff_ids": [diff_id]},
        }
        config_blob = _bytes_blob(_canonical(config), workdir / "config.json")
        manifest: dict[str, Any] = {
            "schemaVersion": 2,
            "mediaType": OCI_MANIFEST,
            "artifactType": ARTIFACT_TYPE,
            "config": config_blob.descriptor(OCI_CONFIG),
            "layers": [layer.descriptor(OCI_LAYER_TGZ)],
        }
        if annotations:
            manifest["annotations"] = dict(sorted(annotations.items()))
        for blob in (layer, config_blob):
            client.upload_blob(blob.path, blob.digest, blob.size)
        digest = client.put_manifest(_canonical(manifest), OCI_MANIFEST, ref.tag or "latest")
    log.info("pushed %d file(s) from %s to %s (%s)", len(chosen), source, ref, digest)
    return digest


def _canonical(obj: Any) -> bytes:
    return json.dumps(obj, sort_keys=True, separators=(",", ":")).encode()


def _resolve_manifest(client: RegistryClient) -> dict[str, Any]:
    body, media_type = client.get_manifest(client.ref.target, MANIFEST_ACCEPT)
    manifest = _json(body, "manifest")
    media_type = str(manifest.get("mediaType") or media_type)
    if media_type in (OCI_INDEX, DOCKER_LIST):
        entry = _pick_platform(manifest.get("manifests") or [])
        body, media_type = client.get_manifest(str(entry["digest"]), MANIFEST_ACCEPT)
        manifest = _json(body, "manifest")
    if not isinstance(manifest.get("layers"), list):
        raise ArtifactError(f"{client.ref}: manifest ({media_type or 'unknown type'}) lists no layers")
    return manifest


def _json(body: bytes, what: str) -> dict[str, Any]:
    try:
        data = json.loads(body.decode("utf-8"))
    except (UnicodeDecodeError, ValueError):
        raise ArtifactError(f"the registry returned a {what} that is not JSON") from None
    if not isinstance(data, dict):
        raise ArtifactError(f"the registry returned a {what} that is not a JSON object")
    return data


def _pick_platform(entries: list[Any]) -> dict[str, Any]:
    machine = {"x86_64": "amd64", "aarch64": "arm64", "arm64": "arm64"}.get(
        platform.machine().lower(), "amd64"
    )
    candidates = [e for e in entries if isinstance(e, dict) and "digest" in e]
    for arch in (machine, "amd64"):
        for entry in candidates:
            plat = entry.get("platform") or {}
            if plat.get("os", "linux") == "linux" and plat.get("architecture") == arch:
                return entry
    if candidates:
        return candidates[0]
    raise ArtifactError("the image index lists no manifests")


def pull_to_directory(client: RegistryClient, dest: Path) -> list[str]:
    """Pull ``client.ref`` and make ``dest`` hold exactly the artifact's ``/data`` files; return their
    names. Files are assembled in a hidden staging directory inside ``dest`` (same volume; ``dest`` may
    be a mount point) and swapped in only when complete, so a failed or repeated pull never leaves a
    half-written or mixed adapter behind."""
    manifest = _resolve_manifest(client)
    dest.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=".kaito-oci-pull-", dir=dest) as tmp:
        staging, blobs = Path(tmp) / "data", Path(tmp) / "blobs"
        staging.mkdir()
        blobs.mkdir()
        for index, layer in enumerate(manifest["layers"]):
            _apply_layer(client, index, layer, blobs, staging)
        names = sorted(str(p.relative_to(staging)) for p in staging.rglob("*") if p.is_file())
        if not names:
            raise ArtifactError(f"{client.ref} holds no files under /{DATA_PREFIX}")
        for child in dest.iterdir():
            if child != Path(tmp):
                _remove(child)
        for child in staging.iterdir():
            child.rename(dest / child.name)
    log.info("pulled %s into %s: %s", client.ref, dest, ", ".join(names))
    return names


def _apply_layer(client: RegistryClient, index: int, layer: Any, blobs: Path, staging: Path) -> None:
    if not isinstance(layer, dict) or "digest" not in layer:
        raise ArtifactError(f"{client.ref}: layer {index} has no digest")
    blob_path = blobs / f"layer-{index}"
    client.download_blob(str(layer["digest"]), blob_path)
    media_type = str(layer.get("mediaType", ""))
    title = (layer.get("annotations") or {}).get(TITLE)
    if media_type in _TAR_TYPES or media_type.endswith((".tar", ".tar+gzip")):
        _apply_tar_layer(blob_path, staging)
    elif title:
        name = _safe_relative(str(title))
        if name is None:
            raise ArtifactError(f"{client.ref}: layer title {title!r} is not a safe file name")
        target = staging / name
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.move(str(blob_path), target)
    else:
        raise ArtifactError(f"{client.ref}: layer {index} has unsupported media type {media_type!r}")
    blob_path.unlink(missing_ok=True)


def _safe_relative(name: str) -> PurePosixPath | None:
    path = PurePosixPath(name)
    if path.is_absolute() or not path.parts or any(part in ("..", "") for part in path.parts):
        return None
    return path


def _data_relative(member: str) -> PurePosixPath | None:
    """``data/x`` / ``./data/x`` -> ``x``; anything outside ``data/`` -> None."""
    parts = [p for p in PurePosixPath(member).parts if p not in (".", "/")]
    if len(parts) < 2 or parts[0] != DATA_PREFIX:
        return None
    return _safe_relative("/".join(parts[1:]))


def _apply_tar_layer(blob: Path, dest: Path) -> None:
    """Extract the layer's ``data/`` regular files into ``dest`` (links and devices skipped, no path
    may escape ``dest``), honouring OCI whiteouts as a later image layer would."""
    with tarfile.open(blob, mode="r:*") as tar:
        for member in tar:
            rel = _data_relative(member.name)
            if rel is None:
                continue
            base = rel.name
            if base == _OPAQUE:
                parent = dest / rel.parent
                if parent.is_dir():
                    for child in parent.iterdir():
                        _remove(child)
                continue
            if base.startswith(_WHITEOUT):
                _remove(dest / rel.parent / base[len(_WHITEOUT) :])
                continue
            target = dest / rel
            if member.isdir():
                target.mkdir(parents=True, exist_ok=True)
            elif member.isreg():
                target.parent.mkdir(parents=True, exist_ok=True)
                source = tar.extractfile(member)
                if source is None:
                    raise RegistryError(f"cannot read {member.name} from layer")
                _remove(target)
                with source, target.open("wb") as out:
                    shutil.copyfileobj(source, out)
                os.chmod(target, 0o644)
            else:
                log.warning("skipping %s in the artifact: not a regular file", member.name)


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    else:
        path.unlink(missing_ok=True)
