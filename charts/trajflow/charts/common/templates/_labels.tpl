{{/*
Labels. Each helper takes the root context, or (dict "context" $ "component" "name")
to label an object of another component than the chart's own (the monitoring chart's
Pushgateway, the umbrella's PVC).
*/}}

{{- define "trajflow.labelArgs" -}}
{{- if and (kindIs "map" .) (hasKey . "context") -}}
{{- $component := .component | default (include "trajflow.component" .context) -}}
{{- toJson (dict "component" $component) -}}
{{- else -}}
{{- toJson (dict "component" (include "trajflow.component" .)) -}}
{{- end -}}
{{- end -}}

{{/* Selector labels: stable for the life of a release, so they may select pods. */}}
{{- define "trajflow.selectorLabels" -}}
{{- $ctx := . -}}
{{- if and (kindIs "map" .) (hasKey . "context") }}{{ $ctx = .context }}{{ end -}}
{{- $args := include "trajflow.labelArgs" . | fromJson -}}
app.kubernetes.io/name: {{ include "trajflow.partOf" $ctx }}
app.kubernetes.io/instance: {{ $ctx.Release.Name | trunc 63 | trimSuffix "-" }}
app.kubernetes.io/component: {{ $args.component }}
{{- end -}}

{{/*
Labels of pod templates: no chart version, so bumping the chart alone does not change
a Job's hash (and re-run it).
*/}}
{{- define "trajflow.podLabels" -}}
{{- $ctx := . -}}
{{- if and (kindIs "map" .) (hasKey . "context") }}{{ $ctx = .context }}{{ end -}}
{{ include "trajflow.selectorLabels" . }}
app.kubernetes.io/part-of: {{ include "trajflow.partOf" $ctx }}
{{- end -}}

{{/* The standard labels of every object. */}}
{{- define "trajflow.labels" -}}
{{- $ctx := . -}}
{{- if and (kindIs "map" .) (hasKey . "context") }}{{ $ctx = .context }}{{ end -}}
{{ include "trajflow.podLabels" . }}
app.kubernetes.io/version: {{ $ctx.Chart.AppVersion | default $ctx.Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" | quote }}
app.kubernetes.io/managed-by: {{ $ctx.Release.Service }}
helm.sh/chart: {{ include "trajflow.chart" $ctx }}
{{- end -}}

{{/* Metadata shared by every object: name, namespace, labels. Takes (dict "context" $ "name" "x"). */}}
{{- define "trajflow.metadata" -}}
name: {{ .name }}
namespace: {{ .context.Release.Namespace | quote }}
labels:
  {{- include "trajflow.labels" (dict "context" .context "component" (.component | default "")) | nindent 2 }}
{{- with .annotations }}
annotations:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- end -}}
