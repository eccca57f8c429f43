{{/* Helpers of the umbrella chart's own objects; shared ones live in charts/common. */}}

{{/* The stages this release runs, in pipeline order. */}}
{{- define "trajflow.umbrella.enabledStages" -}}
{{- $stages := list -}}
{{- range (list "downloader" "preprocessing" "training") -}}
{{- if (get $.Values . | default dict).enabled }}{{ $stages = append $stages . }}{{ end -}}
{{- end -}}
{{- toJson $stages -}}
{{- end -}}

{{/* The streams preprocessing writes into the shards: config.streams through config.renames,
sorted. Per-source settings must give the same ones (the preprocessing config refuses others).
A null rename is one a values file dropped (Helm keeps nulls the defaults do not have). */}}
{{- define "trajflow.umbrella.preprocessedStreams" -}}
{{- $config := .Values.preprocessing.config | default dict -}}
{{- $renames := $config.renames | default dict -}}
{{- $written := list -}}
{{- range ($config.streams | default list) -}}
{{- $written = append $written (toString ((index $renames .) | default .)) -}}
{{- end -}}
{{- toJson (sortAlpha $written) -}}
{{- end -}}

{{/* The TCP port of an http(s) URL: explicit, else 443 for https and 80 for http. Only a
trailing :<digits> is a port: an IPv6 host ([fd00::a]) holds colons of its own. Read with
regular expressions, not urlParse, which refuses a catalog template's {cohort} in a host. */}}
{{- define "trajflow.umbrella.urlPort" -}}
{{- $authority := regexFind "^[a-z]+://[^/?#]*" . -}}
{{- $port := regexFind ":[0-9]+$" $authority | trimPrefix ":" -}}
{{- if $port -}}
{{- $port -}}
{{- else if hasPrefix "http://" . -}}
80
{{- else -}}
443
{{- end -}}
{{- end -}}

{{/* The host of an http(s) URL, without port. */}}
{{- define "trajflow.umbrella.urlHost" -}}
{{- regexReplaceAll ":[0-9]+$" (urlParse .).host "" -}}
{{- end -}}

{{/* Ports the downloader fetches its sources on, from downloader.config.sources. */}}
{{- define "trajflow.umbrella.sourcePorts" -}}
{{- $ports := list -}}
{{- range ((.Values.downloader.config | default dict).sources | default list) -}}
{{- $urls := list -}}
{{- if eq .type "s3" -}}
{{- $urls = append $urls (.endpoint | default "https://s3.amazonaws.com") -}}
{{- else if eq .type "https" -}}
{{- range .urls -}}
{{- if kindIs "string" . }}{{ $urls = append $urls . }}{{ else }}{{ $urls = append $urls .url }}{{ end -}}
{{- end -}}
{{- else if eq .type "catalog" -}}
{{- $urls = append $urls .urlTemplate -}}
{{- end -}}
{{- range $urls }}{{ $ports = append $ports (include "trajflow.umbrella.urlPort" . | int) }}{{ end -}}
{{- end -}}
{{- toJson ($ports | uniq) -}}
{{- end -}}

{{/*
The ArgoCD sync wave of the shared PVC: that of the first enabled stage. An earlier wave
would never turn healthy with a WaitForFirstConsumer StorageClass (the claim stays
Pending until a pod uses it), and ArgoCD would wait on it forever.
*/}}
{{- define "trajflow.umbrella.storageSyncWave" -}}
{{- $first := "" -}}
{{- range (include "trajflow.umbrella.enabledStages" . | fromJsonArray) -}}
{{- $wave := int (get $.Values .).syncWave -}}
{{- if or (eq $first "") (lt $wave (int $first)) }}{{ $first = toString $wave }}{{ end -}}
{{- end -}}
{{- $first | default "0" -}}
{{- end -}}
