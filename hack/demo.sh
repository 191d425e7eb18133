#!/usr/bin/env bash
# The main job, run by `make demo` inside `hack/localcluster.py run --profile full` (KUBECONFIG is set and
# the cluster's own kubectl is first on PATH). Until the controllers land it installs the CRDs, adds a
# kwok GPU node the way the gpu-provisioner's kwok cloud will, and shows the cluster.
set -euo pipefail
cd "$(dirname "$0")/.."

echo "== kube-apiserver $(kubectl version -o json | python3 -c 'import json,sys; print(json.load(sys.stdin)["serverVersion"]["gitVersion"])')"
if compgen -G "config/crd/*.yaml" >/dev/null; then
  echo "== installing CRDs from config/crd/"
  kubectl apply --server-side -f config/crd/
  kubectl wait --for condition=Established --timeout=30s -f config/crd/
fi

echo "== adding a fake Standard_NC6s_v3 GPU node (kwok)"
kubectl apply -f - <<'YAML'
apiVersion: v1
kind: Node
metadata:
  name: aks-ws-phi3-00000000-vmss000000
  annotations:
    kwok.x-k8s.io/node: fake
  labels:
    kubernetes.io/hostname: aks-ws-phi3-00000000-vmss000000
    kubernetes.io/os: linux
    node.kubernetes.io/instance-type: Standard_NC6s_v3
    apps: phi-3
    kaito.sh/machine-type: gpu
spec:
  taints:
  - key: sku
    value: gpu
    effect: NoSchedule
status:
  capacity: {cpu: "6", memory: 112Gi, pods: "110", nvidia.com/gpu: "1"}
  allocatable: {cpu: "6", memory: 112Gi, pods: "110", nvidia.com/gpu: "1"}
YAML
kubectl wait --for condition=Ready --timeout=30s node/aks-ws-phi3-00000000-vmss000000
kubectl get nodes -L node.kubernetes.io/instance-type
