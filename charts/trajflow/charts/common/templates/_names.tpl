{{/*
Names. Every helper takes the chart's root context (`.`) unless it says otherwise, and
works the same from the umbrella and from any stage chart, so the objects of one release
share one prefix: the release fullname.
*/}}

{{/* The umbrella chart's name; stage charts cannot see it, so it is fixed here. */}}
{{- define "trajflow.partOf" -}}
trajflow
{{- end -}}

{{/*
`<release>-trajflow`, or the release name alone when it already says trajflow. Helm
accepts release names that Kubernetes refuses in some names: dots become dashes (a Job's
pod hostnames and a Service name are DNS labels) and a leading digit gets `trajflow-` in
front (a Service name must start with a letter).
*/}}
{{- define "trajflow.releaseFullname" -}}
{{- $partOf := include "trajflow.partOf" . -}}
{{- $release := .Release.Name | replace "." "-" -}}
{{- if regexMatch "^[0-9]" $release -}}
{{- printf "%s-%s" $partOf $release | trunc 63 | trimSuffix "-" -}}
{{- else if contains $partOf $release -}}
{{- $release | trunc 63 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-%s" $release $partOf | trunc 63 | trimSuffix "-" -}}
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

{{/*
`text` cut to at most `max` characters (dict "text" "max"). A cut name ends in a short
hash of the whole text, so long names that differ only past the cut stay apart.
*/}}
{{- define "trajflow.cut" -}}
{{- $max := int .max -}}
{{- if le (len .text) $max -}}
{{- .text -}}
{{- else -}}
{{- printf "%s-%s" (.text | trunc (int (sub $max 9)) | trimSuffix "-") (.text | sha256sum | trunc 8) -}}
{{- end -}}
{{- end -}}

{{/*
A name that ends in what tells it apart: `<release fullname>[-<stage>][-<suffix>]`, at
most `max` characters (63 unless given). Takes (dict "context" $ "suffix" "config" "max"
43); both keys are optional. Only the release part is cut (see trajflow.cut), never the
stage or the suffix, so the objects of different stages keep different names however long
the release name.
*/}}
{{- define "trajflow.suffixedName" -}}
{{- $ctx := .context -}}
{{- $parts := list -}}
{{- if ne $ctx.Chart.Name (include "trajflow.partOf" $ctx) }}{{ $parts = append $parts $ctx.Chart.Name }}{{ end -}}
{{- with .suffix }}{{ $parts = append $parts . }}{{ end -}}
{{- $tail := join "-" $parts -}}
{{- $max := int (.max | default 63) -}}
{{- $release := include "trajflow.releaseFullname" $ctx -}}
{{- if not $tail -}}
{{- include "trajflow.cut" (dict "text" $release "max" $max) -}}
{{- else -}}
{{- printf "%s-%s" (include "trajflow.cut" (dict "text" $release "max" (sub (sub $max (len $tail)) 1))) $tail -}}
{{- end -}}
{{- end -}}

{{/* Base name of this chart's objects: the release fullname, plus the stage for stage charts. */}}
{{- define "trajflow.fullname" -}}
{{- include "trajflow.suffixedName" (dict "context" .) -}}
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

{{/*
The ConfigMap holding a stage's /etc/trajflow/config.yaml, named by a hash of its content:
a Job replaced by an upgrade keeps reading the config it was made with for as long as it
lives (under ArgoCD, old Jobs are pruned wave by wave during a sync, possibly days later),
instead of the new run's.
*/}}
{{- define "trajflow.configMapName" -}}
{{- include "trajflow.suffixedName" (dict "context" . "suffix" (printf "config-%s" (include "trajflow.configFile" . | sha256sum | trunc 8))) -}}
{{- end -}}

{{/*
The name of a Job (or PyTorchJob) whose spec is mostly immutable. Takes
(dict "context" $ "spec" $immutableSpec): the name carries a short hash of the
immutable part, so an upgrade that changes the image, the config or the shard count
makes a new Job, while one that changes parallelism patches the running Job.
The base (`<release>-<stage>`, the release part cut) is at most 43 characters, so the
name is at most 52 and `<job>-<index>` pod hostnames stay within 63.
*/}}
{{- define "trajflow.jobBase" -}}
{{- include "trajflow.suffixedName" (dict "context" . "max" 43) -}}
{{- end -}}

{{- define "trajflow.jobName" -}}
{{- $base := include "trajflow.jobBase" .context -}}
{{- $hashed := .spec -}}
{{- /* `rerun` renames the Job, so that an upgrade makes a new one: a failed Job never starts
pods again. 0 (the default) hashes the spec alone, so existing Jobs keep their names. */ -}}
{{- with .context.Values.rerun }}{{ $hashed = dict "spec" $.spec "rerun" (int .) }}{{ end -}}
{{- printf "%s-%s" $base (toJson $hashed | sha256sum | trunc 8) -}}
{{- end -}}

{{/* The shared data PVC: an existing claim, or the one the umbrella creates. */}}
{{- define "trajflow.claimName" -}}
{{- $pvc := (include "trajflow.global" . | fromYaml).storage.pvc -}}
{{- if $pvc.existingClaim -}}
{{- $pvc.existingClaim -}}
{{- else -}}
{{- /* cut without a hash, as before trajflow.cut: a claim of another name would be a new, empty volume */ -}}
{{- printf "%s-data" (include "trajflow.releaseFullname" . | trunc 58 | trimSuffix "-") -}}
{{- end -}}
{{- end -}}

{{/*
The in-release Pushgateway Service. The monitoring chart names its Service with this
helper so that stage charts can point at it without seeing the monitoring values.
*/}}
{{- define "trajflow.pushgatewayServiceName" -}}
{{- printf "%s-pushgateway" (include "trajflow.cut" (dict "text" (include "trajflow.releaseFullname" .) "max" 51)) -}}
{{- end -}}

{{/*
The port the in-release Pushgateway's container listens on (its port `http`). Its Service
may expose another port; a NetworkPolicy must allow this one, as policies see the
destination pod's port after the Service's translation.
*/}}
{{- define "trajflow.pushgatewayPodPort" -}}
9091
{{- end -}}

{{/*
The umbrella's ConfigMap holding the downloader's config, which the stages after it read
(trajflow.datasetConfigPath) to know the download their input must come from. Named here
so that stage charts can mount it without seeing the downloader's values.
*/}}
{{- define "trajflow.datasetConfigMapName" -}}
{{- printf "%s-dataset" (include "trajflow.cut" (dict "text" (include "trajflow.releaseFullname" .) "max" 55)) -}}
{{- end -}}
