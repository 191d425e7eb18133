#!/usr/bin/env python3
"""The images the seed's CPU quick starts need on the real node, built locally and cached by content.

* **Tiny preset image** -- ``presets/Dockerfile`` (target ``model``) with the runtime tests' tiny random
  model baked in through ``WEIGHTS_PATH`` (``hack/tiny_model.py``; nothing comes from a model hub), plus
  one layer trusting the machine's test CA (:func:`test_ca`), so that the adapter puller and the tuning
  pusher in the pod verify the test registry's TLS certificate as they verify a cloud registry's.
* **curl image** -- ``hack/curl.Dockerfile``: the Debian base plus curl, for the seed's
  ``kubectl run ... curl --image=<it> -- curl -X POST http://$CLUSTERIP/chat ...``.

Built with ``hack/images.py`` (its buildah store, base images, content keys and lock): each image is
tagged by a hash of everything its build reads, and skipped when that tag exists. torch's CUDA wheels
(several GB) are downloaded once per machine into the Dockerfile's pip cache mount.

    python hack/seed_images.py tiny-preset curl      # prints NAME=REF lines (root: buildah needs it)
    python hack/seed_images.py --load mcr.microsoft.com/aks/kaito   # and into the running real node
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path

if __package__ in (None, ""):  # run as a script: make `hack` and `kaito` importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from hack import images as img

REPO = img.REPO_ROOT
TINY_MODEL = REPO / "hack" / "tiny_model.py"
TINY_IMAGE = f"{img.REGISTRY}/kaito-seed-tiny"
CURL_IMAGE = f"{img.REGISTRY}/kaito-curl"
CA_FILE_IN_IMAGE = "/usr/local/share/ca-certificates/kaito-seed-test-ca.crt"
TINY_PRESET = "tiny-llama"  # presets/models/tiny.yaml


# ------------------------------------------------------------------------------------------ test CA


@dataclass(frozen=True)
class TestCA:
    """The machine's test CA: signs the test registry's certificate; the tiny preset image trusts it."""

    cert: Path
    key: Path

    def issue(
        self, directory: Path, ip_addresses: Iterable[str], dns_names: Iterable[str] = ()
    ) -> tuple[Path, Path]:
        """A serving certificate for the given addresses in ``directory``: (cert path, key path)."""
        from kaito.webhook.certs import generate_serving_cert

        cert_pem, key_pem = generate_serving_cert(
            self.cert.read_bytes(), self.key.read_bytes(), list(dns_names), list(ip_addresses),
            valid_for=timedelta(days=2),
        )  # fmt: skip
        directory.mkdir(parents=True, exist_ok=True)
        cert, key = directory / "tls.crt", directory / "tls.key"
        cert.write_bytes(cert_pem)
        key.touch(mode=0o600)
        key.write_bytes(key_pem)
        return cert, key


def test_ca() -> TestCA:
    """The test CA under :func:`cache_dir` (made once; the image layer that trusts it is cached with it).

    Only test registries' certificates are signed with it, and only images built here trust it.
    """
    from kaito.webhook.certs import generate_ca

    directory = img.cache_root() / "seed-test-ca"
    ca = TestCA(directory / "ca.crt", directory / "ca.key")
    if ca.cert.exists() and ca.key.exists():
        return ca
    directory.mkdir(parents=True, exist_ok=True)
    cert_pem, key_pem = generate_ca("kaito-py seed test CA", timedelta(days=3650))
    tmp = Path(tempfile.mkdtemp(dir=directory))
    (tmp / "ca.key").touch(mode=0o600)
    (tmp / "ca.key").write_bytes(key_pem)
    (tmp / "ca.crt").write_bytes(cert_pem)
    # key first, cert last: a reader that sees the cert also sees its key (another process may race us).
    os.replace(tmp / "ca.key", ca.key)
    os.replace(tmp / "ca.crt", ca.cert)
    tmp.rmdir()
    return ca


# ----------------------------------------------------------------------------------------- images


def tiny_preset_image() -> str:
    """Build (or find) the tiny preset image; its ``localhost/kaito-py/kaito-seed-tiny:<key>`` reference.

    Its base stage is ``hack/images.py``'s ``presets-base`` (same Dockerfile, base image, build args and
    files, so buildah's layer cache shares the pip-install layer), and the weights are written by
    ``hack/tiny_model.py`` running in that image: the host needs no torch.
    """
    presets_base = img.build_recipe(img.RECIPES["presets-base"])
    base = img.pip_base_image()
    ca = test_ca()
    dockerfile = REPO / "presets" / "Dockerfile"
    args = {"PYTHON_IMAGE": base, "QLORA": "false", "WEIGHTS_PATH": "weights"}
    key = img._sha(
        [
            img.build_key(dockerfile, REPO, base, args, "model").encode(),
            presets_base.encode(),
            TINY_MODEL.read_bytes(),
            ca.cert.read_bytes(),
        ]
    )[:16]
    ref = f"{TINY_IMAGE}:{key}"
    if img.image_exists(ref):
        return ref
    t0 = time.monotonic()
    img._log(f"building {ref} (presets/Dockerfile --target model with the tiny random model)")
    model = f"{TINY_IMAGE}-model:{key}"
    with tempfile.TemporaryDirectory(prefix="kaito-seed-ctx-", dir=img.cache_root()) as tmp:
        ctx = Path(tmp)
        # A context of exactly what the Dockerfile COPYs, plus the weights (the repository's
        # .dockerignore leaves out test/ and hack/, and weights do not belong in the checkout).
        for f in img.context_files(REPO, img.copy_sources(dockerfile)):
            dst = ctx / f.relative_to(REPO)
            dst.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(f, dst)
        (ctx / "weights").mkdir()
        gen = img.buildah("from", "--pull=false", presets_base, capture=True).stdout.strip()
        try:
            img.buildah(
                "run", "--network", "none", "--user", "0",
                "--volume", f"{TINY_MODEL}:/opt/tiny_model.py:ro", "--volume", f"{ctx / 'weights'}:/out",
                gen, "--", "python3", "/opt/tiny_model.py", "/out",
            )  # fmt: skip
        finally:
            img.buildah("rm", gen, capture=True, check=False)
        argv = ["bud", "--network", "host", "--layers", "--pull=false", "--quiet"]
        argv += ["--volume", f"{img.CA_BUNDLE}:{img.CA_BUNDLE}:ro", "--target", "model"]
        for k, v in args.items():
            argv += ["--build-arg", f"{k}={v}"]
        img.buildah(*argv, "-f", str(dockerfile), "-t", model, str(ctx))
    # One more layer: the machine's test CA in the system trust store (what Python's ssl reads).
    c = img.buildah("from", "--pull=false", model, capture=True).stdout.strip()
    try:
        img.buildah("copy", "--quiet", "--chown", "0:0", c, str(ca.cert), CA_FILE_IN_IMAGE, capture=True)
        img.buildah(
            "run", "--network", "none", "--user", "0", c, "--", "update-ca-certificates", capture=True
        )
        img.buildah("commit", "--quiet", c, ref, capture=True)
    finally:
        img.buildah("rm", c, capture=True, check=False)
    img.buildah("rmi", model, capture=True, check=False)  # only the tag: its layers are ref's
    img._log(f"built {ref} in {time.monotonic() - t0:.0f}s")
    return ref


def curl_image() -> str:
    """Build (or find) the curl image; its ``localhost/kaito-py/kaito-curl:<key>`` reference."""
    base = img.base_image()
    dockerfile = REPO / "hack" / "curl.Dockerfile"
    args = {"BASE_IMAGE": base}
    ref = f"{CURL_IMAGE}:{img.build_key(dockerfile, REPO, base, args, None)}"
    if img.image_exists(ref):
        return ref
    t0 = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="kaito-curl-ctx-", dir=img.cache_root()) as tmp:
        argv = ["bud", "--network", "host", "--layers", "--pull=false", "--quiet"]
        argv += ["--volume", f"{img.CA_BUNDLE}:{img.CA_BUNDLE}:ro", "--build-arg", f"BASE_IMAGE={base}"]
        img.buildah(*argv, "-f", str(dockerfile), "-t", ref, tmp)
    img._log(f"built {ref} in {time.monotonic() - t0:.0f}s ({img.image_size(ref) >> 20} MiB)")
    return ref


def build(names: Iterable[str]) -> dict[str, str]:
    """Build (or find) ``tiny-preset`` and/or ``curl`` under hack/images.py's build lock; ``{name: ref}``."""
    makers = {"tiny-preset": tiny_preset_image, "curl": curl_image}
    refs: dict[str, str] = {}
    with img._locked(img.cache_root() / "containers" / ".build.lock"):
        for name in names:
            if name not in makers:
                raise img.ImageError(f"unknown image {name!r}; choose from {', '.join(makers)}")
            refs[name] = makers[name]()
    return refs


