"""A preset that spans several nodes, end to end: two Machines -> two kwok GPU nodes -> a StatefulSet of two
torchrun ranks behind a headless Service -> WorkspaceReady; deletion leaves nothing behind.

What a user writes: llama-2-13b-chat (2 GPUs, 30Gi in all, distributed inference) on Standard_NC6s_v3
(one 16Gi V100 per node), so the model needs ``count: 2`` -- one node is refused at admission.

The launch line is checked the way the pod would run it: ``/bin/sh -c`` evaluates it with the pod's
``HOSTNAME`` (a StatefulSet pod's hostname is its name), with ``cd`` and ``torchrun`` as shell functions
that print what they receive, so the node rank is the one each pod really computes. The arguments are
then read by torchrun's own parser when the runtime venv (``.venv-runtime``, with torch) is there.

A second test changes the adapters, then ``preferredNodes``, of a running two-node workspace: each change
rolls the StatefulSet to a new revision and both ranks come back Ready on the selected nodes.
"""

from __future__ import annotations

import json
import subprocess
from typing import Any

import pytest
import yaml

from test.e2e.workspace.conftest import NODE_APIS, REPO, Operator
from test.e2e.workspace.test_inference_e2e import conditions, kget, machines_of, request_name, wait_condition
from test.waiting import eventually

NAME = "workspace-llama-2-13b-chat"
PRESET = "llama-2-13b-chat"
SKU = "Standard_NC6s_v3"
IMAGE = "registry.invalid/llama/kaito-llama-2-13b-chat:0.0.4"
TORCH_PORT = 29500

# The flags upstream's llama-2 server (inference_api.py in the llama-2 image the user builds, which the
# preset's torchrun line starts) defines; it parses its command line strictly, so any other flag exits 2.
LLAMA2_SERVER_FLAGS = {"ckpt_dir", "tokenizer_path", "max_seq_len", "max_batch_size", "model_parallel_size"}

RUNTIME_PYTHON = REPO / ".venv-runtime" / "bin" / "python"


def workspace_manifest(count: int, **resource: Any) -> dict[str, Any]:
    """The Workspace a user applies for llama-2-13b-chat on ``count`` NC6s_v3 nodes."""
    return {
        "apiVersion": "kaito.sh/v1alpha1",
        "kind": "Workspace",
        "metadata": {"name": NAME},
        "resource": {
            "count": count,
            "instanceType": SKU,
            "labelSelector": {"matchLabels": {"apps": PRESET}},
            **resource,
        },
        "inference": {
            "preset": {"name": PRESET, "accessMode": "private", "presetOptions": {"image": IMAGE}},
        },
    }


def apply(op: Operator, doc: dict[str, Any], check: bool = True) -> subprocess.CompletedProcess[str]:
    out: subprocess.CompletedProcess[str] = op.cluster.kubectl(
        "apply", "-n", op.namespace, "-f", "-", input=yaml.safe_dump(doc), check=check
    )
    return out


def shell_argv(command: list[str], hostname: str) -> list[str]:
    """What ``torchrun`` receives when the pod named ``hostname`` runs ``command`` (``/bin/sh -c LINE``).

    ``cd`` and ``torchrun`` are shadowed by shell functions (a function wins over a regular builtin), so
    everything else -- the ``$(...)`` substitutions, the quoting -- is the real shell's doing.
    """
    assert command[:2] == ["/bin/sh", "-c"] and len(command) == 3, command
    line = command[2]
    assert " && torchrun " in line, line
    prelude = "cd() { :; }; torchrun() { printf '%s\\n' \"$@\"; }; "
    out = subprocess.run(
        ["/bin/sh", "-c", prelude + line],
        env={"HOSTNAME": hostname, "PATH": "/usr/bin:/bin"},
        capture_output=True,
        text=True,
        check=True,
        timeout=10,
    )
    return out.stdout.splitlines()


