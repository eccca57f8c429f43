{{/*
The pod block every stage shares. Stage charts describe only their containers'
commands; image, environment, mounts, security and scheduling come from here.
*/}}

{{- define "trajflow.configDir" -}}/etc/trajflow{{- end -}}
{{- define "trajflow.configPath" -}}{{ include "trajflow.configDir" . }}/config.yaml{{- end -}}
{{- /* beside, not below, /etc/trajflow: the kubelet cannot make a mount point in a ConfigMap volume */ -}}
{{- define "trajflow.datasetConfigDir" -}}/etc/trajflow-dataset{{- end -}}

{{/*
Whether a stage mounts the release's downloader config (trajflow.datasetConfigMapName): the
stages after the downloader read what it fetched, and the downloader itself learns from it
that an upgrade replaced its Job.
*/}}
{{- define "trajflow.mountsDatasetConfig" -}}
{{- if has .Chart.Name (list "downloader" "preprocessing" "training") }}true{{ end -}}
{{- end -}}

{{/*
Where the shared volume is mounted: global.storage.filesystem.path. A relative path (as
`trajflow run` uses) is relative to the working directory, which is then / in the pods.
*/}}
{{- define "trajflow.dataMountPath" -}}
{{- $path := (include "trajflow.global" . | fromYaml).storage.filesystem.path -}}
{{- if hasPrefix "/" $path -}}
{{- clean $path -}}
{{- else -}}
{{- clean (printf "/%s" $path) -}}
{{- end -}}
{{- end -}}

{{/* The stage's config file: `global` (effective) and `config`. Left out: what only the
chart reads (the PVC, ArgoCD), so that resizing the volume does not rename, and so replace,
every Job through checksum/config. */}}
{{- define "trajflow.configFile" -}}
{{- $global := include "trajflow.global" . | fromYaml -}}
{{- $_ := set $global.metrics "pushgatewayUrl" (include "trajflow.pushgatewayUrl" .) -}}
{{- $_ := unset $global.storage "pvc" -}}
{{- $_ := unset $global "argocd" -}}
{{- include "trajflow.mustToYaml" (dict "global" $global "config" (.Values.config | default dict)) -}}
{{- end -}}

{{/* The stage's ConfigMap. */}}
{{- define "trajflow.configMap" -}}
apiVersion: v1
kind: ConfigMap
metadata:
  {{- include "trajflow.metadata" (dict "context" . "name" (include "trajflow.configMapName" .)) | nindent 2 }}
data:
  config.yaml: |
    {{- include "trajflow.configFile" . | nindent 4 }}
{{- end -}}

{{/*
The size limit of the writable /tmp (HOME and TMPDIR): the emptyDir's sizeLimit, also told
to the workload so that it stops with a clear error before the kubelet evicts the pod.
*/}}
{{- define "trajflow.tmpSizeLimit" -}}
{{- (.Values.tmp | default dict).sizeLimit | default "1Gi" | toString -}}
{{- end -}}

{{/* "true" for a GPU or a share of one, as device plugins name them (trajflow.local.pipeline.is_gpu_resource). */}}
{{- define "trajflow.isGpuResource" -}}
{{- if or (eq . "nvidia.com/gpu") (hasPrefix "nvidia.com/gpu." .) (hasPrefix "nvidia.com/mig-" .) -}}true{{- end -}}
{{- end -}}

{{/*
GPUs of each pod of a stage: the nvidia.com/gpu limit (0 without). Kubernetes takes GPUs
(nvidia.com/gpu, its time-sliced nvidia.com/gpu.shared, MIG slices) from
limits, whole, and the API server refuses a request that differs, but only after helm has
said yes; so both are refused here, naming the key. A stage whose config.device is cuda
needs one of them, else it fails only once its wait is over.
*/}}
{{- define "trajflow.gpus" -}}
{{- $resources := .Values.resources | default dict -}}
{{- $limits := $resources.limits | default dict -}}
{{- $requests := $resources.requests | default dict -}}
{{- $devices := 0 -}}
{{- $migSlices := 0 -}}
{{- range $name := concat (keys $limits) (keys $requests) | uniq | sortAlpha -}}
{{- if include "trajflow.isGpuResource" $name -}}
{{- /* `get` gives "" for a missing key, a null value stays nil */ -}}
{{- $limit := ternary (get $limits $name) "unset" (and (hasKey $limits $name) (not (kindIs "invalid" (get $limits $name)))) -}}
{{- $request := get $requests $name -}}
{{- if and (hasKey $requests $name) (not (kindIs "invalid" $request)) (ne (toString $request) (toString $limit)) -}}
{{- fail (printf "%s.resources.requests.%s is %v, but resources.limits.%s is %v: Kubernetes refuses GPU requests that differ from the limit. Set %s in resources.limits only" $.Chart.Name $name $request $name $limit $name) -}}
{{- end -}}
{{- if and (ne (toString $limit) "unset") (not (regexMatch "^[0-9]+$" (toString $limit))) -}}
{{- fail (printf "%s.resources.limits.%s is %v: GPUs are whole devices; set a whole number" $.Chart.Name $name $limit) -}}
{{- end -}}
{{- $devices = add $devices (int $limit) -}}
{{- if hasPrefix "nvidia.com/mig-" $name }}{{ $migSlices = add $migSlices (int $limit) }}{{ end -}}
{{- end -}}
{{- end -}}
{{- if gt $migSlices 1 -}}
{{- fail (printf "%s.resources.limits asks for %d MIG slices, but a CUDA process sees one: %d would sit idle. Give each pod one slice and run more pods" .Chart.Name $migSlices (sub $migSlices 1)) -}}
{{- end -}}
{{- if and (eq (toString (dig "device" "auto" (.Values.config | default dict))) "cuda") (eq $devices 0) -}}
{{- fail (printf "%s.config.device is cuda, but the pods have no GPU (resources.limits.nvidia.com/gpu): set the limit, or device auto or cpu" .Chart.Name) -}}
{{- end -}}
{{- int (dig "limits" "nvidia.com/gpu" 0 $resources) -}}
{{- end -}}

