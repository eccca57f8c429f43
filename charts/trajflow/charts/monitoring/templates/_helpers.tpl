{{/*
Helpers of the monitoring chart. Names, labels, images and security contexts come from
the common library chart (trajflow.*); only what is specific to monitoring lives here.
*/}}

{{/* The Pushgateway's objects share the Service name the stages' default URL points at. */}}
{{- define "monitoring.pushgatewayName" -}}
{{- include "trajflow.pushgatewayServiceName" . -}}
{{- end -}}

{{/*
Whether to render a Prometheus Operator object. Takes (dict "context" $ "key"
"serviceMonitor" "kind" "ServiceMonitor"); prints "true" or nothing. `auto` follows the
cluster's API; `true` without the API stops the render with the way out.
*/}}
{{- define "monitoring.renderOperatorObject" -}}
{{- $ctx := .context -}}
{{- $setting := (index $ctx.Values .key).enabled -}}
{{- $hasApi := $ctx.Capabilities.APIVersions.Has "monitoring.coreos.com/v1" -}}
{{- if kindIs "bool" $setting -}}
{{- if and $setting (not $hasApi) -}}
{{- fail (printf "%s.enabled is true, but this cluster does not serve monitoring.coreos.com/v1 (the Prometheus Operator CRDs), so a %s cannot be created. Install the Prometheus Operator, set %s.enabled to auto or false, or with `helm template` pass --api-versions monitoring.coreos.com/v1." .key .kind .key) -}}
{{- end -}}
{{- if $setting }}true{{ end -}}
{{- else if eq (toString $setting) "auto" -}}
{{- if $hasApi }}true{{ end -}}
{{- else -}}
{{- fail (printf "%s.enabled must be auto, true or false, got %v" .key $setting) -}}
{{- end -}}
{{- end -}}

{{/*
Labels of a monitoring object: the standard labels of the component plus the
user's extra labels (selectors of the Prometheus or Grafana sidecar). Takes
(dict "context" $ "component" "x" "extra" dict).
*/}}
{{- define "monitoring.labels" -}}
{{- $labels := include "trajflow.labels" (dict "context" .context "component" .component) | fromYaml -}}
{{- include "trajflow.mustToYaml" (mustMergeOverwrite $labels (deepCopy (.extra | default dict))) -}}
{{- end -}}

{{/*
Base name of a stage's Jobs, exactly as trajflow.jobName cuts it before the hash.
Takes (dict "context" $ "stage" "training").
*/}}
{{- define "monitoring.stageJobBase" -}}
{{- $stageCtx := dict "Chart" (dict "Name" .stage) "Release" .context.Release -}}
{{- include "trajflow.jobBase" $stageCtx -}}
{{- end -}}

{{/* A Go regex, escaped for a double-quoted PromQL string. */}}
{{- define "monitoring.promqlRegex" -}}
{{- . | replace "\\" "\\\\" -}}
{{- end -}}

{{/* Regex of the names of this release's stage Jobs (`<base>-<8 hex>`). */}}
{{- define "monitoring.jobNameRegex" -}}
{{- $ctx := . -}}
{{- $alternatives := list -}}
{{- range list "downloader" "preprocessing" "training" -}}
{{- $alternatives = append $alternatives (regexQuoteMeta (include "monitoring.stageJobBase" (dict "context" $ctx "stage" .))) -}}
{{- end -}}
{{- printf "(%s)-[0-9a-f]{8}" (join "|" $alternatives) -}}
{{- end -}}

{{/* Regex of the pods whose GPUs are watched: `gpu.podRegex`, or this release's GPU stages. */}}
{{- define "monitoring.gpuPodRegex" -}}
{{- if .Values.gpu.podRegex -}}
{{- .Values.gpu.podRegex -}}
{{- else -}}
{{- $ctx := . -}}
{{- $alternatives := list -}}
{{- range list "preprocessing" "training" -}}
{{- $alternatives = append $alternatives (regexQuoteMeta (include "monitoring.stageJobBase" (dict "context" $ctx "stage" .))) -}}
{{- end -}}
{{- /* the Job's hash anchors it: release `x-training` has pods starting `x-training-` too */ -}}
{{- printf "(%s)-[0-9a-f]{8}-.+" (join "|" $alternatives) -}}
{{- end -}}
{{- end -}}

{{/* The scope matchers of trajflow series (prometheusRule.selector, rendered with tpl). */}}
{{- define "monitoring.scope" -}}
{{- with .Values.prometheusRule.selector -}}
{{- tpl . $ | trim | trimSuffix "," -}}
{{- end -}}
{{- end -}}

{{/*
A PromQL selector body `{scope,matcher,...}`. Takes (list $ "matcher" ...); empty
matchers are skipped.
*/}}
{{- define "monitoring.sel" -}}
{{- $ctx := first . -}}
{{- $parts := list -}}
{{- with include "monitoring.scope" $ctx }}{{ $parts = append $parts . }}{{ end -}}
{{- range rest . }}{{ if . }}{{ $parts = append $parts . }}{{ end }}{{ end -}}
{{- printf "{%s}" (join ", " $parts) -}}
{{- end -}}

{{/* Seconds in a Prometheus duration (`1h30m` -> 5400); fails on anything else. */}}
{{- define "monitoring.seconds" -}}
{{- $text := toString . -}}
{{- if not (regexMatch "^([0-9]+(ms|s|m|h|d|w|y))+$" $text) -}}
{{- fail (printf "%q is not a Prometheus duration (e.g. 90s, 15m, 2h)" $text) -}}
{{- end -}}
{{- $units := dict "ms" 0.001 "s" 1 "m" 60 "h" 3600 "d" 86400 "w" 604800 "y" 31536000 -}}
{{- $total := 0.0 -}}
{{- range regexFindAll "[0-9]+(ms|s|m|h|d|w|y)" $text -1 -}}
{{- $unit := regexFind "(ms|s|m|h|d|w|y)$" . -}}
{{- $number := trimSuffix $unit . | float64 -}}
{{- $total = addf $total (mulf $number (index $units $unit)) -}}
{{- end -}}
{{- $total -}}
{{- end -}}

{{/* The Pushgateway's ServiceAccount. */}}
{{- define "monitoring.pushgatewayServiceAccountName" -}}
{{- $sa := .Values.pushgateway.serviceAccount -}}
{{- if $sa.create -}}
{{- $sa.name | default (include "monitoring.pushgatewayName" .) -}}
{{- else -}}
{{- $sa.name | default "default" -}}
{{- end -}}
{{- end -}}

{{/* An alert that goes quiet `quietAfter` after its cause must outlast its `for`, or it never fires. */}}
{{- define "monitoring.quietAfterFor" -}}
{{- if le (include "monitoring.seconds" .rule.quietAfter | float64) (include "monitoring.seconds" .rule.for | float64) -}}
{{- fail (printf "monitoring.prometheusRule.alerts.%s.quietAfter (%s) must be longer than its for (%s): the alert would go quiet before it could fire" .alert .rule.quietAfter .rule.for) -}}
{{- end -}}
{{- end -}}
