{{/*
Indexed Jobs. A stage chart builds its pod template with trajflow.podTemplate and hands
it here with its completions and parallelism.
*/}}

{{/*
A stage's waitTimeout as `trajflow wait --timeout` reads it: a duration string as given,
a number as whole seconds (values files give numbers as floats, and `toString` would
write 1000000 as 1e+06; `int64` would wrap one beyond 2^63 to a negative).
*/}}
{{- define "trajflow.waitTimeout" -}}
{{- if kindIs "string" . -}}
{{- /* the schema takes the form; a zero (0s, 0h0m) would give up at once, before any shard is done */ -}}
{{- if regexMatch "^(0+(\\.0+)?|(0+(\\.0+)?h)?(0+(\\.0+)?m)?(0+(\\.0+)?s)?)$" . -}}
{{- fail (printf "waitTimeout %q is zero: the wait would give up at once, before any shard is done; give a duration such as 6h" .) -}}
{{- end -}}
{{- . -}}
{{- else -}}
{{- printf "%.0f" (float64 .) -}}
{{- end -}}
{{- end -}}

{{/*
ArgoCD annotations of a stage's workload (only under global.argocd.enabled). Takes the
root context; the wave comes from the stage's syncWave value.
*/}}
{{- define "trajflow.argocdAnnotations" -}}
{{- $global := include "trajflow.global" . | fromYaml -}}
{{- if $global.argocd.enabled -}}
argocd.argoproj.io/sync-wave: {{ .Values.syncWave | default 0 | toString | quote }}
{{- end -}}
{{- end -}}

{{/*
Scanner annotations of a workload: an image without a digest is pinned by its tag, and
checkov's skip of CKV_K8S_43 says so on the object itself. Takes the root context of a
stage chart (its .Values.image), or (dict "context" $ "image" <image values> "valuesKey"
"monitoring.pushgateway.image") for another image.
*/}}
{{- define "trajflow.scanAnnotations" -}}
{{- $ctx := . -}}
{{- $image := dict -}}
{{- $key := "" -}}
{{- if hasKey . "context" -}}
{{- $ctx = .context -}}
{{- $image = .image -}}
{{- $key = .valuesKey -}}
{{- else -}}
{{- $image = .Values.image | default dict -}}
{{- $key = printf "%s.image" .Chart.Name -}}
{{- end -}}
{{- if not $image.digest -}}
{{- $ref := include "trajflow.image" (dict "context" $ctx "image" $image) -}}
checkov.io/skip1: {{ printf "CKV_K8S_43=Pinned by its release tag (%s); set %s.digest to pin the exact build" ($ref | splitList ":" | last) $key | quote }}
{{- end -}}
{{- end -}}

{{/*
The Job spec fields a stage controls besides the pod template, in Kubernetes shape.
Takes the root context.
*/}}
{{- define "trajflow.jobPolicy" -}}
{{- $v := .Values -}}
{{- /* a replacement pod starts once the one it replaces has ended: two pods of one index at
once would write the same shard, or two training ranks join one rendezvous (a podFailurePolicy
implies it; without one Kubernetes would replace a pod as soon as it starts terminating) */ -}}
{{- $policy := dict "podReplacementPolicy" "Failed" -}}
{{- $_ := set $policy "backoffLimitPerIndex" (int $v.backoffLimitPerIndex) -}}
{{- if not (kindIs "invalid" $v.maxFailedIndexes) }}{{ $_ := set $policy "maxFailedIndexes" (int $v.maxFailedIndexes) }}{{ end -}}
{{- with $v.podFailurePolicy }}{{ $_ := set $policy "podFailurePolicy" . }}{{ end -}}
{{- with $v.activeDeadlineSeconds }}{{ $_ := set $policy "activeDeadlineSeconds" (int .) }}{{ end -}}
{{- include "trajflow.mustToYaml" $policy -}}
{{- end -}}

{{/*
Fails the render on podFailurePolicy rules the API server would refuse at install time and
the schema cannot express: exit codes out of order, a container the pod does not have.
Takes (dict "context" $ "spec" <the Job spec with its template>).
*/}}
{{- define "trajflow.checkPodFailurePolicy" -}}
{{- $names := list -}}
{{- range concat (.spec.template.spec.containers | default list) (.spec.template.spec.initContainers | default list) -}}
{{- $names = append $names .name -}}
{{- end -}}
{{- $chart := .context.Chart.Name -}}
{{- range $i, $rule := (.spec.podFailurePolicy | default dict).rules | default list -}}
{{- with $rule.onExitCodes -}}
{{- $last := -1 -}}
{{- range .values -}}
{{- if le (int .) $last -}}
{{- fail (printf "%s.podFailurePolicy.rules[%d].onExitCodes.values must be in increasing order, without repeats" $chart $i) -}}
{{- end -}}
{{- $last = int . -}}
{{- end -}}
{{- if and .containerName (not (has .containerName $names)) -}}
{{- fail (printf "%s.podFailurePolicy.rules[%d].onExitCodes.containerName %q is none of the pod's containers (%s)" $chart $i .containerName (join ", " $names)) -}}
{{- end -}}
{{- end -}}
{{- end -}}
{{- end -}}

