{{/*
The alert rules, as the `groups:` list of a Prometheus rule file. The PrometheusRule
wraps them; the tests run them through `promtool check rules` and `promtool test rules`.

Series they use: trajflow's own (trajflow.metrics; pushed with job="trajflow" and labels
release/run/stage/shard, or scraped from training ranks with the same labels set by the
PodMonitor), and these external ones: kube-state-metrics `kube_job_failed`, DCGM
exporter `DCGM_FI_DEV_GPU_UTIL` / `DCGM_FI_DEV_FB_USED` / `DCGM_FI_DEV_FB_FREE`,
Prometheus' `up`, the Pushgateway's `push_time_seconds` / `push_failure_time_seconds`.
*/}}

{{/* Labels of one alert: severity, the release, then the user's additional labels. Takes (dict "context" $ "alert" $a). */}}
{{- define "monitoring.alertLabels" -}}
{{- $labels := dict "severity" .alert.severity "release" .context.Release.Name -}}
{{- include "trajflow.mustToYaml" (mustMergeOverwrite $labels (deepCopy (.context.Values.prometheusRule.additionalAlertLabels | default dict))) -}}
{{- end -}}

{{/* An alert's runbook_url annotation, when prometheusRule.runbookUrl is set: that URL with the alert's name appended. Takes (list $ "AlertName"). */}}
{{- define "monitoring.runbookUrl" -}}
{{- with (index . 0).Values.prometheusRule.runbookUrl -}}
runbook_url: {{ printf "%s%s" . (index $ 1) | quote }}
{{- end -}}
{{- end -}}

{{/*
The DCGM series of the watched pods, with the pod and namespace under the labels
`pod` and `namespace` whatever the exporter calls them. Takes (list $ "METRIC") or
(list $ "METRIC" "range_function" "window") for `range_function(METRIC{...}[window])`.
*/}}
{{- define "monitoring.dcgm" -}}
{{- $ctx := index . 0 -}}
{{- $metric := index . 1 -}}
{{- $podLabel := $ctx.Values.gpu.podLabel -}}
{{- $nsLabel := $ctx.Values.gpu.namespaceLabel -}}
{{- $expr := printf "%s{%s=%q, %s=~\"%s\"}" $metric $nsLabel $ctx.Release.Namespace $podLabel (include "monitoring.promqlRegex" (include "monitoring.gpuPodRegex" $ctx)) -}}
{{- if gt (len .) 2 -}}
{{- $expr = printf "%s(%s[%s])" (index . 2) $expr (index . 3) -}}
{{- end -}}
{{- if ne $nsLabel "namespace" -}}
{{- $expr = printf "label_replace(%s, \"namespace\", \"$1\", %q, \"(.+)\")" $expr $nsLabel -}}
{{- end -}}
{{- if ne $podLabel "pod" -}}
{{- $expr = printf "label_replace(%s, \"pod\", \"$1\", %q, \"(.+)\")" $expr $podLabel -}}
{{- end -}}
{{- $expr -}}
{{- end -}}

