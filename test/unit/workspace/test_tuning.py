"""Tuning builders: the Job's shape (presets/tuning/README.md), the default ConfigMaps, Job -> outcome."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from kaito.api.workspace import Workspace
from kaito.presets.catalog import ENV_CATALOG_DIR, CatalogError
from kaito.presets.registry import PresetRegistry
from kaito.presets.skus import SkuCatalog
from kaito.workspace import manifests as mf
from kaito.workspace import status as st
from kaito.workspace import tuning as tn

REPO = Path(__file__).resolve().parents[3]
SAMPLES = REPO / "config" / "samples"
TEMPLATES = REPO / "presets" / "tuning" / "templates"
DOLLY = (
    "https://huggingface.co/datasets/philschmid/dolly-15k-oai-style/resolve/main/data/"
    "train-00000-of-00001-54e3756291ca09c6.parquet?download=true"
)


def workspace(tuning: dict[str, Any] | None = None, **meta: Any) -> Workspace:
    base = yaml.safe_load((SAMPLES / "kaito_workspace_tuning_phi_3.yaml").read_text())
    if tuning:
        base["tuning"] = {**base["tuning"], **tuning}
    base["metadata"] = {**base["metadata"], "namespace": "ns1", "uid": "uid-1", **meta}
    return Workspace.model_validate(base)


def job_for(ws: Workspace, registry: PresetRegistry, skus: SkuCatalog, **kw: Any) -> dict[str, Any]:
    assert ws.tuning is not None
    return tn.build_job(
        ws,
        registry.get(ws.tuning.preset.name),
        mf.ManifestOptions(registry="example.io/kaito"),
        sku=skus.get(ws.resource.instance_type),
        nodes=kw.pop("nodes", ["node-a"]),
        **kw,
    )


def test_seed_job_matches_readme(registry: PresetRegistry, skus: SkuCatalog) -> None:
    ws = workspace()
    job = job_for(ws, registry, skus)
    assert job["apiVersion"] == "batch/v1" and job["kind"] == "Job"
    meta = job["metadata"]
    assert meta["name"] == "workspace-phi-3-mini" and meta["namespace"] == "ns1"
    assert meta["labels"] == {"kaito.sh/workspace": "workspace-phi-3-mini"}
    ref = meta["ownerReferences"][0]
    assert ref["kind"] == "Workspace" and ref["uid"] == "uid-1" and ref["controller"] is True
    assert mf.ANNOTATION_SPEC_HASH in meta["annotations"]
    spec = job["spec"]
    assert spec["backoffLimit"] == 0
    assert spec["template"]["metadata"]["labels"] == {"kaito.sh/workspace": "workspace-phi-3-mini"}
    pod = spec["template"]["spec"]
    assert pod["restartPolicy"] == "Never"
    assert pod["imagePullSecrets"] == [{"name": "ACR_REGISTRY_SECRET_HERE"}]
    assert {"key": "sku", "operator": "Equal", "value": "gpu", "effect": "NoSchedule"} in pod["tolerations"]
    exprs = pod["affinity"]["nodeAffinity"]["requiredDuringSchedulingIgnoredDuringExecution"][
        "nodeSelectorTerms"
    ][0]["matchExpressions"]
    assert {"key": "app", "operator": "In", "values": ["phi-3-adapter"]} in exprs
    assert {"key": "kubernetes.io/hostname", "operator": "In", "values": ["node-a"]} in exprs

    init, check = pod["initContainers"]
    # Before the training: may the push secret push there? (fails in seconds, not after hours)
    assert check["name"] == "push-check" and check["image"] == init["image"]
    assert check["command"] == [
        "python3", "-m", "kaito_oci", "check-push", "--docker-config", "/tmp/.docker/config",
        "ACR_REPO_HERE.azurecr.io/IMAGE_NAME_HERE:0.0.1",
    ]  # fmt: skip
    assert check["volumeMounts"] == [
        {"name": "docker-config", "mountPath": "/tmp/.docker/config", "readOnly": True}
    ]
    assert init["name"] == "data-downloader"
    assert init["command"] == ["python3", "-m", "kaito_tuning.download", "--dest", "/mnt/data"]
    assert init["env"] == [{"name": "DATA_URLS", "value": DOLLY}]
    assert init["volumeMounts"] == [{"name": "data-volume", "mountPath": "/mnt/data"}]

    (main,) = pod["containers"]
    assert main["name"] == "workspace-phi-3-mini"
    assert main["image"] == init["image"] and main["image"].startswith("example.io/kaito/")
    assert main["workingDir"] == "/workspace/tfs"
    assert main["command"][:2] == ["/bin/sh", "-c"]
    script = main["command"][2]
    assert script.startswith("python3 /workspace/tfs/fine_tuning.py && python3 -m kaito_oci push ")
    assert "--docker-config /tmp/.docker/config" in script
    assert "--file adapter_config.json --file adapter_model.safetensors" in script
    assert "--annotation sh.kaito.model.name=phi-3-mini-4k-instruct" in script
    assert script.endswith("/mnt/results ACR_REPO_HERE.azurecr.io/IMAGE_NAME_HERE:0.0.1")
    assert {"name": "DEFAULT_TARGET_MODULES", "value": tn.PHI3_TARGET_MODULES} in main["env"]
    assert {"name": "PYTORCH_CUDA_ALLOC_CONF", "value": "expandable_segments:True"} in main["env"]
    gpus = str(skus.get("Standard_NC6s_v3").gpu_count)  # type: ignore[union-attr]
    assert main["resources"] == {"requests": {"nvidia.com/gpu": gpus}, "limits": {"nvidia.com/gpu": gpus}}
    assert main["terminationMessagePolicy"] == "FallbackToLogsOnError"
    assert main["volumeMounts"] == [
        {"name": "config-volume", "mountPath": "/mnt/config"},
        {"name": "data-volume", "mountPath": "/mnt/data"},
        {"name": "results-volume", "mountPath": "/mnt/results"},
        {"name": "docker-config", "mountPath": "/tmp/.docker/config", "readOnly": True},
    ]
    assert pod["volumes"] == [
        {"name": "config-volume", "configMap": {"name": "qlora-params-template"}},
        {"name": "data-volume", "emptyDir": {}},
        {"name": "results-volume", "emptyDir": {}},
        {
            "name": "docker-config",
            "secret": {
                "secretName": "ACR_REGISTRY_SECRET_HERE",
                "items": [{"key": ".dockerconfigjson", "path": "config.json"}],
                # A missing Secret must not hold the pod in ContainerCreating: the check reports it.
                "optional": True,
            },
        },
    ]


def test_image_input_uses_extractor_with_pull_secrets(registry: PresetRegistry, skus: SkuCatalog) -> None:
    ws = workspace({"input": {"image": "reg.io/data:1", "imagePullSecrets": ["in-a", "in-b"]}})
    pod = job_for(ws, registry, skus)["spec"]["template"]["spec"]
    init, _ = pod["initContainers"]
    assert init["name"] == "data-extractor"
    assert init["command"] == [
        "python3",
        "-m",
        "kaito_oci",
        "pull",
        "--docker-config",
        "/tmp/.docker/input-0",
        "--docker-config",
        "/tmp/.docker/input-1",
        "reg.io/data:1",
        "/mnt/data",
    ]
    names = [v["name"] for v in pod["volumes"]]
    assert names[-2:] == ["input-docker-config-0", "input-docker-config-1"]
    assert pod["volumes"][-1]["secret"]["secretName"] == "in-b"


def test_config_selection_and_defaults(registry: PresetRegistry, skus: SkuCatalog) -> None:
    qlora = workspace()
    assert tn.config_name(qlora) == "qlora-params-template"
    cm = tn.build_default_config(qlora)
    assert cm is not None
    assert cm["metadata"]["name"] == "qlora-params-template" and cm["metadata"]["namespace"] == "ns1"
    ref = cm["metadata"]["ownerReferences"][0]
    # Shared by every tuning workspace of the namespace: an owner, never the controller.
    assert ref["uid"] == "uid-1" and ref["controller"] is False and ref["blockOwnerDeletion"] is False
    assert cm["metadata"]["labels"] == {tn.LABEL_DEFAULT_TEMPLATE: "qlora"}
    parsed = yaml.safe_load(cm["data"]["training_config.yaml"])["training_config"]
    assert parsed["QuantizationConfig"]["load_in_4bit"] is True
    assert parsed["TrainingArguments"]["output_dir"] == "/mnt/results"

    lora = workspace({"method": "LoRA"})
    lcm = tn.build_default_config(lora)
    assert lcm is not None and lcm["metadata"]["name"] == "lora-params-template"
    lparsed = yaml.safe_load(lcm["data"]["training_config.yaml"])["training_config"]
    assert lparsed["QuantizationConfig"] == {"load_in_4bit": False}
    assert lparsed["LoraConfig"] == parsed["LoraConfig"]

    own = workspace({"config": "my-params"})
    assert tn.build_default_config(own) is None
    vol = job_for(own, registry, skus)["spec"]["template"]["spec"]["volumes"][0]
    assert vol == {"name": "config-volume", "configMap": {"name": "my-params"}}


def test_backoff_limit_annotation(registry: PresetRegistry, skus: SkuCatalog) -> None:
    ws = workspace(annotations={tn.ANNOTATION_BACKOFF_LIMIT: "2"})
    assert job_for(ws, registry, skus)["spec"]["backoffLimit"] == 2
    bad = workspace(annotations={tn.ANNOTATION_BACKOFF_LIMIT: "-1"})
    with pytest.raises(mf.ManifestError) as err:
        job_for(bad, registry, skus)
    assert err.value.reason == "InvalidAnnotation"


def test_multi_gpu_uses_accelerate(registry: PresetRegistry) -> None:
    ws = workspace()
    cmd = tn.trainer_command(ws, "phi-3-mini-4k-instruct", 4)
    assert cmd[2].startswith("accelerate launch --num_processes=4 /workspace/tfs/fine_tuning.py && ")


def test_job_outcome() -> None:
    running = {"metadata": {"name": "j"}, "status": {"active": 1}}
    assert tn.job_outcome(running).phase == st.Phase.PENDING
    done = {"metadata": {"name": "j"}, "status": {"conditions": [{"type": "Complete", "status": "True"}]}}
    assert tn.job_outcome(done).phase == st.Phase.READY
    failed = {
        "metadata": {"name": "j"},
        "status": {
            "conditions": [
                {"type": "Failed", "status": "True", "reason": "BackoffLimitExceeded", "message": "limit"}
            ]
        },
    }
    pod = {
        "metadata": {"name": "j-abc"},
        "status": {
            "containerStatuses": [
                {
                    "name": "j",
                    "state": {"terminated": {"exitCode": 3, "message": "error: dataset: no files"}},
                }
            ]
        },
    }
    out = tn.job_outcome(failed, [pod])
    assert out.phase == st.Phase.FAILED
    assert out.reason == "BackoffLimitExceeded"
    assert "limit" in out.message and "container j exited 3: error: dataset: no files" in out.message


def test_credentials_in_a_termination_message_reach_neither_status_nor_event() -> None:
    """A container (any image: the user's own, an older downloader) may print a signed URL or a token
    in its termination message; the Workspace status and the Event announcing it carry neither."""
    failed = {
        "metadata": {"name": "j"},
        "status": {"conditions": [{"type": "Failed", "status": "True", "reason": "BackoffLimitExceeded"}]},
    }
    pod = {
        "metadata": {"name": "j-abc"},
        "status": {
            "initContainerStatuses": [
                {
                    "name": "data-downloader",
                    "state": {
                        "terminated": {
                            "exitCode": 1,
                            "message": "GET https://bob:hunter2@blob.example/d.parquet?sv=1&sig=s1gn4ture "
                            "failed; Authorization: Bearer abc.def.ghi",
                        }
                    },
                }
            ]
        },
    }
    ready = st.StepOutcome(st.Phase.READY)
    running = st.Observation(generation=1, resource=ready, tuning_mode=True)
    obs = st.Observation(generation=1, resource=ready, tuning_mode=True, tuning=tn.job_outcome(failed, [pod]))
    before = st.desired_status(None, running)
    after = st.desired_status(before, obs)
    written = str(after) + str(st.summarise(st.transitions(before, after)))
    for secret in ("hunter2", "s1gn4ture", "abc.def.ghi"):
        assert secret not in written, written
    assert "https://[redacted]@blob.example/d.parquet?sv=1&sig=[redacted]" in written


def _failed_job_pod(
    container: str, exit_code: int, message: str, init: bool = True, reason: str = "Error"
) -> Any:
    key = "initContainerStatuses" if init else "containerStatuses"
    term = {"exitCode": exit_code, "reason": reason, "message": message}
    return {
        "metadata": {"name": "j-abc"},
        "status": {key: [{"name": container, "state": {"terminated": term}}]},
    }


@pytest.mark.parametrize(
    ("container", "code", "init", "kubelet_reason", "reason", "hint"),
    [
        ("push-check", 2, True, "Error", "PushSecretInvalid", "imagePushSecret push-secret"),
        ("push-check", 3, True, "Error", "PushRefused", "imagePushSecret push-secret"),
        ("push-check", 1, True, "Error", "RegistryUnreachable", ""),
        ("data-downloader", 1, True, "Error", "DatasetDownloadFailed", "check tuning.input"),
        ("data-extractor", 3, True, "Error", "DatasetDownloadFailed", "check tuning.input"),
        ("j", 137, False, "OOMKilled", "OOMKilled", ""),
        ("j", 1, False, "Error", "BackoffLimitExceeded", ""),  # training failed: the Job's reason
    ],
)
def test_job_failure_reason_names_the_step(
    container: str, code: int, init: bool, kubelet_reason: str, reason: str, hint: str
) -> None:
    """Each step's failure is a typed reason (status + Event), its program's words and what to check."""
    failed = {
        "metadata": {"name": "j"},
        "status": {"conditions": [{"type": "Failed", "status": "True", "reason": "BackoffLimitExceeded"}]},
    }
    out = tn.job_outcome(
        failed, [_failed_job_pod(container, code, "error: the words", init, kubelet_reason)], "push-secret"
    )
    assert out.phase == st.Phase.FAILED and out.reason == reason
    assert f"container {container} exited {code}: error: the words" in out.message
    assert hint in out.message


def _template_file(method: str) -> tuple[str, str]:
    doc = yaml.safe_load((TEMPLATES / f"{method}-params.yaml").read_text())
    return doc["metadata"]["name"], doc["data"]["training_config.yaml"]


def test_default_configmaps_are_the_files_under_presets_tuning_templates() -> None:
    """The controller's default ConfigMaps carry the files' text byte for byte (the runtime tests read them too)."""
    for method, ws in (("qlora", workspace()), ("lora", workspace({"method": "lora"}))):
        name, text = _template_file(method)
        cm = tn.build_default_config(ws)
        assert cm is not None
        assert cm["metadata"]["name"] == name == f"{method}-params-template"
        assert cm["data"] == {"training_config.yaml": text}
    # Upstream's chart files differ only in QuantizationConfig.
    lora = yaml.safe_load(_template_file("lora")[1])["training_config"]
    qlora = yaml.safe_load(_template_file("qlora")[1])["training_config"]
    assert {k: v for k, v in lora.items() if k != "QuantizationConfig"} == {
        k: v for k, v in qlora.items() if k != "QuantizationConfig"
    }


@pytest.fixture
def uncached_templates() -> Iterator[None]:
    tn.default_templates.cache_clear()
    yield
    tn.default_templates.cache_clear()


@pytest.mark.usefixtures("uncached_templates")
def test_malformed_template_file_is_a_catalog_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    for part in ("models", "skus"):
        (tmp_path / part).mkdir()
    monkeypatch.setenv(ENV_CATALOG_DIR, str(tmp_path))
    with pytest.raises(CatalogError, match=r"lora-params\.yaml"):
        tn.default_templates()
    directory = tmp_path / "tuning" / "templates"
    directory.mkdir(parents=True)
    for file in ("lora-params.yaml", "qlora-params.yaml"):
        (directory / file).write_text("apiVersion: v1\nkind: ConfigMap\nmetadata: {name: x}\ndata: {}\n")
    with pytest.raises(CatalogError, match=r"data\.training_config\.yaml"):
        tn.default_templates()


def _image_catalog_copies() -> list[tuple[str, str]]:
    """(source, path under the catalog) of the controller image's ``COPY presets/... $KAITO_CATALOG_DIR/...``."""
    text = (REPO / "Dockerfile.controller").read_text()
    (catalog,) = re.findall(r"KAITO_CATALOG_DIR=(\S+)", text)
    final = text[text.rindex("\nFROM ") :]
    copies = re.findall(r"^COPY (presets/\S+) (\S+)$", final, flags=re.M)
    return [(src, dest.removeprefix(catalog).strip("/")) for src, dest in copies if dest.startswith(catalog)]


def test_installed_package_finds_the_templates_where_the_image_puts_them(tmp_path: Path) -> None:
    """An installed ``kaito`` (no source checkout around it) reads the templates from the image's catalog.

    The wheel carries only the Python packages; Dockerfile.controller copies the catalogs, templates
    included, to $KAITO_CATALOG_DIR. This lays out a site-packages and a catalog the same way and runs
    the lookup in a fresh interpreter; without the catalog it must fail loudly, not find the checkout.
    """
    site = tmp_path / "site-packages"
    shutil.copytree(REPO / "kaito", site / "kaito", ignore=shutil.ignore_patterns("__pycache__"))
    catalog = tmp_path / "catalog"
    copies = _image_catalog_copies()
    assert ("presets/tuning/templates/", "tuning/templates") in copies, copies
    for src, dest in copies:
        shutil.copytree(REPO / src, catalog / dest)
    script = (
        "import json, kaito; from kaito.workspace import tuning as tn; "
        "print(json.dumps({'file': kaito.__file__, 'templates': tn.default_templates()}))"
    )
    env = {**os.environ, "PYTHONPATH": str(site), ENV_CATALOG_DIR: str(catalog)}

    def lookup(env: dict[str, str]) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-c", script],
            check=False,
            cwd=tmp_path,
            env=env,
            capture_output=True,
            text=True,
            timeout=60,
        )

    found = lookup(env)
    assert found.returncode == 0, found.stderr
    out = json.loads(found.stdout)
    assert Path(out["file"]).is_relative_to(site), out["file"]
    assert out["templates"] == {m: list(_template_file(m)) for m in ("lora", "qlora")}

    del env[ENV_CATALOG_DIR]
    missing = lookup(env)
    assert missing.returncode != 0 and "CatalogError" in missing.stderr, missing.stderr