{{/*
Metadata of a stage's Job (or PyTorchJob): the user's jobLabels and jobAnnotations (a
queue's label, such as Kueue's kueue.x-k8s.io/queue-name), under the chart's own. Metadata
is not part of the Job's hash: changing them patches the running Job (where Kueue allows it).
Takes (dict "context" $ "name" "x").
*/}}
{{- define "trajflow.jobMetadata" -}}
{{- $ctx := .context -}}
{{- $annotations := mustMergeOverwrite (deepCopy ($ctx.Values.jobAnnotations | default dict)) (include "trajflow.argocdAnnotations" $ctx | fromYaml) (include "trajflow.scanAnnotations" $ctx | fromYaml) -}}
{{- include "trajflow.metadata" (dict "context" $ctx "name" .name "annotations" $annotations "labels" $ctx.Values.jobLabels) -}}
{{- end -}}

{{/*
An Indexed Job. Takes (dict "context" $ "completions" N "parallelism" P "podTemplate"
<dict>). The name's hash covers the spec fields Kubernetes does not
let an update change (template, completions, completionMode, backoffLimitPerIndex,
podFailurePolicy, podReplacementPolicy); the ones it does (parallelism, activeDeadlineSeconds,
maxFailedIndexes, ttlSecondsAfterFinished: see ValidateJobSpecUpdate) stay out of it, so
an upgrade that changes only those patches the running Job instead of replacing it.
*/}}
{{- define "trajflow.indexedJob" -}}
{{- $ctx := .context -}}
{{- $global := include "trajflow.global" $ctx | fromYaml -}}
{{- $immutable := include "trajflow.jobPolicy" $ctx | fromYaml -}}
{{- $mutable := dict -}}
{{- range (list "activeDeadlineSeconds" "maxFailedIndexes") -}}
{{- if hasKey $immutable . }}{{ $_ := set $mutable . (get $immutable .) }}{{ $_ := unset $immutable . }}{{ end -}}
{{- end -}}
{{- $_ := set $immutable "completionMode" "Indexed" -}}
{{- $_ := set $immutable "completions" (int .completions) -}}
{{- if and (hasKey $mutable "maxFailedIndexes") (gt (int $mutable.maxFailedIndexes) (int .completions)) -}}
{{- fail (printf "%s.maxFailedIndexes (%d) cannot exceed the Job's %d completions" $ctx.Chart.Name (int $mutable.maxFailedIndexes) (int .completions)) -}}
{{- end -}}
{{- $_ := set $immutable "template" .podTemplate -}}
{{- include "trajflow.checkPodFailurePolicy" (dict "context" $ctx "spec" $immutable) -}}
{{- $name := include "trajflow.jobName" (dict "context" $ctx "spec" $immutable) -}}
{{- $spec := mustMergeOverwrite (deepCopy $immutable) $mutable -}}
{{- $_ := set $spec "parallelism" (int .parallelism) -}}
{{- if and (not $global.argocd.enabled) (not (kindIs "invalid" $ctx.Values.ttlSecondsAfterFinished)) -}}
{{- $_ := set $spec "ttlSecondsAfterFinished" (int $ctx.Values.ttlSecondsAfterFinished) -}}
{{- end -}}
apiVersion: batch/v1
kind: Job
metadata:
  {{- include "trajflow.jobMetadata" (dict "context" $ctx "name" $name) | nindent 2 }}
spec:
  {{- include "trajflow.mustToYaml" $spec | nindent 2 }}
{{- end -}}

{{/* A stage's ServiceAccount: no API token is mounted; annotations carry workload identity. */}}
{{- define "trajflow.serviceAccount" -}}
{{- if (.Values.serviceAccount | default dict).create -}}
apiVersion: v1
kind: ServiceAccount
metadata:
  {{- include "trajflow.metadata" (dict "context" . "name" (include "trajflow.serviceAccountName" .) "annotations" .Values.serviceAccount.annotations) | nindent 2 }}
automountServiceAccountToken: false
{{- end -}}
{{- end -}}

{{/* A Kubernetes quantity (500m, 2, 1.5Gi, 2e+11: a large number in a values file reaches
templates as a float printed so) as a number of its units; "" for a form not read here. */}}
{{- define "trajflow.quantity" -}}
{{- $text := toString . -}}
{{- $form := "^\\+?([0-9]+(\\.[0-9]*)?|\\.[0-9]+)(Ki|Mi|Gi|Ti|Pi|Ei|m|k|M|G|T|P|E)?$" -}}
{{- if regexMatch $form $text -}}
{{- $factors := dict "" 1.0 "m" 0.001 "k" 1e3 "M" 1e6 "G" 1e9 "T" 1e12 "P" 1e15 "E" 1e18 "Ki" 1024.0 "Mi" 1048576.0 "Gi" 1073741824.0 "Ti" 1099511627776.0 "Pi" 1125899906842624.0 "Ei" 1152921504606846976.0 -}}
{{- mulf (regexReplaceAll $form $text "${1}" | float64) (get $factors (regexReplaceAll $form $text "${3}")) -}}
{{- else if regexMatch "^\\+?([0-9]+(\\.[0-9]*)?|\\.[0-9]+)[eE][+-]?[0-9]+$" $text -}}
{{- float64 $text -}}
{{- end -}}
{{- end -}}