{{- define "monitoring.rules.pipeline" -}}
{{- $ctx := . -}}
{{- $rule := .Values.prometheusRule -}}
{{- $a := $rule.alerts -}}
{{- /* namespace kept: Alertmanager routes by it, and releases of two namespaces may share a runId */ -}}
{{- $byShard := "namespace, run, stage, shard" -}}
{{- $push := include "monitoring.sel" (list $ `job="trajflow"`) -}}
{{- $running := $rule.runningPushMaxAge -}}
{{- /* training ranks are scraped while they run; their pushed series (job="trajflow") are final values */ -}}
{{- $liveTrain := include "monitoring.sel" (list $ `stage="train"` `job!="trajflow"`) -}}
{{- $jobRe := include "monitoring.promqlRegex" (include "monitoring.jobNameRegex" .) -}}
{{- with $a.jobFailed }}{{ if .enabled }}
- alert: TrajflowJobFailed
  {{- /* not a Job that a newer one of its stage replaced: an upgrade that renames Jobs stops
  the old download pods on purpose (exit 2), and ArgoCD prunes the old Job only late */}}
  {{- $created := printf `label_replace(kube_job_created{namespace="%s", job_name=~"%s"}, "stage_job", "$1", "job_name", "%s")` $ctx.Release.Namespace $jobRe $jobRe }}
  expr: |
    max by (namespace, job_name) (
      kube_job_failed{namespace="{{ $ctx.Release.Namespace }}", job_name=~"{{ $jobRe }}", condition="true"}
    ) == 1
    unless on (namespace, job_name)
      (
          {{ $created }}
        < on (namespace, stage_job) group_left
          max by (namespace, stage_job) ({{ $created }})
      )
  for: {{ .for }}
  labels:
    {{- include "monitoring.alertLabels" (dict "context" $ctx "alert" .) | nindent 4 }}
  annotations:
    {{- include "monitoring.runbookUrl" (list $ctx "TrajflowJobFailed") | nindent 4 }}
    summary: {{ `Job {{ $labels.namespace }}/{{ $labels.job_name }} failed` | quote }}
    description: {{ `The Job has the Failed condition: a shard ran out of retries, a config error (exit 2) or divergence (exit 5) failed it, or its deadline passed. Look at its pods' exit codes with kubectl describe job {{ $labels.job_name }} -n {{ $labels.namespace }}; kubectl get job {{ $labels.job_name }} -n {{ $labels.namespace }} -o jsonpath='{.status.failedIndexes}' lists the failed shards. A Job that a newer Job of its stage replaced does not alert.` | quote }}
{{- end }}{{ end }}
{{- with $a.shardFailed }}{{ if .enabled }}
- alert: TrajflowShardFailed
  {{- /*
  With backoffLimitPerIndex, a Job is marked failed only once every index has ended: a
  shard out of retries at hour 1 of a long run would otherwise alert at its end. A retry
  pushes again (training forgets its group at its start), which ends the alert.
  */}}
  {{- /* per pushed group (a training pod's ranks push one each: a rank stopped by its failing
  sibling's SIGTERM must not hide that sibling), then per shard */}}
  expr: |
    max by ({{ $byShard }}) (
        (trajflow_stage_end_time_seconds{{ $push }} > 0)
      unless on ({{ $byShard }}, local_rank)
        (trajflow_stage_success{{ $push }} == 1)
      unless on ({{ $byShard }}, local_rank)
        {{- /* stopped by a signal (a deleted Job, a drained node, a preemption): nothing failed */}}
        (trajflow_stage_interrupted{{ $push }} == 1)
    )
  for: {{ .for }}
  labels:
    {{- include "monitoring.alertLabels" (dict "context" $ctx "alert" .) | nindent 4 }}
  annotations:
    {{- include "monitoring.runbookUrl" (list $ctx "TrajflowShardFailed") | nindent 4 }}
    summary: {{ `Stage {{ $labels.stage }} shard {{ $labels.shard }} of run {{ $labels.run }} failed` | quote }}
    description: {{ printf "The shard's last push says it ended without success, and no retry has pushed for %s: it is out of retries, failed in a way no retry changes (exit 2 config, 3 permanent, 5 diverged), or its retry waits for a node. Its Job is marked failed only once every other shard has ended. Why it failed is its log's last line: kubectl -n {{ $labels.namespace }} logs -l app.kubernetes.io/instance=%s,app.kubernetes.io/component={{ if eq $labels.stage \"download\" }}downloader{{ else if eq $labels.stage \"preprocess\" }}preprocessing{{ else }}training{{ end }},batch.kubernetes.io/job-completion-index={{ $labels.shard }} --prefix --tail=5" .for $ctx.Release.Name | quote }}
{{- end }}{{ end }}
{{- with $a.shardLost }}{{ if .enabled }}
- alert: TrajflowShardLost
  {{- /* a batch shard pushes while it runs and once at its end (a SIGTERM included): a
  group still running that stopped pushing lost its process with no word. Training pushes
  at its end only; its ranks are scraped */}}
  expr: |
    max by ({{ $byShard }}) (trajflow_stage_end_time_seconds{{ $push }} == 0)
    and on ({{ $byShard }})
    (time() - max by ({{ $byShard }}) (push_time_seconds{{ $push }})) > {{ include "monitoring.seconds" $running }}
  for: {{ .for }}
  labels:
    {{- include "monitoring.alertLabels" (dict "context" $ctx "alert" .) | nindent 4 }}
  annotations:
    {{- include "monitoring.runbookUrl" (list $ctx "TrajflowShardLost") | nindent 4 }}
    summary: {{ `Stage {{ $labels.stage }} shard {{ $labels.shard }} of run {{ $labels.run }} stopped pushing without finishing` | quote }}
    description: {{ printf "The shard's process stopped pushing over %s ago without its final push, and no retry has pushed since: it was killed by SIGKILL (OOMKilled: its memory limit; the grace period passed), its node was lost, or a native library hung it (its log then ends in 'Timeout' and thread stacks). A retry waiting for a node or an image also counts until it starts. kubectl -n {{ $labels.namespace }} get pods -l app.kubernetes.io/instance=%s,app.kubernetes.io/component={{ if eq $labels.stage \"download\" }}downloader{{ else }}preprocessing{{ end }},batch.kubernetes.io/job-completion-index={{ $labels.shard }} -o wide, then kubectl describe pod on them: State (Terminated) gives the reason and exit code." $running $ctx.Release.Name | quote }}
{{- end }}{{ end }}
{{- with $a.progressStalled }}{{ if .enabled }}
- alert: TrajflowProgressStalled
  expr: |
    (
        (
            (
                sum by ({{ $byShard }}) (increase(trajflow_download_bytes_total{{ include "monitoring.sel" (list $ctx) }}[{{ .window }}]))
              + sum by ({{ $byShard }}) (increase(trajflow_download_items_total{{ include "monitoring.sel" (list $ctx) }}[{{ .window }}]))
            )
          or
            sum by ({{ $byShard }}) (increase(trajflow_preprocess_trajectories_total{{ include "monitoring.sel" (list $ctx) }}[{{ .window }}]))
        ) == 0
      and on ({{ $byShard }})
        max by ({{ $byShard }}) (trajflow_stage_end_time_seconds{{ include "monitoring.sel" (list $ctx) }}) == 0
      and on ({{ $byShard }})
        max by ({{ $byShard }}) (changes(push_time_seconds{{ $push }}[{{ $running }}])) > 0
      and on ({{ $byShard }})
        (
            (
                min by ({{ $byShard }}) (time() - trajflow_stage_start_time_seconds{{ include "monitoring.sel" (list $ctx) }}) > {{ include "monitoring.seconds" .window }}
              unless on ({{ $byShard }})
                max by ({{ $byShard }}) (trajflow_download_items_planned{{ include "monitoring.sel" (list $ctx) }}) == 0
            )
          or
            {{- /* a download shard without its plan yet (the sources being listed, or its wait for the pod listing them) */}}
            (
                min by ({{ $byShard }}) (time() - trajflow_stage_start_time_seconds{{ include "monitoring.sel" (list $ctx) }}) > {{ include "monitoring.seconds" .startupWindow }}
              and on ({{ $byShard }})
                max by ({{ $byShard }}) (trajflow_download_items_planned{{ include "monitoring.sel" (list $ctx) }}) == 0
            )
        )
    )
    or
    (
        sum by ({{ $byShard }}) (increase(trajflow_train_steps_total{{ $liveTrain }}[{{ .window }}])) == 0
      and on ({{ $byShard }})
        max by ({{ $byShard }}) (trajflow_stage_end_time_seconds{{ $liveTrain }}) == 0
      and on ({{ $byShard }})
        (
            (time() - (max by ({{ $byShard }}) (trajflow_stage_last_progress_time_seconds{{ $liveTrain }}) > 0)) > {{ include "monitoring.seconds" .window }}
          or
            (
                min by ({{ $byShard }}) (time() - trajflow_stage_start_time_seconds{{ $liveTrain }}) > {{ include "monitoring.seconds" .startupWindow }}
              unless on ({{ $byShard }})
                max by ({{ $byShard }}) (trajflow_stage_last_progress_time_seconds{{ $liveTrain }}) > 0
            )
        )
    )
  for: {{ .for }}
  labels:
    {{- include "monitoring.alertLabels" (dict "context" $ctx "alert" .) | nindent 4 }}
  annotations:
    {{- include "monitoring.runbookUrl" (list $ctx "TrajflowProgressStalled") | nindent 4 }}
    summary: {{ printf "Stage {{ $labels.stage }} shard {{ $labels.shard }} of run {{ $labels.run }} made no progress for %s" .window | quote }}
    description: {{ printf "The shard is still running (it keeps pushing metrics and has not finished) but added no bytes, finished no items (moving already verified ones after a re-shard counts), added no trajectories and took no training steps in %s. A download shard without its plan (its sources being listed) counts from its start after %s; a training rank counts from its last progress (its data ready, a step, a validation pass), or from its start when its data is not ready %s after it. Look for a hung source, a stuck storage mount or a deadlocked process in its pod's log." .window .startupWindow .startupWindow | quote }}
{{- end }}{{ end }}
{{- with $a.downloadErrorRatio }}{{ if .enabled }}
- alert: TrajflowDownloadErrorRatioHigh
  expr: |
    (
        sum by (namespace, run) (rate(trajflow_download_failures_total{{ include "monitoring.sel" (list $ctx) }}[{{ .window }}]))
      /
        (
            sum by (namespace, run) (rate(trajflow_download_failures_total{{ include "monitoring.sel" (list $ctx) }}[{{ .window }}]))
          +
            (
                sum by (namespace, run) (rate(trajflow_download_items_total{{ include "monitoring.sel" (list $ctx `outcome="fetched"`) }}[{{ .window }}]))
              or
                0 * sum by (namespace, run) (rate(trajflow_download_failures_total{{ include "monitoring.sel" (list $ctx) }}[{{ .window }}]))
            )
        )
    ) > {{ .threshold }}
  for: {{ .for }}
  labels:
    {{- include "monitoring.alertLabels" (dict "context" $ctx "alert" .) | nindent 4 }}
  annotations:
    {{- include "monitoring.runbookUrl" (list $ctx "TrajflowDownloadErrorRatioHigh") | nindent 4 }}
    summary: {{ printf "{{ $value | humanizePercentage }} of the download attempts of run {{ $labels.run }} fail (threshold %v)" .threshold | quote }}
    description: {{ printf "Failed attempts / (failed attempts + fetched items) over %s. trajflow_download_failures_total by reason tells which source or error; a source that rate-limits or an expired credential is the usual cause." .window | quote }}
{{- end }}{{ end }}
{{- with $a.preprocessThroughputDrop }}{{ if .enabled }}
- alert: TrajflowPreprocessThroughputDropped
  expr: |
    (
        sum by ({{ $byShard }}) (rate(trajflow_preprocess_trajectories_total{{ include "monitoring.sel" (list $ctx) }}[{{ .window }}]))
      < {{ .ratio }} *
        sum by ({{ $byShard }}) (rate(trajflow_preprocess_trajectories_total{{ include "monitoring.sel" (list $ctx) }}[{{ .baseline }}] offset {{ .window }}))
    ) > 0
    and on ({{ $byShard }})
      max by ({{ $byShard }}) (trajflow_stage_end_time_seconds{{ include "monitoring.sel" (list $ctx `stage="preprocess"`) }}) == 0
  for: {{ .for }}
  labels:
    {{- include "monitoring.alertLabels" (dict "context" $ctx "alert" .) | nindent 4 }}
  annotations:
    {{- include "monitoring.runbookUrl" (list $ctx "TrajflowPreprocessThroughputDropped") | nindent 4 }}
    summary: {{ `Preprocessing shard {{ $labels.shard }} of run {{ $labels.run }} slowed to {{ $value | humanize }} trajectories/s` | quote }}
    description: {{ printf "The shard's rate over %s fell below %v of its rate in the %s before. A throttled GPU, a slower storage path or much longer trajectories are the usual causes; the dashboard's resample latency panel tells the device from the I/O." .window .ratio .baseline | quote }}
{{- end }}{{ end }}
{{- with $a.pushgatewayDown }}{{ if and .enabled $ctx.Values.pushgateway.enabled }}
{{- $up := printf "up{job=%q, namespace=%q}" (include "monitoring.pushgatewayName" $ctx) $ctx.Release.Namespace }}
- alert: TrajflowPushgatewayDown
  expr: |
    {{ $up }} == 0 or absent({{ $up }})
  for: {{ .for }}
  labels:
    {{- include "monitoring.alertLabels" (dict "context" $ctx "alert" .) | nindent 4 }}
  annotations:
    {{- include "monitoring.runbookUrl" (list $ctx "TrajflowPushgatewayDown") | nindent 4 }}
    summary: {{ `Prometheus cannot scrape the trajflow Pushgateway in {{ $labels.namespace }}` | quote }}
    description: {{ `The batch stages' metrics do not reach Prometheus, so the progress alerts are blind. The stages keep working (a failed push only logs a warning). Check the Pushgateway pod and the ServiceMonitor.` | quote }}
{{- end }}{{ end }}
{{- with $a.pushRejected }}{{ if .enabled }}
{{- include "monitoring.quietAfterFor" (dict "alert" "pushRejected" "rule" .) }}
- alert: TrajflowMetricsPushRejected
  expr: |
    push_failure_time_seconds{{ $push }} > push_time_seconds{{ $push }}
    and
      (time() - push_failure_time_seconds{{ $push }}) < {{ include "monitoring.seconds" .quietAfter }}
  for: {{ .for }}
  labels:
    {{- include "monitoring.alertLabels" (dict "context" $ctx "alert" .) | nindent 4 }}
  annotations:
    {{- include "monitoring.runbookUrl" (list $ctx "TrajflowMetricsPushRejected") | nindent 4 }}
    summary: {{ `The Pushgateway rejected the latest push of {{ $labels.stage }} shard {{ $labels.shard }} (run {{ $labels.run }})` | quote }}
    description: {{ printf "The group keeps its older values, so the progress alerts see a frozen shard. The Pushgateway's log names the cause (usually a metric pushed with another type or help text by a different trajflow version). A rejected push stops alerting %s after it (the stage is over)." .quietAfter | quote }}
{{- end }}{{ end }}
{{- end -}}

