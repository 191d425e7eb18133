{{/*
Labels. Pod templates and selectors carry only the stable ones (selectors are immutable); object
metadata adds Helm's bookkeeping labels.
*/}}
{{- define "kaito.labels" -}}
app.kubernetes.io/name: {{ .name }}
{{- with .component }}
app.kubernetes.io/component: {{ . }}
{{- end }}
app.kubernetes.io/part-of: kaito
{{- end }}

{{- define "kaito.metaLabels" -}}
{{ include "kaito.labels" . }}
app.kubernetes.io/managed-by: {{ .root.Release.Service }}
helm.sh/chart: {{ printf "%s-%s" .root.Chart.Name .root.Chart.Version | replace "+" "_" }}
{{- end }}

{{/* <registry>/<repository>:<tag>; a component's image.registry overrides image.registry. */}}
{{- define "kaito.image" -}}
{{ printf "%s/%s:%s" (.image.registry | default .root.Values.image.registry) .image.repository (default .root.Chart.AppVersion .image.tag) }}
{{- end }}

{{/* A component's image.pullPolicy, else image.pullPolicy (Never: use only images already on the node). */}}
{{- define "kaito.pullPolicy" -}}
{{ .image.pullPolicy | default .root.Values.image.pullPolicy }}
{{- end }}

{{/*
Where a component's pods may run: nodeSelector is the global map with the component's keys on top,
tolerations are the global list followed by the component's, affinity is the component's own.
Called with (dict "root" $ "values" .Values.<component>).
*/}}
{{- define "kaito.scheduling" -}}
{{- $nodeSelector := merge (dict) (.values.nodeSelector | default dict) (.root.Values.nodeSelector | default dict) }}
{{- with $nodeSelector }}
nodeSelector:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- with concat (.root.Values.tolerations | default list) (.values.tolerations | default list) }}
tolerations:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- with .values.affinity }}
affinity:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- end }}

{{/* The ServiceAccount user name the webhooks skip (the controller's own writes). */}}
{{- define "kaito.controllerUser" -}}
system:serviceaccount:{{ .Release.Namespace }}:kaito-workspace
{{- end }}

{{- define "kaito.podSecurityContext" -}}
runAsNonRoot: true
runAsUser: 65532
runAsGroup: 65532
seccompProfile:
  type: RuntimeDefault
{{- end }}

{{- define "kaito.containerSecurityContext" -}}
allowPrivilegeEscalation: false
readOnlyRootFilesystem: true
runAsNonRoot: true
capabilities:
  drop: ["ALL"]
seccompProfile:
  type: RuntimeDefault
{{- end }}

{{- define "kaito.probes" -}}
livenessProbe:
  httpGet:
    path: /healthz
    port: http-probes
  initialDelaySeconds: 5
  periodSeconds: 20
  timeoutSeconds: 5
  failureThreshold: 3
readinessProbe:
  httpGet:
    path: /readyz
    port: http-probes
  periodSeconds: 10
  timeoutSeconds: 5
  failureThreshold: 3
{{- end }}
