#!/usr/bin/env python3
"""The project's container images, built with no container registry: buildah over a Debian rootfs.

* a Python base image from Debian packages (``mmdebstrap`` with the host's apt sources; the rootfs
  tar is cached in ``~/.cache/kaito-py/rootfs``), and a variant without Debian's PEP 668 marker for
  ``presets/Dockerfile`` (which pip-installs system-wide, as on the ``python:*-slim`` images);
* the pause image, compiled from ``build/pause/linux/pause.c`` of the ``k8s.io/kubernetes`` module;
* ``Dockerfile.controller``, ``Dockerfile.provisioner`` and ``presets/Dockerfile --target base`` built
  against that base through their ``PYTHON_IMAGE`` build arg (their defaults stay what users build with).

Every image is tagged by a hash of what it is built from (the Dockerfile, the files its COPY lines
name minus ``.dockerignore``, its base and build args), so an unchanged tree rebuilds nothing: the
build is skipped when the tag exists. buildah keeps its store in ``~/.cache/kaito-py/containers``.
RUN steps use the host network (``--network host``, so netavark never makes bridges or chains) with
the host CA bundle mounted read-only (this machine's TLS to package registries is intercepted).

    python hack/images.py build [controller provisioner presets-base pause]   # prints NAME=REF lines
    python hack/images.py load --address SOCK REF[=ALIAS,...] ...             # into containerd (k8s.io)

Standard library only, like hack/localcluster.py. Needs root and hack/install-node-deps.sh.
"""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import fnmatch
import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

HACK_DIR = Path(__file__).resolve().parent
REPO_ROOT = HACK_DIR.parent
REGISTRY = "localhost/kaito-py"
CA_BUNDLE = "/etc/ssl/certs/ca-certificates.crt"
# Debian packages of the base image: python3 with venv and pip (the Dockerfiles run `python -m venv`
# and `pip --python`), `python` on PATH, and CA certificates.
BASE_PACKAGES = ("python3", "python3-venv", "python3-pip", "python-is-python3", "ca-certificates")
PEP668_MARKER_GLOB = "/usr/lib/python3*/EXTERNALLY-MANAGED"


class ImageError(RuntimeError):
    """An image could not be built or loaded."""


def cache_root() -> Path:
    """Where rootfs tars, the buildah store and locks live (shared with hack/build-binaries.sh)."""
    env = os.environ.get("KAITO_BIN_CACHE")
    if env:
        return Path(env)
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "kaito-py"


def _log(msg: str) -> None:
    print(f"[images] {msg}", file=sys.stderr, flush=True)


def _sha(parts: Iterable[bytes]) -> str:
    h = hashlib.sha256()
    for p in parts:
        h.update(len(p).to_bytes(8, "big"))
        h.update(p)
    return h.hexdigest()


@contextlib.contextmanager
def _locked(path: Path) -> Iterator[None]:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        yield


# --------------------------------------------------------------------------------------------------
# Content keys
# --------------------------------------------------------------------------------------------------


def dockerignore_patterns(context: Path) -> list[str]:
    """The context's .dockerignore patterns (comments and blanks dropped)."""
    try:
        lines = (context / ".dockerignore").read_text().splitlines()
    except OSError:
        return []
    return [ln.strip() for ln in lines if ln.strip() and not ln.strip().startswith("#")]


def ignored(rel: str, patterns: Sequence[str]) -> bool:
    """True when ``rel`` (a path relative to the context) is excluded by a .dockerignore pattern.

    Covers the forms the repository's file uses: ``name``, ``dir``, ``*.glob`` at the top and
    ``**/name`` at any depth; a match on a directory excludes everything below it.
    """
    parts = rel.split("/")
    for pat in patterns:
        if pat.startswith("**/"):
            if any(fnmatch.fnmatchcase(p, pat[3:]) for p in parts):
                return True
        elif any(fnmatch.fnmatchcase("/".join(parts[: i + 1]), pat.rstrip("/")) for i in range(len(parts))):
            return True
    return False


def copy_sources(dockerfile: Path) -> list[str]:
    """The context paths a Dockerfile's COPY/ADD lines read (``--from=`` stages and ARG paths excluded)."""
    text = re.sub(r"\\\n", " ", dockerfile.read_text())
    out: list[str] = []
    for line in text.splitlines():
        words = line.split()
        if not words or words[0].upper() not in ("COPY", "ADD"):
            continue
        args = [w for w in words[1:] if not w.startswith("--")]
        if any(w.startswith("--from=") for w in words[1:]):
            continue
        out += [a for a in args[:-1] if "$" not in a]
    return out