def load_into_real_node(refs: dict[str, str], preset_registry: str) -> dict[str, str]:
    """Import the built images into the running real node's containerd (hack/realnode.py); the tiny
    preset also under the name the controller gives it for ``preset_registry``. Returns the names pods use."""
    from hack import realnode
    from kaito.presets.registry import default_registry

    socket = realnode.state_dir() / "containerd" / "containerd.sock"
    if not socket.exists():
        raise img.ImageError(f"no real node runs here ({socket} is missing)")
    ctr = ["ctr", "--address", str(socket), "--namespace", "k8s.io", "images"]
    held = set(subprocess.run([*ctr, "ls", "-q"], capture_output=True, text=True, check=True).stdout.split())
    names = dict(refs)
    for name, ref in refs.items():
        if name == "tiny-preset":
            names[name] = default_registry().get(TINY_PRESET).image_ref(preset_registry)
        if ref not in held:  # containerd's store outlives the node: a content-tagged ref is there once
            t0 = time.monotonic()
            img.load(ref, str(socket))
            img._log(f"loaded {ref} into the real node in {time.monotonic() - t0:.0f}s")
        if names[name] != ref:
            subprocess.run([*ctr, "tag", "--force", ref, names[name]], capture_output=True, check=True)
    return names


def main(argv: list[str] | None = None) -> int:
    """CLI entry point: build the named images and print ``NAME=REF`` lines."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("names", nargs="*", default=["tiny-preset", "curl"])
    parser.add_argument(
        "--load",
        metavar="PRESET_REGISTRY",
        help="also import them into the running real node, the tiny preset under the name the controller "
        "gives it with --image-registry PRESET_REGISTRY (printed instead of the build ref)",
    )
    args = parser.parse_args(argv)
    refs = build(args.names)
    if args.load:
        refs = load_into_real_node(refs, args.load)
    for name, ref in refs.items():
        print(f"{name}={ref}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