{{/*
Environment of every container of a stage. Takes (dict "context" $ "shards" N "env" list).
*/}}
{{- define "trajflow.env" -}}
{{- $ctx := .context -}}
{{- $global := include "trajflow.global" $ctx | fromYaml -}}
- name: HOME
  value: /tmp
- name: TMPDIR
  value: /tmp
- name: TRAJFLOW_TMP_SIZE_LIMIT
  value: {{ include "trajflow.tmpSizeLimit" $ctx | quote }}
- name: TRAJFLOW_CONFIG
  value: {{ include "trajflow.configPath" $ctx }}
{{- if include "trajflow.mountsDatasetConfig" $ctx }}
- name: TRAJFLOW_DATASET_CONFIG
  value: {{ include "trajflow.datasetConfigDir" $ctx }}/config.yaml
{{- end }}
- name: TRAJFLOW_SHARDS
  value: {{ .shards | toString | quote }}
- name: TRAJFLOW_NAMESPACE
  value: {{ $ctx.Release.Namespace | quote }}
- name: TRAJFLOW_RELEASE
  value: {{ $ctx.Release.Name | quote }}
- name: TRAJFLOW_RERUN
  value: {{ int ($ctx.Values.rerun | default 0) | toString | quote }}
- name: PYTHONUNBUFFERED
  value: "1"
{{- with .env }}
{{ include "trajflow.mustToYaml" . }}
{{- end }}
{{- with $ctx.Values.extraEnv }}
{{ include "trajflow.mustToYaml" . }}
{{- end }}
{{- end -}}

{{- define "trajflow.envFrom" -}}
{{- $global := include "trajflow.global" . | fromYaml -}}
{{- if and (eq $global.storage.type "s3") $global.storage.s3.existingSecret }}
- secretRef:
    name: {{ $global.storage.s3.existingSecret | quote }}
{{- end }}
{{- with .Values.extraEnvFrom }}
{{ include "trajflow.mustToYaml" . }}
{{- end }}
{{- end -}}

{{- define "trajflow.volumeMounts" -}}
{{- $global := include "trajflow.global" . | fromYaml -}}
- name: config
  mountPath: {{ include "trajflow.configDir" . }}
  readOnly: true
- name: tmp
  mountPath: /tmp
{{- if include "trajflow.mountsDatasetConfig" . }}
- name: trajflow-dataset
  mountPath: {{ include "trajflow.datasetConfigDir" . }}
  readOnly: true
{{- end }}
{{- if (.Values.shm | default dict).enabled }}
- name: shm
  mountPath: /dev/shm
{{- end }}
{{- if eq $global.storage.type "filesystem" }}
{{- $data := include "trajflow.dataMountPath" . }}
- name: data
  mountPath: {{ $data | quote }}
{{- /* the API server refuses two mounts at one path, after helm has said yes */}}
{{- range $i, $m := .Values.extraVolumeMounts }}
{{- if eq (clean (toString $m.mountPath)) $data }}
{{- fail (printf "%s.extraVolumeMounts[%d].mountPath %q is where the data volume (global.storage.filesystem.path) is mounted; choose another path" $.Chart.Name $i (toString $m.mountPath)) }}
{{- end }}
{{- end }}
{{- end }}
{{- /* the schema refuses these paths as written; here also as the kubelet reads them (//tmp, /tmp/.) */}}
{{- range $i, $m := .Values.extraVolumeMounts }}
{{- $path := clean (toString $m.mountPath) }}
{{- if or (has $path (list "/tmp" "/dev/shm")) (regexMatch "^/etc/trajflow(-dataset)?(/|$)" $path) }}
{{- fail (printf "%s.extraVolumeMounts[%d].mountPath %q is %s, where the chart's pods mount volumes themselves; choose another path" $.Chart.Name $i (toString $m.mountPath) $path) }}
{{- end }}
{{- end }}
{{- with .Values.extraVolumeMounts }}
{{ include "trajflow.mustToYaml" . }}
{{- end }}
{{- end -}}

