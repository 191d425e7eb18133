#!/usr/bin/env bash
# The main job, run by `make demo` inside `hack/localcluster.py run --profile full` (KUBECONFIG is set and
# the cluster's own kubectl is first on PATH).
#
# Installs the CRDs, starts the workspace controller (with its admission webhook on https://127.0.0.1)
# and the gpu-provisioner (kwok cloud) as processes, applies the seed's phi-3 Workspace, waits until
# WORKSPACEREADY is True, shows what was created, deletes the workspace (its Machine and Node go too).
# Then, when the cluster has a real node (hack/realnode.py), the CPU path: the tiny-llama preset image
# built by presets/Dockerfile runs in a real container on that node (a CPU VM to the operator), and the
# seed's `kubectl run ... curl -X POST http://$CLUSTERIP/chat` is answered through the Service.
# Stops both processes at the end. Logs: $DEMO_LOG_DIR (default: a temp dir, removed after a success).
set -euo pipefail
cd "$(dirname "$0")/.."

PY=${PY:-.venv/bin/python}
[ -x "$PY" ] || PY=python3
LOG_DIR=${DEMO_LOG_DIR:-$(mktemp -d -t kaito-demo-XXXXXX)}
SAMPLE=config/samples/kaito_workspace_phi_3.yaml
WS=workspace-phi-3-mini
CPU_SAMPLE=config/samples/kaito_workspace_tiny_llama_cpu.yaml
CPU_WS=workspace-tiny-llama
PIDS=()

free_port() { "$PY" -c 'from hack.localcluster import free_port; print(free_port())'; }