def test_a_second_workspace_joins_the_owners_of_the_shared_default() -> None:
    first = workspace()
    cm = tn.build_default_config(first)
    assert cm is not None
    cm["metadata"]["resourceVersion"] = "42"
    assert tn.owner_patch(first, cm) is None  # already an owner

    second = workspace(uid="uid-2", name="tune-2")
    patch = tn.owner_patch(second, cm)
    assert patch is not None
    refs = patch["metadata"]["ownerReferences"]
    assert [r["uid"] for r in refs] == ["uid-1", "uid-2"]
    assert not any(r["controller"] for r in refs)
    assert patch["metadata"]["resourceVersion"] == "42"  # two joiners at once cannot drop each other

    # A ConfigMap made by an earlier version (controller-owned by its first workspace) is joined too.
    legacy = {
        "metadata": {
            "name": "qlora-params-template",
            "ownerReferences": [{"apiVersion": "kaito.sh/v1alpha1", "kind": "Workspace", "uid": "uid-0"}],
        }
    }
    joined = tn.owner_patch(second, legacy)
    assert joined is not None and [r["uid"] for r in joined["metadata"]["ownerReferences"]] == [
        "uid-0",
        "uid-2",
    ]
    # A user's ConfigMap of the same name is used as it is, never touched.
    assert tn.owner_patch(second, {"metadata": {"name": "qlora-params-template"}}) is None