def context_files(context: Path, sources: Sequence[str]) -> list[Path]:
    """Every file under ``sources`` in the context that the build would see, sorted."""
    patterns = dockerignore_patterns(context)
    files: set[Path] = set()
    for src in sources:
        root = context / src
        cands = [root] if root.is_file() else [p for p in root.rglob("*") if p.is_file()]
        for p in cands:
            rel = p.relative_to(context).as_posix()
            if not ignored(rel, patterns):
                files.add(p)
    return sorted(files)


def build_key(
    dockerfile: Path, context: Path, base: str, build_args: dict[str, str], target: str | None
) -> str:
    """Hash of everything a Dockerfile build depends on; the image's tag."""
    files = context_files(context, copy_sources(dockerfile))
    parts = [dockerfile.read_bytes(), base.encode(), json.dumps(build_args, sort_keys=True).encode()]
    parts.append((target or "").encode())
    for f in files:
        parts += [f.relative_to(context).as_posix().encode(), f.read_bytes(), bytes([os.access(f, os.X_OK)])]
    return _sha(parts)[:16]


# --------------------------------------------------------------------------------------------------
# buildah
# --------------------------------------------------------------------------------------------------


def storage_env() -> dict[str, str]:
    """Environment that points buildah (containers/storage) at the cache's store, not /var/lib."""
    store = cache_root() / "containers"
    conf = store / "storage.conf"
    text = f'[storage]\ndriver = "overlay"\ngraphroot = "{store}/storage"\nrunroot = "{store}/run"\n'
    store.mkdir(parents=True, exist_ok=True)
    if not conf.exists() or conf.read_text() != text:
        conf.write_text(text)
    return {**os.environ, "CONTAINERS_STORAGE_CONF": str(conf)}


def buildah(*args: str, capture: bool = False, check: bool = True) -> subprocess.CompletedProcess[str]:
    """Run buildah against the cache's store."""
    proc = subprocess.run(
        ["buildah", *args],
        env=storage_env(),
        text=True,
        stdout=subprocess.PIPE if capture else sys.stderr,
        stderr=subprocess.PIPE if capture else None,
        check=False,
    )
    if check and proc.returncode != 0:
        raise ImageError(f"buildah {' '.join(args)} failed ({proc.returncode}): {proc.stderr or ''}")
    return proc


def image_exists(ref: str) -> bool:
    """True when the store holds an image under ``ref``."""
    return buildah("inspect", "--type", "image", ref, capture=True, check=False).returncode == 0


def image_size(ref: str) -> str:
    """The image's size as buildah reports it (e.g. ``345 MB``)."""
    out = buildah("images", "--json", ref, capture=True).stdout
    return str(json.loads(out)[0]["size"])


# --------------------------------------------------------------------------------------------------
# Base images
# --------------------------------------------------------------------------------------------------


def host_codename() -> str:
    """The host's Debian release; the base image uses the same one (and so the same apt sources)."""
    for line in Path("/etc/os-release").read_text().splitlines():
        if line.startswith("VERSION_CODENAME="):
            return line.split("=", 1)[1].strip('"')
    raise ImageError("no VERSION_CODENAME in /etc/os-release: not a Debian host")


def host_apt_sources() -> list[Path]:
    """The host's enabled apt source files (mmdebstrap reads .list and deb822 .sources files)."""
    d = Path("/etc/apt/sources.list.d")
    files = [Path("/etc/apt/sources.list"), *sorted(d.glob("*.list")), *sorted(d.glob("*.sources"))]
    return [f for f in files if f.is_file() and f.stat().st_size > 0]