{{- define "trajflow.volumes" -}}
{{- $global := include "trajflow.global" . | fromYaml -}}
- name: config
  configMap:
    name: {{ include "trajflow.configMapName" . }}
- name: tmp
  emptyDir:
    sizeLimit: {{ include "trajflow.tmpSizeLimit" . }}
{{- if include "trajflow.mountsDatasetConfig" . }}
- name: trajflow-dataset
  configMap:
    name: {{ include "trajflow.datasetConfigMapName" . }}
    {{- /* the umbrella renders it only with the downloader and preprocessing enabled; a stage chart alone has none */}}
    optional: true
{{- end }}
{{- if (.Values.shm | default dict).enabled }}
- name: shm
  emptyDir:
    medium: Memory
    sizeLimit: {{ .Values.shm.sizeLimit }}
{{- end }}
{{- if eq $global.storage.type "filesystem" }}
- name: data
  persistentVolumeClaim:
    claimName: {{ include "trajflow.claimName" . | quote }}
{{- end }}
{{- with .Values.extraVolumes }}
{{ include "trajflow.mustToYaml" . }}
{{- end }}
{{- end -}}

{{/*
The stage's tolerations, and the usual taint of the GPU nodes its pods ask for (nvidia.com/gpu,
NoSchedule: the GPU operator's, EKS's and AKS's GPU pools), as Kubernetes'
ExtendedResourceToleration admission plugin adds it where it is on (GKE), unless one of the
stage's already tolerates it.
*/}}
{{- define "trajflow.tolerations" -}}
{{- $tolerations := .Values.tolerations | default list -}}
{{- $gpu := false -}}
{{- range $name, $value := ((.Values.resources | default dict).limits | default dict) -}}
{{- if and (not (kindIs "invalid" $value)) (include "trajflow.isGpuResource" $name) }}{{ $gpu = true }}{{ end -}}
{{- end -}}
{{- $covered := false -}}
{{- range $tolerations -}}
{{- /* another effect, or a value the taint may not have, leaves it untolerated */ -}}
{{- if and (has (.key | default "") (list "nvidia.com/gpu" "")) (eq (.operator | default "Equal") "Exists") (has (.effect | default "") (list "NoSchedule" "")) }}{{ $covered = true }}{{ end -}}
{{- end -}}
{{- if and $gpu (not $covered) -}}
{{- $tolerations = append $tolerations (dict "key" "nvidia.com/gpu" "operator" "Exists" "effect" "NoSchedule") -}}
{{- end -}}
{{- toJson $tolerations -}}
{{- end -}}

{{/*
One container. Takes (dict "context" $ "shards" N "container" (dict "name" "args"
"command" "resources" "ports" "env") "main" bool); command defaults to `trajflow`.
*/}}
{{- define "trajflow.container" -}}
{{- $ctx := .context -}}
{{- $c := .container -}}
name: {{ $c.name }}
image: {{ include "trajflow.image" (dict "context" $ctx "image" $ctx.Values.image) | quote }}
imagePullPolicy: {{ $ctx.Values.image.pullPolicy | default "IfNotPresent" }}
{{- /* a failed container's last log lines, which say why, become what `kubectl describe` shows */}}
terminationMessagePolicy: FallbackToLogsOnError
command:
  {{- include "trajflow.mustToYaml" ($c.command | default (list "trajflow")) | nindent 2 }}
{{- $global := include "trajflow.global" $ctx | fromYaml }}
{{- if and (eq $global.storage.type "filesystem") (not (hasPrefix "/" $global.storage.filesystem.path)) }}
workingDir: /
{{- end }}
{{- with $c.args }}
args:
  {{- include "trajflow.mustToYaml" . | nindent 2 }}
{{- end }}
{{- with $c.ports }}
ports:
  {{- include "trajflow.mustToYaml" . | nindent 2 }}
{{- end }}
env:
  {{- include "trajflow.env" (dict "context" $ctx "shards" .shards "env" $c.env) | nindent 2 }}
{{- with (include "trajflow.envFrom" $ctx) }}
envFrom:
  {{- . | nindent 2 }}
{{- end }}
{{- /* the main container requests /tmp's sizeLimit as disk, so that the scheduler counts it:
a kubelet evicting pods from a full node disk marks them disrupted, which podFailurePolicy
does not count, so they would be retried until the deadline */}}
{{- $resources := deepCopy ($c.resources | default dict) }}
{{- $requests := $resources.requests | default dict }}
{{- $requestStorage := dig "requestStorage" true ($ctx.Values.tmp | default dict) }}
{{- if and .main $requestStorage (not (or (hasKey $requests "ephemeral-storage") (hasKey ($resources.limits | default dict) "ephemeral-storage"))) }}
{{- $_ := set $resources "requests" (merge (dict "ephemeral-storage" (include "trajflow.tmpSizeLimit" $ctx)) $requests) }}
{{- end }}
resources:
  {{- include "trajflow.mustToYaml" $resources | nindent 2 }}
