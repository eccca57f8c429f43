{{/* torchrun processes per pod: training.nprocPerNode, else the nvidia.com/gpu limit, else 1. */}}
{{- define "trajflow.training.nprocPerNode" -}}
{{- if not (kindIs "invalid" .Values.nprocPerNode) -}}
{{- int .Values.nprocPerNode -}}
{{- else -}}
{{- $gpus := int (dig "limits" "nvidia.com/gpu" 0 (.Values.resources | default dict)) -}}
{{- ternary $gpus 1 (gt $gpus 0) -}}
{{- end -}}
{{- end -}}

{{/* The headless Service whose name is the pods' subdomain. */}}
{{- define "trajflow.training.serviceName" -}}
{{- include "trajflow.fullname" . -}}
{{- end -}}

{{/*
torchrun arguments. Takes (dict "context" $ "endpoint" "host:port" "runId" "rdzv id").
c10d rendezvous: rank 0's pod hosts the store; a restarted pod rejoins under the same
hostname; --max-restarts bounds worker-group restarts.
*/}}
{{- define "trajflow.training.torchrunArgs" -}}
{{- $ctx := .context -}}
{{- $v := $ctx.Values -}}
- --nnodes={{ int $v.nodes }}
- --nproc-per-node={{ include "trajflow.training.nprocPerNode" $ctx }}
- --rdzv-backend=c10d
- --rdzv-endpoint={{ .endpoint }}
- --rdzv-id={{ .rdzvId }}
- --rdzv-conf=join_timeout={{ int $v.rendezvous.joinTimeoutSeconds }}
- --max-restarts={{ int $v.maxRestarts }}
- --no-python
- trajflow
- train
- --config
- {{ include "trajflow.configPath" $ctx }}
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

{{/* The init container that holds a pod until every preprocessed shard is done. */}}
{{- define "trajflow.training.waitContainer" -}}
{{- $v := .Values -}}
{{- $shards := int $v.inputShards -}}
{{- toJson (dict
  "name" "wait-preprocess"
  "args" (list "wait" "--stage" "preprocess" "--shards" (printf "0-%d" (sub $shards 1)) "--timeout" ($v.waitTimeout | toString) "--config" (include "trajflow.configPath" .))
  "resources" $v.waitResources) -}}
{{- end -}}

{{- define "trajflow.training.validate" -}}
{{- include "trajflow.validateStorage" . -}}
{{- if not (has .Values.launcher (list "job" "pytorchjob")) -}}
{{- fail (printf "training.launcher must be job or pytorchjob, got %q" (toString .Values.launcher)) -}}
{{- end -}}
{{- if and (eq .Values.launcher "pytorchjob") (not (.Capabilities.APIVersions.Has "kubeflow.org/v1/PyTorchJob")) -}}
{{- fail "training.launcher is pytorchjob, but this cluster does not serve kubeflow.org/v1 PyTorchJob: install the Kubeflow training operator, use training.launcher=job, or (helm template) pass --api-versions kubeflow.org/v1/PyTorchJob" -}}
{{- end -}}
{{- end -}}
