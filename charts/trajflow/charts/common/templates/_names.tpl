{{/*
Names. Every helper takes the chart's root context (`.`) unless it says otherwise, and
works the same from the umbrella and from any stage chart, so the objects of one release
share one prefix: the release fullname.
*/}}

{{/* The umbrella chart's name; stage charts cannot see it, so it is fixed here. */}}
{{- define "trajflow.partOf" -}}
trajflow
{{- end -}}

{{/* `<release>-trajflow`, or the release name alone when it already says trajflow. */}}
{{- define "trajflow.releaseFullname" -}}
{{- $partOf := include "trajflow.partOf" . -}}
{{- if contains $partOf .Release.Name -}}
{{- .Release.Name | trunc 63 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-%s" .Release.Name $partOf | trunc 63 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}

{{/* The component a chart renders: the stage name, or "pipeline" for the umbrella's own objects. */}}
{{- define "trajflow.component" -}}
{{- if eq .Chart.Name (include "trajflow.partOf" .) -}}
pipeline
{{- else -}}
{{- .Chart.Name | trunc 63 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}

{{/* Base name of this chart's objects: the release fullname, plus the stage for stage charts. */}}
{{- define "trajflow.fullname" -}}
{{- if eq .Chart.Name (include "trajflow.partOf" .) -}}
{{- include "trajflow.releaseFullname" . -}}
{{- else -}}
{{- printf "%s-%s" (include "trajflow.releaseFullname" .) .Chart.Name | trunc 63 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}

{{/* `<name>-<version>` for the helm.sh/chart label. */}}
{{- define "trajflow.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{/* The ServiceAccount a stage's pods run as. */}}
{{- define "trajflow.serviceAccountName" -}}
{{- $sa := .Values.serviceAccount | default dict -}}
{{- if $sa.create -}}
{{- $sa.name | default (include "trajflow.fullname" .) | trunc 63 | trimSuffix "-" -}}
{{- else -}}
{{- $sa.name | default "default" -}}
{{- end -}}
{{- end -}}

{{/* The ConfigMap holding a stage's /etc/trajflow/config.yaml. */}}
{{- define "trajflow.configMapName" -}}
{{- printf "%s-config" (include "trajflow.fullname" . | trunc 56 | trimSuffix "-") -}}
{{- end -}}

{{/*
The name of a Job (or PyTorchJob) whose spec is mostly immutable. Takes
(dict "context" $ "spec" $immutableSpec): the name carries a short hash of the
immutable part, so an upgrade that changes the image, the config or the shard count
makes a new Job, while one that changes parallelism patches the running Job.
The base is cut to 43 characters so `<job>-<index>` pod hostnames stay within 63.
*/}}
{{- define "trajflow.jobName" -}}
{{- $base := include "trajflow.fullname" .context | trunc 43 | trimSuffix "-" -}}
{{- printf "%s-%s" $base (toJson .spec | sha256sum | trunc 8) -}}
{{- end -}}

{{/* The shared data PVC: an existing claim, or the one the umbrella creates. */}}
{{- define "trajflow.claimName" -}}
{{- $pvc := (include "trajflow.global" . | fromYaml).storage.pvc -}}
{{- if $pvc.existingClaim -}}
{{- $pvc.existingClaim -}}
{{- else -}}
{{- printf "%s-data" (include "trajflow.releaseFullname" . | trunc 58 | trimSuffix "-") -}}
{{- end -}}
{{- end -}}

{{/*
The in-release Pushgateway Service. The monitoring chart names its Service with this
helper so that stage charts can point at it without seeing the monitoring values.
*/}}
{{- define "trajflow.pushgatewayServiceName" -}}
{{- printf "%s-pushgateway" (include "trajflow.releaseFullname" . | trunc 51 | trimSuffix "-") -}}
{{- end -}}