{{- define "monitoring.rules.gpu" -}}
{{- $ctx := . -}}
{{- $a := .Values.prometheusRule.alerts -}}
{{- with $a.gpuUnderused }}{{ if .enabled }}
- alert: TrajflowGpuUnderused
  expr: |
    avg by (namespace, pod) (
      {{ include "monitoring.dcgm" (list $ctx "DCGM_FI_DEV_GPU_UTIL" "avg_over_time" .window) }}
    ) < {{ .utilisationPercent }}
  for: {{ .for }}
  labels:
    {{- include "monitoring.alertLabels" (dict "context" $ctx "alert" .) | nindent 4 }}
  annotations:
    {{- include "monitoring.runbookUrl" (list $ctx "TrajflowGpuUnderused") | nindent 4 }}
    summary: {{ `GPUs of pod {{ $labels.namespace }}/{{ $labels.pod }} are {{ $value | humanize }}% busy` | quote }}
    description: {{ printf "Mean GPU utilisation stayed below %v%% (averaged over %s). The pod holds a GPU it barely uses: input starved (more loader workers, bigger batches), waiting for upstream shards, or over-provisioned." .utilisationPercent .window | quote }}
{{- end }}{{ end }}
{{- with $a.gpuMemoryNearFull }}{{ if .enabled }}
- alert: TrajflowGpuMemoryNearFull
  expr: |
    max by (namespace, pod) (
        {{ include "monitoring.dcgm" (list $ctx "DCGM_FI_DEV_FB_USED") }}
      /
        ({{ include "monitoring.dcgm" (list $ctx "DCGM_FI_DEV_FB_USED") }} + {{ include "monitoring.dcgm" (list $ctx "DCGM_FI_DEV_FB_FREE") }})
    ) > {{ .ratio }}
  for: {{ .for }}
  labels:
    {{- include "monitoring.alertLabels" (dict "context" $ctx "alert" .) | nindent 4 }}
  annotations:
    {{- include "monitoring.runbookUrl" (list $ctx "TrajflowGpuMemoryNearFull") | nindent 4 }}
    summary: {{ `GPU memory of pod {{ $labels.namespace }}/{{ $labels.pod }} is {{ $value | humanizePercentage }} full` | quote }}
    description: {{ printf "Framebuffer use stayed above %v of the total. The next larger batch or sequence risks an out-of-memory crash; lower preprocessing.config.batchSize or training.config.batchSize." .ratio | quote }}
{{- end }}{{ end }}
{{- end -}}