def rootfs_tar() -> Path:
    """A minbase rootfs with python3 (mmdebstrap), cached by release, packages and apt sources."""
    sources = host_apt_sources()
    codename = host_codename()
    key = _sha([codename.encode(), " ".join(BASE_PACKAGES).encode(), *(s.read_bytes() for s in sources)])
    out = cache_root() / "rootfs" / f"{codename}-python-{key[:16]}.tar"
    if out.exists():
        return out
    with _locked(cache_root() / "rootfs" / ".lock"):
        if out.exists():
            return out
        t0 = time.monotonic()
        _log(f"mmdebstrap {codename} rootfs with {', '.join(BASE_PACKAGES)}")
        tmp = out.with_suffix(".tmp.tar")
        subprocess.run(
            [
                "mmdebstrap",
                "--quiet",
                "--variant=minbase",
                f"--include={','.join(BASE_PACKAGES)}",
                codename,
                str(tmp),
                *map(str, sources),
            ],
            check=True,
            stdout=sys.stderr,
        )
        tmp.rename(out)
        _log(f"rootfs {out.name} ({out.stat().st_size >> 20} MiB) in {time.monotonic() - t0:.0f}s")
    return out


def base_image() -> str:
    """``localhost/kaito-py/python:<release>-<key>`` from the cached rootfs."""
    tar = rootfs_tar()
    ref = f"{REGISTRY}/python:{tar.stem.split('-python-')[0]}-{tar.stem.rsplit('-', 1)[1]}"
    if image_exists(ref):
        return ref
    c = buildah("from", "scratch", capture=True).stdout.strip()
    try:
        buildah("add", "--quiet", c, str(tar), "/", capture=True)
        buildah(
            "config",
            "--env",
            "PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
            "--env",
            "LANG=C.UTF-8",
            "--cmd",
            '["python3"]',
            c,
        )
        buildah("commit", "--quiet", c, ref, capture=True)
    finally:
        buildah("rm", c, capture=True, check=False)
    return ref


def pip_base_image() -> str:
    """The base without Debian's PEP 668 marker: ``pip install`` may write system-wide, as on python:*-slim."""
    base = base_image()
    ref = f"{base}-pipok"
    if image_exists(ref):
        return ref
    c = buildah("from", "--pull=false", base, capture=True).stdout.strip()
    try:
        buildah("run", "--network", "none", c, "--", "sh", "-c", f"rm -f {PEP668_MARKER_GLOB}")
        buildah("commit", "--quiet", c, ref, capture=True)
    finally:
        buildah("rm", c, capture=True, check=False)
    return ref


def _k8s_version() -> str:
    for line in (HACK_DIR / "versions.env").read_text().splitlines():
        if line.startswith("K8S_VERSION="):
            return line.split("=", 1)[1].strip()
    raise ImageError("no K8S_VERSION in hack/versions.env")


def pause_image() -> str:
    """The sandbox image: pause.c from the pinned k8s.io/kubernetes module, static, FROM scratch."""
    version = _k8s_version()
    with tempfile.TemporaryDirectory() as tmp:
        info = subprocess.run(
            ["go", "mod", "download", "-json", f"k8s.io/kubernetes@{version}"],
            cwd=tmp,
            env={**os.environ, "GOFLAGS": "-mod=mod"},
            capture_output=True,
            text=True,
            check=True,
        )
        src = Path(json.loads(info.stdout)["Dir"]) / "build" / "pause" / "linux" / "pause.c"
        key = _sha([src.read_bytes(), version.encode()])[:16]
        ref = f"{REGISTRY}/pause:{key}"
        if image_exists(ref):
            return ref
        binary = Path(tmp) / "pause"
        subprocess.run(
            ["gcc", "-Os", "-static", f"-DVERSION={version}", "-o", str(binary), str(src)], check=True
        )
        subprocess.run(["strip", str(binary)], check=True)
        c = buildah("from", "scratch", capture=True).stdout.strip()
        try:
            buildah("copy", "--quiet", c, str(binary), "/pause", capture=True)
            buildah("config", "--entrypoint", '["/pause"]', "--user", "65535:65535", c)
            buildah("commit", "--quiet", c, ref, capture=True)
        finally:
            buildah("rm", c, capture=True, check=False)
    return ref


# --------------------------------------------------------------------------------------------------
# The project's Dockerfiles
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Recipe:
    """One of the repository's Dockerfiles and how the local build calls it."""

    name: str
    dockerfile: str
    pip_base: bool = False  # presets/Dockerfile pip-installs system-wide
    target: str | None = None
    build_args: tuple[tuple[str, str], ...] = ()


