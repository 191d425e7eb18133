{{/*
The RBAC rules come from config/rbac (files/ links there): one list of verbs and resources, derived
from the code, for both the plain manifests and the chart.
Usage: include "kaito.rules" (dict "root" . "file" "files/workspace_role.yaml" "kind" "Role" "name" "kaito-workspace")
*/}}
{{- define "kaito.rules" -}}
{{- $found := false -}}
{{- range $doc := splitList "\n---\n" (.root.Files.Get .file) -}}
{{- $obj := fromYaml $doc -}}
{{- if and (not $found) (eq (get $obj "kind") $.kind) (eq (get (get $obj "metadata") "name") $.name) -}}
{{- $found = true -}}
{{ toYaml (get $obj "rules") }}
{{- end -}}
{{- end -}}
{{- if not $found -}}
{{- fail (printf "no %s %s in %s" .kind .name .file) -}}
{{- end -}}
{{- end }}
