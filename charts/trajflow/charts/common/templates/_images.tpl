{{/*
An image reference. Takes (dict "context" $ "image" .Values.image):
  <registry>/<repository>:<tag>[@<digest>]
`global.imageRegistry`, when set, replaces every image's registry (mirrors, air-gapped
clusters); the tag defaults to the chart's appVersion; a digest pins the image.
*/}}
{{- define "trajflow.image" -}}
{{- $image := .image -}}
{{- $global := include "trajflow.global" .context | fromYaml -}}
{{- $registry := $global.imageRegistry | default $image.registry | default "" | trimSuffix "/" -}}
{{- $repository := required "image.repository is required" $image.repository -}}
{{- /* a repository that names its own registry (host.name/..., host:port/..., localhost/...) takes no other */ -}}
{{- if and $registry (regexMatch "^([^/]*[.:][^/]*|localhost)/" $repository) -}}
{{- fail (printf "image repository %q names its own registry, and the registry %q would go in front of it: set image.registry (and global.imageRegistry) to \"\" or move the host into image.registry" $repository $registry) -}}
{{- end -}}
{{- $ref := ternary (printf "%s/%s" $registry $repository) $repository (ne $registry "") -}}
{{- $tag := $image.tag | default .context.Chart.AppVersion | toString -}}
{{- if $image.digest -}}
{{- if $image.tag -}}
{{- printf "%s:%s@%s" $ref $tag $image.digest -}}
{{- else -}}
{{- printf "%s@%s" $ref $image.digest -}}
{{- end -}}
{{- else -}}
{{- printf "%s:%s" $ref $tag -}}
{{- end -}}
{{- end -}}

{{/* imagePullSecrets of a pod: the stage's own, then global ones, without repeats. */}}
{{- define "trajflow.imagePullSecrets" -}}
{{- $global := include "trajflow.global" . | fromYaml -}}
{{- $names := list -}}
{{- range (concat (.Values.imagePullSecrets | default list) ($global.imagePullSecrets | default list)) -}}
{{- if not (has .name $names) }}{{ $names = append $names .name }}{{ end -}}
{{- end -}}
{{- range $names }}
- name: {{ . | quote }}
{{- end -}}
{{- end -}}