RECIPES = {
    "controller": Recipe("kaito-controller", "Dockerfile.controller"),
    "provisioner": Recipe("gpu-provisioner", "Dockerfile.provisioner"),
    # CPU-only here: bitsandbytes (QLoRA) needs a GPU.
    "presets-base": Recipe(
        "kaito-base", "presets/Dockerfile", pip_base=True, target="base", build_args=(("QLORA", "false"),)
    ),
}


def build_recipe(recipe: Recipe, context: Path = REPO_ROOT) -> str:
    """Build one Dockerfile against the local base (skipped when its content tag exists); its ref."""
    base = pip_base_image() if recipe.pip_base else base_image()
    args = {"PYTHON_IMAGE": base, **dict(recipe.build_args)}
    dockerfile = context / recipe.dockerfile
    ref = f"{REGISTRY}/{recipe.name}:{build_key(dockerfile, context, base, args, recipe.target)}"
    if image_exists(ref):
        return ref
    t0 = time.monotonic()
    _log(f"building {ref} from {recipe.dockerfile}")
    argv = ["bud", "--network", "host", "--layers", "--pull=false", "--quiet"]
    argv += ["--volume", f"{CA_BUNDLE}:{CA_BUNDLE}:ro"]
    for k, v in args.items():
        argv += ["--build-arg", f"{k}={v}"]
    if recipe.target:
        argv += ["--target", recipe.target]
    buildah(*argv, "-f", str(dockerfile), "-t", ref, str(context), capture=False)
    _log(f"built {ref} in {time.monotonic() - t0:.0f}s ({image_size(ref)})")
    return ref


def build(names: Sequence[str]) -> dict[str, str]:
    """Build (or find) the named images; ``{name: ref}``. Names: pause, base, pip-base, and RECIPES."""
    refs: dict[str, str] = {}
    with _locked(cache_root() / "containers" / ".build.lock"):
        for name in names:
            t0 = time.monotonic()
            if name == "pause":
                refs[name] = pause_image()
            elif name == "base":
                refs[name] = base_image()
            elif name == "pip-base":
                refs[name] = pip_base_image()
            elif name in RECIPES:
                refs[name] = build_recipe(RECIPES[name])
            else:
                raise ImageError(
                    f"unknown image {name!r}; choose from pause, base, pip-base, {', '.join(RECIPES)}"
                )
            _log(f"{name}: {refs[name]} ({time.monotonic() - t0:.1f}s)")
    return refs


# --------------------------------------------------------------------------------------------------
# Into containerd
# --------------------------------------------------------------------------------------------------


def load(ref: str, address: str, aliases: Sequence[str] = (), namespace: str = "k8s.io") -> None:
    """Copy an image from buildah's store into containerd (``docker-archive`` + ``ctr images import``).

    ``aliases`` are extra names for it there (e.g. the ``ghcr.io/...`` name a manifest uses), so the
    kubelet finds every image it is asked for and never goes to a registry.
    """
    ctr = ["ctr", "--address", address, "--namespace", namespace]
    with tempfile.TemporaryDirectory(dir=cache_root()) as tmp:
        archive = Path(tmp) / "image.tar"
        buildah("push", "--quiet", ref, f"docker-archive:{archive}:{ref}", capture=True)
        subprocess.run([*ctr, "images", "import", str(archive)], check=True, capture_output=True)
    for alias in aliases:
        subprocess.run([*ctr, "images", "tag", "--force", ref, alias], check=True, capture_output=True)


def main(argv: Sequence[str] | None = None) -> int:
    """CLI entry point."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    b = sub.add_parser("build", help="build (or find) images; prints NAME=REF per line")
    b.add_argument("names", nargs="*", default=["pause", "controller", "provisioner"])
    ld = sub.add_parser("load", help="copy images into containerd")
    ld.add_argument("--address", required=True, help="containerd socket")
    ld.add_argument("refs", nargs="+", help="REF or REF=ALIAS[,ALIAS]")
    args = p.parse_args(argv)
    if shutil.which("buildah") is None:
        raise SystemExit("buildah not found: run hack/install-node-deps.sh (as root)")
    if args.cmd == "build":
        for name, ref in build(args.names).items():
            print(f"{name}={ref}")
    else:
        for item in args.refs:
            ref, _, aliases = item.partition("=")
            load(ref, args.address, [a for a in aliases.split(",") if a])
    return 0


if __name__ == "__main__":
    sys.exit(main())
