{{/* Training processes (local ranks) per pod: training.nprocPerNode, else the nvidia.com/gpu limit, else 1. */}}
{{- define "trajflow.training.nprocPerNode" -}}
{{- if not (kindIs "invalid" .Values.nprocPerNode) -}}
{{- int .Values.nprocPerNode -}}
{{- else -}}
{{- $gpus := include "trajflow.gpus" . | int -}}
{{- ternary $gpus 1 (gt $gpus 0) -}}
{{- end -}}
{{- end -}}

{{/* The headless Service whose name is the pods' subdomain. */}}
{{- define "trajflow.training.serviceName" -}}
{{- include "trajflow.fullname" . -}}
{{- end -}}

{{/*
Arguments of `trajflow train` as the elastic launcher (torchrun's agent run in-process).
Plain torchrun exits 1 whatever its workers did; the launcher exits with the workers'
decisive code (2 config, 3 permanent, 5 diverged...), so the Job's podFailurePolicy sees it
(a PyTorchJob's OnFailure policy retries every code up to runPolicy.backoffLimit). Takes
(dict "context" $ "endpoint" "host:port" "rdzvId" "rendezvous id"). c10d rendezvous: the
pod named by the endpoint hosts the store; --max-restarts bounds worker-group restarts;
--local-addr is the pod IP (the container needs the `trajflow.training.podIpEnv`
variable), so reaching the workers' store needs no DNS record of the pod.
*/}}
{{- define "trajflow.training.launcherArgs" -}}
{{- $ctx := .context -}}
{{- $v := $ctx.Values -}}
- train
- --config
- {{ include "trajflow.configPath" $ctx }}
- --nnodes={{ int $v.nodes }}
- --nproc-per-node={{ include "trajflow.training.nprocPerNode" $ctx }}
- --rdzv-backend=c10d
- --rdzv-endpoint={{ .endpoint }}
- --rdzv-id={{ .rdzvId }}
- --rdzv-conf=join_timeout={{ int $v.rendezvous.joinTimeoutSeconds }},read_timeout={{ int $v.rendezvous.joinTimeoutSeconds }}
- --max-restarts={{ int $v.maxRestarts }}
- --local-addr=$(POD_IP)
{{- end -}}

{{/*
How long the launcher gives its workers to stop after SIGTERM before it kills them: the
pod's grace period less 15 s for the launcher's own exit (torch's default is 30 s, however
long the grace period).
*/}}
{{- define "trajflow.training.shutdownEnv" -}}
{{- toJson (dict "name" "TORCH_ELASTIC_SHUTDOWN_TIMEOUT" "value" (toString (sub (int .Values.terminationGracePeriodSeconds) 15))) -}}
{{- end -}}

{{/* The pod's IP (`POD_IP`), the address the launcher gives the other nodes. */}}
{{- define "trajflow.training.podIpEnv" -}}
{{- toJson (dict "name" "POD_IP" "valueFrom" (dict "fieldRef" (dict "fieldPath" "status.podIP"))) -}}
{{- end -}}

{{/*
Container ports: the rendezvous store and, when the config serves it, /metrics of each
local rank (`metrics` for local rank 0 at config.metricsPort, `metrics-<i>` at port + i).
*/}}
{{- define "trajflow.training.ports" -}}
{{- $v := .context.Values -}}
- name: {{ .rdzvPortName }}
  containerPort: {{ int $v.rendezvous.port }}
  protocol: TCP
{{- $metricsPort := int (dig "metricsPort" 0 ($v.config | default dict)) }}
{{- if gt $metricsPort 0 }}
{{- range $rank := until (int (include "trajflow.training.nprocPerNode" .context)) }}
- name: {{ ternary "metrics" (printf "metrics-%d" $rank) (eq $rank 0) }}
  containerPort: {{ add $metricsPort $rank }}
  protocol: TCP
{{- end }}
{{- end }}
{{- end -}}

{{/* The init container: refuses a training config the workers would refuse (exit 2, before the
wait), then holds the pod until every preprocessed shard is done. */}}
{{- define "trajflow.training.waitContainer" -}}
{{- $v := .Values -}}
{{- $shards := int $v.inputShards -}}
{{- toJson (dict
  "name" "wait-preprocess"
  "args" (list "wait" "--stage" "preprocess" "--shards" (printf "0-%d" (sub $shards 1)) "--expect-shards" ($shards | toString) "--timeout" (include "trajflow.waitTimeout" $v.waitTimeout) "--config" (include "trajflow.configPath" .) "--check-config" "training")
  "resources" $v.waitResources) -}}
{{- end -}}

{{- define "trajflow.training.validate" -}}
{{- include "trajflow.validateStorage" . -}}
{{- include "trajflow.validateResources" . -}}
{{- if not (has .Values.launcher (list "job" "pytorchjob")) -}}
{{- fail (printf "training.launcher must be job or pytorchjob, got %q" (toString .Values.launcher)) -}}
{{- end -}}
{{- if and (eq .Values.launcher "pytorchjob") (not (.Capabilities.APIVersions.Has "kubeflow.org/v1/PyTorchJob")) -}}
{{- fail "training.launcher is pytorchjob, but this cluster does not serve kubeflow.org/v1 PyTorchJob: install the Kubeflow training operator, use training.launcher=job, or (helm template) pass --api-versions kubeflow.org/v1/PyTorchJob" -}}
{{- end -}}
{{- /* each local rank drives the GPU of its LOCAL_RANK */ -}}
{{- $gpus := include "trajflow.gpus" . | int -}}
{{- $device := dig "device" "auto" (.Values.config | default dict) -}}
{{- if and (gt $gpus 0) (not (kindIs "invalid" .Values.nprocPerNode)) (ne $device "cpu") -}}
{{- $nproc := int .Values.nprocPerNode -}}
{{- if gt $nproc $gpus -}}
{{- fail (printf "training.nprocPerNode is %d, but each training pod has %d GPU(s) (resources.limits.nvidia.com/gpu): %d local rank(s) would have no GPU. Set nprocPerNode to %d or null (which follows the limit), or raise the limit" $nproc $gpus (sub $nproc $gpus) $gpus) -}}
{{- else if lt $nproc $gpus -}}
{{- fail (printf "training.nprocPerNode is %d, but each training pod has %d GPUs (resources.limits.nvidia.com/gpu): %d would sit idle. Set nprocPerNode to %d or null (which follows the limit), or lower the limit" $nproc $gpus (sub $gpus $nproc) $gpus) -}}
{{- end -}}
{{- end -}}
{{- $metricsPort := int (dig "metricsPort" 0 (.Values.config | default dict)) -}}
{{- if gt $metricsPort 0 -}}
{{- $last := sub (add $metricsPort (int (include "trajflow.training.nprocPerNode" .))) 1 -}}
{{- if gt $last 65535 -}}
{{- fail (printf "training.config.metricsPort %d: local rank i serves port + i, and the last local rank's port %d is over 65535" $metricsPort $last) -}}
{{- end -}}
{{- $rdzv := int .Values.rendezvous.port -}}
{{- if and (ge $rdzv $metricsPort) (le $rdzv $last) -}}
{{- fail (printf "training.rendezvous.port %d is one of the /metrics ports %d-%d (training.config.metricsPort + local rank)" $rdzv $metricsPort $last) -}}
{{- end -}}
{{- end -}}
{{- end -}}