securityContext:
  {{- include "trajflow.containerSecurityContext" $ctx | nindent 2 }}
volumeMounts:
  {{- include "trajflow.volumeMounts" $ctx | nindent 2 }}
{{- end -}}

{{/*
A pod template (YAML). Takes (dict "context" $ "shards" N "containers" list
"initContainers" list "spec" dict): `spec` adds pod-spec fields of the stage
(subdomain for training). The config checksum annotation makes a config change a
change of the pod template, hence of the Job's hash.
*/}}
{{- define "trajflow.podTemplate" -}}
{{- $ctx := .context -}}
{{- $v := $ctx.Values -}}
{{- $selector := include "trajflow.selectorLabels" $ctx | fromYaml -}}
metadata:
  labels:
    {{- include "trajflow.podLabels" $ctx | nindent 4 }}
    {{- with $v.podLabels }}
    {{- include "trajflow.mustToYaml" . | nindent 4 }}
    {{- end }}
  annotations:
    checksum/config: {{ include "trajflow.configFile" $ctx | sha256sum }}
    {{- with $v.podAnnotations }}
    {{- include "trajflow.mustToYaml" . | nindent 4 }}
    {{- end }}
spec:
  restartPolicy: Never
  serviceAccountName: {{ include "trajflow.serviceAccountName" $ctx | quote }}
  automountServiceAccountToken: false
  enableServiceLinks: false
  {{- with (include "trajflow.imagePullSecrets" $ctx) }}
  imagePullSecrets:
    {{- . | nindent 4 }}
  {{- end }}
  securityContext:
    {{- include "trajflow.podSecurityContext" $ctx | nindent 4 }}
  {{- with $v.priorityClassName }}
  priorityClassName: {{ . | quote }}
  {{- end }}
  {{- with $v.runtimeClassName }}
  runtimeClassName: {{ . | quote }}
  {{- end }}
  {{- with $v.nodeSelector }}
  nodeSelector:
    {{- include "trajflow.mustToYaml" . | nindent 4 }}
  {{- end }}
  {{- with (include "trajflow.tolerations" $ctx | fromJsonArray) }}
  tolerations:
    {{- include "trajflow.mustToYaml" . | nindent 4 }}
  {{- end }}
  {{- with $v.affinity }}
  affinity:
    {{- include "trajflow.mustToYaml" . | nindent 4 }}
  {{- end }}
  {{- with $v.topologySpreadConstraints }}
  topologySpreadConstraints:
    {{- range . }}
    {{- $constraint := deepCopy . }}
    {{- if not (hasKey $constraint "labelSelector") }}
    {{- $_ := set $constraint "labelSelector" (dict "matchLabels" $selector) }}
    {{- end }}
    - {{- include "trajflow.mustToYaml" $constraint | nindent 6 }}
    {{- end }}
  {{- end }}
  {{- with .spec }}
  {{- include "trajflow.mustToYaml" . | nindent 2 }}
  {{- end }}
  {{- with .initContainers }}
  initContainers:
    {{- range . }}
    - {{- include "trajflow.container" (dict "context" $ctx "shards" $.shards "container" .) | nindent 6 }}
    {{- end }}
  {{- end }}
  containers:
    {{- range .containers }}
    - {{- include "trajflow.container" (dict "context" $ctx "shards" $.shards "container" . "main" true) | nindent 6 }}
    {{- end }}
  volumes:
    {{- include "trajflow.volumes" $ctx | nindent 4 }}
{{- end -}}

{{/* trajflow.podTemplate parsed into a dict; a template bug fails loudly here. */}}
{{- define "trajflow.podTemplateJson" -}}
{{- $pod := include "trajflow.podTemplate" . | fromYaml -}}
{{- if hasKey $pod "Error" -}}
{{- fail (printf "internal error rendering the pod template of %s: %s" .context.Chart.Name (get $pod "Error")) -}}
{{- end -}}
{{- toJson $pod -}}
{{- end -}}
