{{/*
Security contexts. The secure defaults below apply to every pod; a stage's
podSecurityContext / containerSecurityContext values are merged over them (the values
schema forbids turning off non-root, read-only root filesystem or privilege limits).
The image runs as UID/GID 65532.
*/}}
{{- define "trajflow.podSecurityContext" -}}
{{- $defaults := dict
  "runAsNonRoot" true
  "runAsUser" 65532
  "runAsGroup" 65532
  "fsGroup" 65532
  "fsGroupChangePolicy" "OnRootMismatch"
  "seccompProfile" (dict "type" "RuntimeDefault") -}}
{{- include "trajflow.mustToYaml" (mustMergeOverwrite $defaults (deepCopy (.Values.podSecurityContext | default dict))) -}}
{{- end -}}

{{/* The UID and GID come from the pod's context (set there only, so podSecurityContext.runAsUser
applies to every container, as on OpenShift's assigned UID ranges). */}}
{{- define "trajflow.containerSecurityContext" -}}
{{- $defaults := dict
  "runAsNonRoot" true
  "allowPrivilegeEscalation" false
  "privileged" false
  "readOnlyRootFilesystem" true
  "capabilities" (dict "drop" (list "ALL"))
  "seccompProfile" (dict "type" "RuntimeDefault") -}}
{{- include "trajflow.mustToYaml" (mustMergeOverwrite $defaults (deepCopy (.Values.containerSecurityContext | default dict))) -}}
{{- end -}}