{{- define "monitoring.rules.training" -}}
{{- $ctx := . -}}
{{- $a := .Values.prometheusRule.alerts -}}
{{- $byShard := "namespace, run, stage, shard" -}}
{{- /* series scraped from running ranks; pushed ones (job="trajflow") are final values */ -}}
{{- $live := include "monitoring.sel" (list $ `stage="train"` `job!="trajflow"`) -}}
{{- $pushed := include "monitoring.sel" (list $ `stage="train"` `job="trajflow"`) -}}
{{- with $a.trainingLossNaN }}{{ if .enabled }}
{{- include "monitoring.quietAfterFor" (dict "alert" "trainingLossNaN" "rule" .) }}
{{- $loss := printf "trajflow_train_loss%s" (include "monitoring.sel" (list $ctx `stage="train"`)) }}
- alert: TrajflowTrainingLossNotFinite
  expr: |
    max by ({{ $byShard }}, split) (
        (({{ $loss }} != {{ $loss }}) or (abs({{ $loss }}) == Inf))
      unless on ({{ $byShard }}, local_rank, job)
        (time() - push_time_seconds{{ $pushed }}) > {{ include "monitoring.seconds" .quietAfter }}
    )
  for: {{ .for }}
  labels:
    {{- include "monitoring.alertLabels" (dict "context" $ctx "alert" .) | nindent 4 }}
  annotations:
    {{- include "monitoring.runbookUrl" (list $ctx "TrajflowTrainingLossNotFinite") | nindent 4 }}
    summary: {{ `Training loss ({{ $labels.split }}) of run {{ $labels.run }} is {{ $value }} on training pod {{ $labels.shard }}` | quote }}
    description: {{ printf "The model diverged. Lower the learning rate, tighten gradient clipping or check the resampled data for non-finite values, then resume from the last finite checkpoint. A rank's final pushed value stops alerting %s after the push." .quietAfter | quote }}
{{- end }}{{ end }}
{{- with $a.trainingLossPlateau }}{{ if .enabled }}
- alert: TrajflowTrainingLossNotImproving
  {{- /*
  Epochs are counted as steps of the epoch gauge between non-zero values, so a resumed
  process's jump from its unset 0 to the restored epoch is not a run of finished epochs;
  a best validation loss of 0 is unset (before the first validation of a process), and
  only a run still training (a live rank with end time 0) is judged.
  */}}
  expr: |
    max by (namespace, run) (changes((trajflow_train_epoch{{ $live }} > 0)[{{ .window }}:])) >= {{ .minEpochs }}
    and on (namespace, run)
      max by (namespace, run) (changes((trajflow_train_best_val_loss{{ $live }} > 0)[{{ .window }}:])) == 0
    and on (namespace, run)
      max by (namespace, run) (trajflow_stage_end_time_seconds{{ $live }}) == 0
  for: {{ .for }}
  labels:
    {{- include "monitoring.alertLabels" (dict "context" $ctx "alert" .) | nindent 4 }}
  annotations:
    {{- include "monitoring.runbookUrl" (list $ctx "TrajflowTrainingLossNotImproving") | nindent 4 }}
    summary: {{ `Validation loss of run {{ $labels.run }} stopped improving` | quote }}
    description: {{ printf "At least %v epochs finished in the last %s without a new best validation loss. Early stopping ends the run once its patience runs out; with it off, the GPUs are spent for nothing." (toString .minEpochs) .window | quote }}
{{- end }}{{ end }}
{{- with $a.checkpointTooOld }}{{ if .enabled }}
- alert: TrajflowCheckpointTooOld
  expr: |
    (
        time()
      - (
            max by (namespace, run) (trajflow_train_last_checkpoint_time_seconds{{ $live }}) > 0
          or
            max by (namespace, run) (trajflow_stage_start_time_seconds{{ $live }}) > 0
        )
    ) > {{ include "monitoring.seconds" .maxAge }}
    and on (namespace, run)
      max by (namespace, run) (trajflow_stage_end_time_seconds{{ $live }}) == 0
  for: {{ .for }}
  labels:
    {{- include "monitoring.alertLabels" (dict "context" $ctx "alert" .) | nindent 4 }}
  annotations:
    {{- include "monitoring.runbookUrl" (list $ctx "TrajflowCheckpointTooOld") | nindent 4 }}
    summary: {{ `The newest checkpoint of run {{ $labels.run }} is {{ $value | humanizeDuration }} old` | quote }}
    description: {{ printf "Training is running but has written no checkpoint for more than %s (counted from the start before the first one). A crash now loses that much work: check that rank 0 can write to the run root, or checkpoint more often (training.config.checkpoints.everySteps)." .maxAge | quote }}
{{- end }}{{ end }}
{{- with $a.trainingRestarted }}{{ if .enabled }}
- alert: TrajflowTrainingRestarted
  expr: |
    max by (namespace, run, shard) (changes(trajflow_train_restarts{{ $live }}[{{ .window }}])) > 0
  for: {{ .for }}
  labels:
    {{- include "monitoring.alertLabels" (dict "context" $ctx "alert" .) | nindent 4 }}
  annotations:
    {{- include "monitoring.runbookUrl" (list $ctx "TrajflowTrainingRestarted") | nindent 4 }}
    summary: {{ printf "The elastic agent of training node {{ $labels.shard }} (run {{ $labels.run }}) restarted its workers in the last %s" .window | quote }}
    description: {{ printf "A worker failed, or a node left or joined the rendezvous, and the group started again from the last checkpoint: a crash (its traceback in the pod log), a rank killed for memory, a collective that timed out on a hung or lost peer, or a training pod rescheduled. Each restart redoes the steps since that checkpoint; after training.maxRestarts the pod fails. kubectl -n {{ $labels.namespace }} logs -l app.kubernetes.io/instance=%s,app.kubernetes.io/component=training,batch.kubernetes.io/job-completion-index={{ $labels.shard }} --prefix shows the first failure." $ctx.Release.Name | quote }}
{{- end }}{{ end }}
{{- end -}}

{{/* The rule groups; a group whose alerts are all disabled is left out. */}}
{{- define "monitoring.ruleGroups" -}}
{{- $ctx := . -}}
{{- range $group := list (list "trajflow-pipeline" "monitoring.rules.pipeline") (list "trajflow-gpu" "monitoring.rules.gpu") (list "trajflow-training" "monitoring.rules.training") }}
{{- $rules := include (index $group 1) $ctx | trim }}
{{- if $rules }}
- name: {{ index $group 0 }}
  rules:
    {{- $rules | nindent 4 }}
{{- end }}
{{- end }}
{{- end -}}