cleanup() {
  local rc=$?
  kubectl delete validatingwebhookconfiguration validation.workspace.kaito.sh --ignore-not-found >/dev/null 2>&1 || true
  kubectl delete mutatingwebhookconfiguration mutation.workspace.kaito.sh --ignore-not-found >/dev/null 2>&1 || true
  for pid in "${PIDS[@]}"; do kill -TERM "$pid" 2>/dev/null || true; done
  for pid in "${PIDS[@]}"; do wait "$pid" 2>/dev/null || true; done
  if [ "$rc" -ne 0 ]; then
    echo "== demo failed (exit $rc); last controller and provisioner log lines:" >&2
    tail -n 20 "$LOG_DIR"/*.log >&2 || true
    echo "== logs in $LOG_DIR"
  elif [ -n "${DEMO_LOG_DIR:-}" ]; then
    echo "== logs in $LOG_DIR"
  else
    rm -rf "$LOG_DIR"  # a successful run leaves nothing behind; set DEMO_LOG_DIR to keep the logs
  fi
}
trap cleanup EXIT

wait_ready() {  # name port
  for _ in $(seq 1 300); do
    if "$PY" -c "import sys, urllib.request; urllib.request.urlopen('http://127.0.0.1:$2/readyz', timeout=1)" 2>/dev/null; then
      echo "   $1 ready"; return 0
    fi
    sleep 0.2
  done
  echo "$1 did not become ready" >&2; return 1
}

echo "== kube-apiserver $(kubectl version -o json | "$PY" -c 'import json,sys; print(json.load(sys.stdin)["serverVersion"]["gitVersion"])')"
echo "== installing CRDs from config/crd/"
kubectl apply --server-side -f config/crd/ >/dev/null
kubectl wait --for condition=Established --timeout=30s -f config/crd/ >/dev/null
kubectl create namespace kaito-system --dry-run=client -o yaml | kubectl apply -f - >/dev/null

WEBHOOK_PORT=$(free_port)
echo "== admission webhooks -> https://127.0.0.1:$WEBHOOK_PORT (served by the controller)"
for kind in validating mutating; do
  if [ $kind = validating ]; then KIND=ValidatingWebhookConfiguration; NAME=validation.workspace.kaito.sh; P=validate
  else KIND=MutatingWebhookConfiguration; NAME=mutation.workspace.kaito.sh; P=mutate; fi
  kubectl apply -f - >/dev/null <<YAML
apiVersion: admissionregistration.k8s.io/v1
kind: $KIND
metadata: {name: $NAME}
webhooks:
- name: $NAME
  clientConfig: {url: "https://127.0.0.1:$WEBHOOK_PORT/$P/workspace.kaito.sh"}
  rules: [{apiGroups: [kaito.sh], apiVersions: [v1alpha1, v1beta1], operations: [CREATE, UPDATE], resources: [workspaces]}]
  failurePolicy: Fail
  sideEffects: None
  admissionReviewVersions: [v1]
YAML
done

C_PROBE=$(free_port); C_METRICS=$(free_port); P_PROBE=$(free_port); P_METRICS=$(free_port)
echo "== starting kaito-controller (workspace controller) and gpu-provisioner (--cloud kwok)"
"$PY" -m kaito --kubeconfig "$KUBECONFIG" --provisioning machine \
  --health-probe-bind-address "127.0.0.1:$C_PROBE" --metrics-bind-address "127.0.0.1:$C_METRICS" \
  --webhook-port "$WEBHOOK_PORT" --webhook-host 127.0.0.1 --webhook-ip 127.0.0.1 --webhook-service "" \
  --log-format json >"$LOG_DIR/kaito-controller.log" 2>&1 &
PIDS+=($!)
"$PY" -m provisioner --cloud kwok --kubeconfig "$KUBECONFIG" --no-leader-elect --bind-address 127.0.0.1 \
  --probe-port "$P_PROBE" --metrics-port "$P_METRICS" --kwok-node-delay 2 \
  --log-format json >"$LOG_DIR/gpu-provisioner.log" 2>&1 &
PIDS+=($!)
wait_ready kaito-controller "$C_PROBE"
wait_ready gpu-provisioner "$P_PROBE"

echo "== kubectl apply -f $SAMPLE"
kubectl apply -f "$SAMPLE"
echo "== waiting for WorkspaceReady (Machine -> kwok GPU node -> Deployment -> pod Ready)"
kubectl wait --for=condition=WorkspaceReady --timeout=180s "workspace/$WS"
echo
echo "\$ kubectl get machines"
kubectl get machines
echo
echo "\$ kubectl get nodes -l apps=phi-3 -L node.kubernetes.io/instance-type"
kubectl get nodes -l apps=phi-3 -L node.kubernetes.io/instance-type
echo
echo "\$ kubectl get deployment,pods -l kaito.sh/workspace=$WS"
kubectl get deployment,pods -l "kaito.sh/workspace=$WS"
echo
echo "\$ kubectl get svc $WS"
kubectl get svc "$WS"
echo
echo "== deleting the workspace (its Machine and kwok Node are removed too)"
kubectl delete workspace "$WS" --timeout=120s
for _ in $(seq 1 300); do
  [ -z "$(kubectl get machines -l "kaito.sh/workspace=$WS" -o name)" ] && [ -z "$(kubectl get nodes -l apps=phi-3 -o name)" ] && break
  sleep 0.2
done
echo "   machines left: $(kubectl get machines -o name | wc -l), GPU nodes left: $(kubectl get nodes -l apps=phi-3 -o name | wc -l)"
echo
echo "== re-applying the sample to leave the result on screen"
kubectl apply -f "$SAMPLE" >/dev/null
kubectl wait --for=condition=WorkspaceReady --timeout=180s "workspace/$WS" >/dev/null
echo "\$ kubectl get workspace"
kubectl get workspace

# ---------------------------------------------------------------------------------------------------
# The CPU path on the real node
# ---------------------------------------------------------------------------------------------------
echo
# hack/realnode.py's node carries this label (and a taint of the same key).
REAL_NODE=$(kubectl get nodes -l kaito.sh/real-node=true -o jsonpath='{.items[0].metadata.name}' 2>/dev/null || true)
if [ -z "$REAL_NODE" ]; then
  echo "== no real node in this cluster: the CPU path (a real container answering the seed's curl) needs"
  echo "   root and hack/install-node-deps.sh; \`python hack/localcluster.py run --profile full --real-node -- bash hack/demo.sh\`"
  exit 0
fi
secs() { echo $(( $(date +%s) - $1 )); }
echo "== CPU path: node $REAL_NODE runs containers (containerd + kubelet + kube-proxy)"
t=$(date +%s)
echo "   building the tiny-llama preset image (presets/Dockerfile, a tiny random model, cached by content) and a"
echo "   curl image, and loading them into the node's containerd (the first run downloads torch: ~10 min)"
REGISTRY=$("$PY" -c 'from kaito.presets.registry import DEFAULT_REGISTRY; print(DEFAULT_REGISTRY)')
refs=$("$PY" hack/seed_images.py --load "$REGISTRY" tiny-preset curl)
CURL_IMAGE=$(sed -n 's/^curl=//p' <<<"$refs")
echo "   images ready in $(secs "$t")s: $(sed -n 's/^tiny-preset=//p' <<<"$refs"), $CURL_IMAGE"

# A user's CPU node pool: the instance type and the label the workspace selects. The real node is
# tainted so that no other pod lands on it; this namespace's pods tolerate it (PodTolerationRestriction).
kubectl label node "$REAL_NODE" --overwrite node.kubernetes.io/instance-type=Standard_D2s_v3 apps=tiny-llama >/dev/null
kubectl annotate namespace default --overwrite \
  'scheduler.alpha.kubernetes.io/defaultTolerations=[{"key":"kaito.sh/real-node","operator":"Equal","value":"true","effect":"NoSchedule"}]' >/dev/null
echo
echo "\$ kubectl apply -f $CPU_SAMPLE"
t=$(date +%s)
kubectl apply -f "$CPU_SAMPLE"
kubectl wait --for=condition=WorkspaceReady --timeout=600s "workspace/$CPU_WS" >/dev/null
echo "   WORKSPACEREADY after $(secs "$t")s (the model loaded in a real container; the readiness probe said so)"
echo "\$ kubectl get workspace $CPU_WS"
kubectl get workspace "$CPU_WS"
echo
echo "\$ kubectl get pods -o wide -l kaito.sh/workspace=$CPU_WS"
kubectl get pods -o wide -l "kaito.sh/workspace=$CPU_WS"
echo
echo "\$ kubectl get svc $CPU_WS"
kubectl get svc "$CPU_WS"
CLUSTERIP=$(kubectl get svc "$CPU_WS" -o jsonpath="{.spec.clusterIPs[0]}")
echo
echo "\$ export CLUSTERIP=\$(kubectl get svc $CPU_WS -o jsonpath=\"{.spec.clusterIPs[0]}\")"
echo "\$ kubectl run -i --rm --restart=Never curl --image=$CURL_IMAGE -- curl -X POST http://\$CLUSTERIP/chat -H \"accept: application/json\" -H \"Content-Type: application/json\" -d \"{\\\"prompt\\\":\\\"YOUR QUESTION HERE\\\"}\""
for try in 1 2 3; do
  answer=$(kubectl run -i --rm --restart=Never curl --image="$CURL_IMAGE" -- curl -sS -X POST "http://$CLUSTERIP/chat" \
    -H "accept: application/json" -H "Content-Type: application/json" -d "{\"prompt\":\"YOUR QUESTION HERE\"}" \
    2>"$LOG_DIR/curl.err") || { cat "$LOG_DIR/curl.err" >&2; exit 1; }
  grep -q '"Result"' <<<"$answer" && break
  # kubectl attaches once the container runs; a curl already done by then loses its output to the race.
  [ "$try" = 3 ] && { echo "the seed's curl printed no {\"Result\": ...}: $answer" >&2; exit 1; }
done
grep -v '^pod "curl" deleted' <<<"$answer" | cut -c1-300
echo
echo
echo "   (a tiny model with random weights: the answer is random text, from a real pod through the Service)"
echo "   CPU path: $(secs "$t")s from kubectl apply to the answer"