def flags(args: list[str]) -> dict[str, str]:
    """``--key=value`` / bare ``--key`` -> ``{key: value}`` (bare flags map to "")."""
    out: dict[str, str] = {}
    for a in args:
        assert a.startswith("--"), f"unexpected positional argument {a!r} in {args}"
        key, _, value = a[2:].partition("=")
        out[key] = value
    return out


def torchrun_parse(argv: list[str]) -> dict[str, Any]:
    """torchrun's own parser (``torch.distributed.run``) over ``argv``, run in the runtime venv."""
    code = (
        "import json, sys\n"
        "from torch.distributed.run import parse_args\n"
        "a = parse_args(sys.argv[1:])\n"
        "print(json.dumps({k: v for k, v in vars(a).items() if isinstance(v, (str, int, list, type(None)))}))\n"
    )
    out = subprocess.run(
        [str(RUNTIME_PYTHON), "-c", code, *argv], capture_output=True, text=True, check=True, timeout=120
    )
    parsed: dict[str, Any] = json.loads(out.stdout.strip().splitlines()[-1])
    return parsed


@pytest.mark.parametrize("node_api", NODE_APIS)
async def test_distributed_preset_runs_as_statefulset_on_two_nodes(operator: Operator) -> None:
    """llama-2-13b-chat on 2 x NC6s_v3: Machines, nodes, StatefulSet + headless Service, ranks, cleanup."""
    op = operator
    ns = op.namespace

    # One 16Gi V100 cannot hold a 2-GPU, 30Gi model: the webhook says so and nothing is created.
    refused = apply(op, workspace_manifest(1), check=False)
    assert refused.returncode != 0
    assert "insufficient number of GPUs" in refused.stderr and PRESET in refused.stderr, refused.stderr
    assert kget(op, "workspace", NAME, "-n", ns) is None

    apply(op, workspace_manifest(2))
    ws = await wait_condition(op, NAME, "WorkspaceReady", "True", timeout=120)
    assert conditions(ws) == {
        "ResourceReady": "True",
        f"{op.request_kind}Ready": "True",
        "InferenceReady": "True",
        "WorkspaceSucceeded": "True",
        "WorkspaceReady": "True",
    }
    assert ws["status"]["state"] == "Ready"

    # Two Machines (deterministic names, slots 0 and 1), each linked to its own kwok GPU node.
    machines = sorted(machines_of(op, NAME), key=lambda m: str(m["metadata"]["name"]))
    assert [m["metadata"]["name"] for m in machines] == sorted(request_name(op, NAME, s) for s in (0, 1))
    machine_nodes = [m["status"]["nodeName"] for m in machines]
    assert len(set(machine_nodes)) == 2
    workers = ws["status"]["workerNodes"]
    assert sorted(workers) == sorted(machine_nodes)
    for node_name in workers:
        node = kget(op, "node", node_name)
        assert node["metadata"]["labels"]["apps"] == PRESET
        assert node["metadata"]["labels"]["node.kubernetes.io/instance-type"] == SKU
        assert node["status"]["allocatable"]["nvidia.com/gpu"] == "1"

    # A StatefulSet, not a Deployment.
    assert kget(op, "deployment", NAME, "-n", ns) is None
    sts = kget(op, "statefulset", NAME, "-n", ns)
    assert sts["metadata"]["ownerReferences"][0]["kind"] == "Workspace"
    spec = sts["spec"]
    assert spec["replicas"] == 2
    assert spec["podManagementPolicy"] == "Parallel"
    assert spec["serviceName"] == f"{NAME}-headless"
    anti = spec["template"]["spec"]["affinity"]["podAntiAffinity"][
        "requiredDuringSchedulingIgnoredDuringExecution"
    ]
    assert anti == [
        {
            "labelSelector": {"matchLabels": {"kaito.sh/workspace": NAME}},
            "topologyKey": "kubernetes.io/hostname",
        }
    ]
    assert sts["status"]["readyReplicas"] == 2

    # The headless Service gives each rank a stable DNS name; the Service <ws> answers on 80 (and 29500)
    # and sends traffic to rank 0 only, the one that serves HTTP.
    headless = kget(op, "service", f"{NAME}-headless", "-n", ns)
    assert headless["spec"]["clusterIP"] == "None"
    assert [(p["port"], p["protocol"]) for p in headless["spec"]["ports"]] == [(TORCH_PORT, "TCP")]
    assert headless["spec"]["selector"] == {"kaito.sh/workspace": NAME}
    assert headless["spec"]["publishNotReadyAddresses"] is True
    svc = kget(op, "service", NAME, "-n", ns)
    assert svc["spec"]["type"] == "ClusterIP" and svc["spec"]["clusterIP"] not in ("", "None")
    assert svc["spec"]["selector"] == {
        "kaito.sh/workspace": NAME,
        "statefulset.kubernetes.io/pod-name": f"{NAME}-0",
    }
    table = op.cluster.kubectl("get", "svc", NAME, "-n", ns).stdout.splitlines()
    assert table[1].split()[4] == "80/TCP,29500/TCP"

    # One pod per worker node, named by ordinal, each requesting the SKU's one GPU.
    pods = kget(op, "pods", "-n", ns, "-l", f"kaito.sh/workspace={NAME}")["items"]
    pods.sort(key=lambda p: str(p["metadata"]["name"]))
    assert [p["metadata"]["name"] for p in pods] == [f"{NAME}-0", f"{NAME}-1"]
    assert sorted(p["spec"]["nodeName"] for p in pods) == sorted(workers)
    for p in pods:
        (container,) = p["spec"]["containers"]
        assert container["image"] == IMAGE
        assert container["resources"]["limits"] == {"nvidia.com/gpu": "1"}
        assert container["readinessProbe"]["httpGet"]["port"] == 5000
        assert {"name": "dshm", "mountPath": "/dev/shm"} in container["volumeMounts"]

    # The endpoints Kubernetes publishes agree: the headless Service has both ranks, <ws> only rank 0.
    async def endpoints() -> bool:
        def addresses(service: str) -> list[str]:
            out = kget(op, "endpointslices", "-n", ns, "-l", f"kubernetes.io/service-name={service}")
            return sorted(
                e["targetRef"]["name"]
                for s in (out or {}).get("items") or []
                for e in s.get("endpoints") or []
                if e.get("targetRef")
            )

        return addresses(f"{NAME}-headless") == [f"{NAME}-0", f"{NAME}-1"] and addresses(NAME) == [
            f"{NAME}-0"
        ]

    await eventually(endpoints, 30, "EndpointSlices: both ranks headless, rank 0 behind the Service")

    # The launch line, as each pod's shell runs it.
    pod0 = pods[0]
    master = f"{pod0['spec']['hostname']}.{pod0['spec']['subdomain']}.{ns}.svc.cluster.local"
    assert master == f"{NAME}-0.{NAME}-headless.{ns}.svc.cluster.local"
    launched: list[list[str]] = []
    for rank, p in enumerate(pods):
        (container,) = p["spec"]["containers"]
        assert p["spec"]["hostname"] == p["metadata"]["name"]  # what $HOSTNAME is in the container
        argv = shell_argv(container["command"], p["spec"]["hostname"])
        script = argv.index("inference_api.py")
        launcher, model = flags(argv[:script]), flags(argv[script + 1 :])
        assert launcher["nnodes"] == "2"
        assert launcher["node_rank"] == str(rank)
        assert launcher["nproc_per_node"] == "1"  # world size 2 over 2 nodes = the GPU each pod requests
        assert launcher["master_addr"] == master
        assert launcher["master_port"] == str(TORCH_PORT)
        assert launcher["rdzv_endpoint"] == f"{master}:{TORCH_PORT}"
        assert launcher["rdzv_backend"] == "c10d"
        assert set(model) <= LLAMA2_SERVER_FLAGS, (
            f"flags the llama-2 server rejects: {set(model) - LLAMA2_SERVER_FLAGS}"
        )
        assert model["max_seq_len"] == "512" and model["max_batch_size"] == "8"
        launched.append(argv)

    if RUNTIME_PYTHON.exists():
        for rank, argv in enumerate(launched):
            parsed = torchrun_parse(argv)
            assert parsed["nnodes"] == "2" and parsed["node_rank"] == rank
            assert parsed["nproc_per_node"] == "1"
            assert parsed["master_addr"] == master and parsed["master_port"] == TORCH_PORT
            assert parsed["rdzv_endpoint"] == f"{master}:{TORCH_PORT}"
            assert parsed["training_script"] == "inference_api.py"

    # Deletion: Machines, Nodes, the StatefulSet, both Services and the ConfigMap all go.
    op.cluster.kubectl("delete", "workspace", NAME, "-n", ns, "--wait=false")

    async def gone() -> bool:
        leftovers = [
            kget(op, "workspace", NAME, "-n", ns),
            kget(op, "statefulset", NAME, "-n", ns),
            kget(op, "service", NAME, "-n", ns),
            kget(op, "service", f"{NAME}-headless", "-n", ns),
            kget(op, "configmap", f"{NAME}-inference-params", "-n", ns),
            *(kget(op, "node", n) for n in workers),
        ]
        return all(x is None for x in leftovers) and not machines_of(op, NAME)

    await eventually(gone, 90, "the workspace, its Machines, Nodes, StatefulSet and Services to go")


