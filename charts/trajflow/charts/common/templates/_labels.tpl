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
The release label of top-level objects (not of pod templates). ArgoCD's `label` resource
tracking (its default before 3.0, and `annotation+label`) rewrites
app.kubernetes.io/instance on every object it applies to the Application's name, so a
selector of objects (a ServiceMonitor selecting Services, `kubectl get jobs -l`) must not
use that label: it selects on this one, which no tool rewrites. Pod templates and pod
selectors keep only app.kubernetes.io/instance, which ArgoCD leaves alone on pod
templates: a new pod-template label would change every Job's name hash (and re-run the
stages on the upgrade that adds it), and the Deployment's selector is immutable.
*/}}
{{- define "trajflow.releaseLabel" -}}
trajflow.io/release: {{ .Release.Name | trunc 63 | trimSuffix "-" }}
{{- end -}}

{{/*
Labels that select top-level objects of one component of this release (e.g. the
Pushgateway Service), and still do after ArgoCD rewrote app.kubernetes.io/instance.
Takes what trajflow.selectorLabels takes.
*/}}
{{- define "trajflow.objectSelectorLabels" -}}
{{- $ctx := . -}}
{{- if and (kindIs "map" .) (hasKey . "context") }}{{ $ctx = .context }}{{ end -}}
{{- $args := include "trajflow.labelArgs" . | fromJson -}}
app.kubernetes.io/name: {{ include "trajflow.partOf" $ctx }}
app.kubernetes.io/component: {{ $args.component }}
{{ include "trajflow.releaseLabel" $ctx }}
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
{{ include "trajflow.releaseLabel" $ctx }}
{{- end -}}

{{/* Metadata shared by every object: name, namespace, labels. Takes (dict "context" $ "name" "x"), and
optionally "component", "annotations" and further "labels" (the chart's own labels win over those). */}}
{{- define "trajflow.metadata" -}}
name: {{ .name | quote }}
namespace: {{ .context.Release.Namespace | quote }}
labels:
  {{- $own := include "trajflow.labels" (dict "context" .context "component" (.component | default "")) | fromYaml }}
  {{- include "trajflow.mustToYaml" (mustMergeOverwrite (deepCopy (.labels | default dict)) $own) | nindent 2 }}
{{- with .annotations }}
annotations:
  {{- include "trajflow.mustToYaml" . | nindent 2 }}
{{- end }}
{{- end -}}