{{/*
Requests above their limits, which the API server refuses for every pod of the Job, after
helm has said yes (the Job then starts none): refused here, naming the key. So is a /dev/shm
larger than the memory limit, which the pod could never fill.
*/}}
{{- define "trajflow.validateResources" -}}
{{- range $key := list "resources" "waitResources" -}}
{{- $resources := get $.Values $key | default dict -}}
{{- $limits := $resources.limits | default dict -}}
{{- range $name, $request := ($resources.requests | default dict) -}}
{{- $limit := get $limits $name -}}
{{- /* GPUs have their own rule (trajflow.gpus) */ -}}
{{- if and (not (kindIs "invalid" $request)) (hasKey $limits $name) (not (kindIs "invalid" $limit)) (not (include "trajflow.isGpuResource" $name)) -}}
{{- $r := include "trajflow.quantity" $request -}}
{{- $l := include "trajflow.quantity" $limit -}}
{{- if and $r $l (gt (float64 $r) (float64 $l)) -}}
{{- fail (printf "%s.%s.requests.%s (%v) is more than %s.limits.%s (%v): Kubernetes refuses such pods, and the Job would start none; raise the limit or lower the request" $.Chart.Name $key $name $request $key $name $limit) -}}
{{- end -}}
{{- end -}}
{{- end -}}
{{- end -}}
{{- /* /dev/shm counts against the memory limit of the container writing it: that container
is OOM-killed before a larger shm fills (and the kubelet sizes the tmpfs no larger than the
pod's memory limit anyway) */ -}}
{{- $shm := .Values.shm | default dict -}}
{{- $memory := ((.Values.resources | default dict).limits | default dict).memory -}}
{{- if and $shm.enabled $shm.sizeLimit $memory -}}
{{- $size := include "trajflow.quantity" $shm.sizeLimit -}}
{{- $l := include "trajflow.quantity" $memory -}}
{{- if and $size $l (gt (float64 $size) (float64 $l)) -}}
{{- fail (printf "%s.shm.sizeLimit (%v) is more than %s.resources.limits.memory (%v): /dev/shm counts against that limit, so the container is OOM-killed before its shm fills; lower shm.sizeLimit or raise the limit" $.Chart.Name $shm.sizeLimit $.Chart.Name $memory) -}}
{{- end -}}
{{- end -}}
{{- end -}}

{{/* Storage settings a render cannot go on without; the values schema says the same earlier. */}}
{{- define "trajflow.validateStorage" -}}
{{- $storage := (include "trajflow.global" . | fromYaml).storage -}}
{{- if eq $storage.type "s3" -}}
{{- if not $storage.s3.bucket -}}
{{- fail "global.storage.s3.bucket is required when global.storage.type is s3" -}}
{{- end -}}
{{- else if eq $storage.type "filesystem" -}}
{{- if and (not $storage.pvc.create) (not $storage.pvc.existingClaim) -}}
{{- fail "global.storage.pvc.existingClaim is required when global.storage.pvc.create is false (the stages need a shared volume)" -}}
{{- end -}}
{{- /* `trajflow run` reads ~ as the user's home; a pod would read its own HOME (/tmp) while
the volume is mounted at /~/... */ -}}
{{- if hasPrefix "~" (toString $storage.filesystem.path) -}}
{{- fail (printf "global.storage.filesystem.path %q starts with ~: in the pods that is not your home directory but their own /tmp, and the data would stay in each pod; give the mount path, such as /data (a values file for trajflow run alone may keep ~)" (toString $storage.filesystem.path)) -}}
{{- end -}}
{{- /* the data volume may not land on, or hide, a mount of the pod's own (two volumes at one
path are refused; a parent such as /etc would hide the config and the image's files) */ -}}
{{- $data := include "trajflow.dataMountPath" . -}}
{{- range (list "/tmp" "/dev/shm" (include "trajflow.configDir" .)) -}}
{{- if or (eq $data .) (eq $data "/") (hasPrefix (printf "%s/" $data) .) -}}
{{- fail (printf "global.storage.filesystem.path %q would mount the data volume on or over %s, which the pods use themselves; choose another path such as /data" $data .) -}}
{{- end -}}
{{- end -}}
{{- else -}}
{{- fail (printf "global.storage.type must be filesystem or s3, got %q" $storage.type) -}}
{{- end -}}
{{- end -}}
