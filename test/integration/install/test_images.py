"""The Dockerfiles agree with the manifests and the package (no docker engine here to build them).

What is checked: a pinned base, multi-stage, a non-root numeric USER equal to the pods' runAsUser,
entry points that are the package's console scripts, the catalogs the operator reads shipped and found
through KAITO_CATALOG_DIR, and the controller image's dependency set (the Azure SDK left out) covering
every third-party import of ``kaito/``.
"""

from __future__ import annotations

import ast
import re
import sys
import tomllib
from pathlib import Path

import pytest

from test.integration.install.helpers import REPO, pod_specs, render_kustomize

IMAGES = {"Dockerfile.controller": "kaito-workspace", "Dockerfile.provisioner": "gpu-provisioner"}


def instructions(path: Path) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with line continuations joined and comments dropped."""
    text = re.sub(r"\\\n", " ", path.read_text())
    out = []
    for raw in text.splitlines():
        line = raw.strip()
        if line and not line.startswith("#"):
            op, _, rest = line.partition(" ")
            out.append((op.upper(), rest.strip()))
    return out


@pytest.mark.parametrize("dockerfile", sorted(IMAGES))
def test_dockerfile_is_pinned_multistage_and_non_root(dockerfile: str) -> None:
    ins = instructions(REPO / dockerfile)
    args = dict(a.split("=", 1) for op, a in ins if op == "ARG" and "=" in a)
    base = args["PYTHON_IMAGE"]
    # An exact patch release (or a digest), never a floating tag.
    assert re.fullmatch(r"python:3\.11\.\d+-slim-[a-z]+(@sha256:[0-9a-f]{64})?", base), base
    froms = [a for op, a in ins if op == "FROM"]
    assert len(froms) >= 2 and all(f.startswith("${PYTHON_IMAGE}") for f in froms), froms
    final = ins[max(i for i, (op, _) in enumerate(ins) if op == "FROM") :]
    users = [a for op, a in final if op == "USER"]
    assert users and re.fullmatch(r"\d+:\d+", users[-1]), users
    uid, gid = (int(x) for x in users[-1].split(":"))
    assert uid != 0 and gid != 0
    spec = pod_specs(render_kustomize())[IMAGES[dockerfile]]
    assert (spec["securityContext"]["runAsUser"], spec["securityContext"]["runAsGroup"]) == (uid, gid)
    # No package manager runs in the final stage: it only copies the built venv and data.
    assert not [a for op, a in final if op == "RUN"], "the runtime stage must not RUN anything"
    env = " ".join(a for op, a in final if op == "ENV")
    assert "KAITO_CATALOG_DIR=/opt/kaito/catalog" in env and "PYTHONDONTWRITEBYTECODE=1" in env
    copies = [a for op, a in final if op == "COPY"]
    for part in ("models", "skus"):
        assert f"presets/{part}/ /opt/kaito/catalog/{part}/" in copies, copies


@pytest.mark.parametrize("dockerfile", sorted(IMAGES))
def test_entrypoint_is_the_console_script_the_manifest_runs(dockerfile: str) -> None:
    scripts = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["scripts"]
    ins = instructions(REPO / dockerfile)
    (entry,) = [a for op, a in ins if op == "ENTRYPOINT"]
    (script,) = re.findall(r'"([^"]+)"', entry)
    assert script in scripts, f"{script} is not a console script of the package"
    exposed = {int(p) for op, a in ins if op == "EXPOSE" for p in a.split()}
    container = pod_specs(render_kustomize())[IMAGES[dockerfile]]["containers"][0]
    assert {p["containerPort"] for p in container["ports"]} == exposed


def _third_party_imports(package: Path) -> set[str]:
    found: set[str] = set()
    for path in package.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                found |= {a.name.split(".")[0] for a in node.names}
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                found.add(node.module.split(".")[0])
    return {m for m in found if m not in sys.stdlib_module_names and m not in {"kaito", "provisioner"}}


def test_controller_image_dependencies_cover_kaito_imports() -> None:
    """Dockerfile.controller installs the package's dependencies minus azure-*: kaito must not need them."""
    deps = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["dependencies"]
    installed = {re.split(r"[<>=!~\[ ;]", d)[0].lower() for d in deps if not d.startswith("azure-")}
    # Import name -> distribution name, for the ones that differ.
    dist = {
        "yaml": "pyyaml",
        "kubernetes_asyncio": "kubernetes-asyncio",
        "prometheus_client": "prometheus-client",
    }
    imports = _third_party_imports(REPO / "kaito")
    assert "azure" not in imports, "kaito imports azure: Dockerfile.controller leaves the Azure SDK out"
    missing = {m for m in imports if dist.get(m, m).lower() not in installed}
    assert not missing, f"kaito imports {sorted(missing)}, which Dockerfile.controller does not install"