def statefulset_rolled(sts: Any, old_hash: str) -> bool:
    """The StatefulSet carries a new spec hash and every replica runs (Ready) the new revision."""
    st = sts.get("status") or {}
    return bool(
        sts["metadata"]["annotations"]["kaito.sh/spec-hash"] != old_hash
        and st.get("observedGeneration") == sts["metadata"]["generation"]
        and st.get("updateRevision")
        and st.get("currentRevision") == st.get("updateRevision")
        and st.get("updatedReplicas") == 2
        and st.get("readyReplicas") == 2
    )


async def test_multinode_adapter_and_preferred_node_changes_roll_the_statefulset(operator: Operator) -> None:
    """Adding an adapter, then preferring an existing node, each rolls the StatefulSet to a new revision;
    both ranks come back Ready on the selected nodes and the workspace is Ready for the new generation."""
    op = operator
    ns = op.namespace
    apply(op, workspace_manifest(2))
    ws = await wait_condition(op, NAME, "WorkspaceReady", "True", timeout=120)
    first_workers = ws["status"]["workerNodes"]
    sts = kget(op, "statefulset", NAME, "-n", ns)
    assert "initContainers" not in sts["spec"]["template"]["spec"]

    async def settled(old_hash: str) -> Any:
        """(workspace, StatefulSet, its 2 pods of the new revision) once rolled out and Ready, else None."""
        ws = kget(op, "workspace", NAME, "-n", ns)
        sts = kget(op, "statefulset", NAME, "-n", ns)
        assert all(p.healthy() for p in op.procs), op.dump()
        if not (ws and sts and statefulset_rolled(sts, old_hash)):
            return None
        if ws["status"].get("observedGeneration") != ws["metadata"]["generation"]:
            return None
        if conditions(ws).get("WorkspaceReady") != "True":
            return None
        pods = kget(op, "pods", "-n", ns, "-l", f"kaito.sh/workspace={NAME}")["items"]
        revision = sts["status"]["updateRevision"]
        current = [
            p
            for p in pods
            if p["metadata"]["labels"].get("controller-revision-hash") == revision
            and not p["metadata"].get("deletionTimestamp")
        ]
        return (
            (ws, sts, sorted(current, key=lambda p: str(p["metadata"]["name"])))
            if len(current) == 2
            else None
        )

    # 1. An adapter: one pull init container and its strength in every rank.
    adapter = "llama-2-13b-chat-adapter"
    adapter_image = "registry.invalid/adapters/llama-2-13b-chat-adapter:0.0.1"
    patch: dict[str, Any] = {
        "inference": {"adapters": [{"source": {"name": adapter, "image": adapter_image}, "strength": "0.5"}]}
    }
    op.cluster.kubectl("patch", "workspace", NAME, "-n", ns, "--type=merge", "-p", json.dumps(patch))
    old_hash = sts["metadata"]["annotations"]["kaito.sh/spec-hash"]
    ws, sts, pods = await eventually(lambda: settled(old_hash), 90, "the adapter change to roll out")
    assert ws["status"]["workerNodes"] == first_workers  # same nodes: only the pod template changed
    for p in pods:
        (init,) = p["spec"]["initContainers"]
        assert init["name"] == adapter and init["command"][-2:] == [adapter_image, f"/mnt/adapter/{adapter}"]
        assert p["spec"]["containers"][0]["env"] == [{"name": adapter, "value": "0.5"}]
    assert sorted(p["spec"]["nodeName"] for p in pods) == sorted(first_workers)

    # 2. Prefer an existing node with the right labels: it replaces one of the Machine-made nodes. It has
    # room for both ranks (2 GPUs); they must still spread, one per selected node.
    byo = f"byo-{ns[-6:]}"
    op.cluster.create_kwok_node(
        byo,
        labels={"apps": PRESET, "node.kubernetes.io/instance-type": SKU},
        gpus=2,
        taints=[{"key": "sku", "value": "gpu", "effect": "NoSchedule"}],
    )
    try:
        patch = {"resource": {"preferredNodes": [byo]}}
        op.cluster.kubectl("patch", "workspace", NAME, "-n", ns, "--type=merge", "-p", json.dumps(patch))
        old_hash = sts["metadata"]["annotations"]["kaito.sh/spec-hash"]
        ws, sts, pods = await eventually(
            lambda: settled(old_hash), 90, "the preferred node change to roll out"
        )
        workers = ws["status"]["workerNodes"]
        assert byo in workers and len(workers) == 2
        assert len(set(workers) & set(first_workers)) == 1
        assert sorted(p["spec"]["nodeName"] for p in pods) == sorted(workers)
        hostnames = sts["spec"]["template"]["spec"]["affinity"]["nodeAffinity"][
            "requiredDuringSchedulingIgnoredDuringExecution"
        ]["nodeSelectorTerms"][0]["matchExpressions"][-1]
        assert hostnames == {"key": "kubernetes.io/hostname", "operator": "In", "values": sorted(workers)}
        for p in pods:  # the adapter stays
            assert p["spec"]["containers"][0]["env"] == [{"name": adapter, "value": "0.5"}]

        # The Machine whose node the preferred node replaced is released (no idle GPU node is left);
        # the one still serving (slot 0) stays, and the workspace stays Ready on the same two nodes.
        (released,) = set(first_workers) - set(workers)

        async def released_only_surplus() -> bool:
            ms = machines_of(op, NAME)
            return [m["metadata"]["name"] for m in ms] == [request_name(op, NAME, 0)] and (
                kget(op, "node", released) is None
            )

        await eventually(released_only_surplus, 60, "the surplus Machine and its node to go")
        (kept,) = machines_of(op, NAME)
        assert kept["status"]["nodeName"] in workers
        ws = kget(op, "workspace", NAME, "-n", ns)
        assert ws["status"]["workerNodes"] == workers and conditions(ws)["WorkspaceReady"] == "True"
        sts_now = kget(op, "statefulset", NAME, "-n", ns)
        assert sts_now["metadata"]["annotations"] == sts["metadata"]["annotations"]  # no further roll
    finally:
        op.cluster.kubectl("delete", "workspace", NAME, "-n", ns, "--wait=false", check=False)
        op.cluster.kubectl("delete", "node", byo, "--ignore-not-found", check=False)
