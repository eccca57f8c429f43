{{/*
`global:` as every stage sees it. Helm copies the umbrella's `global` into each stage
chart; a stage chart rendered on its own (helm lint, helm template of one chart) has
none, so the defaults of trajflow.config.GlobalConfig are filled in here. A test keeps
these defaults equal to the model's and to the umbrella's values.yaml.
*/}}
{{- define "trajflow.globalDefaults" -}}
runId: default
imageRegistry: ""
imagePullSecrets: []
argocd:
  enabled: false
storage:
  type: filesystem
  filesystem:
    path: /data
  pvc:
    create: true
    existingClaim: ""
    storageClass: ""
    size: 100Gi
    accessModes:
      - ReadWriteMany
  s3:
    endpoint: ""
    bucket: ""
    prefix: ""
    region: us-east-1
    addressingStyle: path
    existingSecret: ""
  takeOverFrom: ""
metrics:
  pushgatewayUrl: ""
{{- end -}}

{{/* The effective `global` (YAML): the chart's values over the model defaults. */}}
{{- define "trajflow.global" -}}
{{- $defaults := include "trajflow.globalDefaults" . | fromYaml -}}
{{- $values := deepCopy (.Values.global | default dict) -}}
{{- $merged := mustMergeOverwrite $defaults $values -}}
{{- /* lists replace, they do not merge */ -}}
{{- if hasKey $values "imagePullSecrets" }}{{ $_ := set $merged "imagePullSecrets" $values.imagePullSecrets }}{{ end -}}
{{- include "trajflow.mustToYaml" $merged -}}
{{- end -}}

{{/* The in-release Pushgateway's URL (the monitoring chart deploys it). */}}
{{- define "trajflow.inReleasePushgatewayUrl" -}}
{{- printf "http://%s.%s.svc:9091" (include "trajflow.pushgatewayServiceName" .) .Release.Namespace -}}
{{- end -}}

{{/*
The Pushgateway the batch stages push to. `global.metrics.pushgatewayUrl` is rendered
with `tpl`, so values can point at the in-release Pushgateway without knowing the
release or namespace:
  pushgatewayUrl: '{{ include "trajflow.inReleasePushgatewayUrl" . }}'
Empty: the stages do not push.
*/}}
{{- define "trajflow.pushgatewayUrl" -}}
{{- $url := (include "trajflow.global" . | fromYaml).metrics.pushgatewayUrl | default "" -}}
{{- if $url -}}
{{- $rendered := tpl $url . -}}
{{- /* the schema lets a template through unchecked: what it renders to is checked here, with
formats.HTTP_URL as the pods check it (they would exit 2 at their start) */ -}}
{{- if not (regexMatch "^https?://(\\[[0-9A-Fa-f:.]+\\]|[^\\[\\]/?#@\\s:]+)(:(6553[0-5]|655[0-2][0-9]|65[0-4][0-9]{2}|6[0-4][0-9]{3}|[1-5][0-9]{4}|[1-9][0-9]{0,3}))?([/?#].*)?$" $rendered) -}}
{{- fail (printf "global.metrics.pushgatewayUrl renders to %q, which is not an http(s) URL with a host (the stages push nowhere else)" $rendered) -}}
{{- end -}}
{{- $rendered -}}
{{- end -}}
{{- end -}}

{{/* The run root every stage reads and writes, as NOTES and docs show it. */}}
{{- define "trajflow.runRoot" -}}
{{- $g := include "trajflow.global" . | fromYaml -}}
{{- if eq $g.storage.type "s3" -}}
{{- $prefix := trimAll "/" $g.storage.s3.prefix -}}
{{- if $prefix -}}
{{- printf "s3://%s/%s/%s" $g.storage.s3.bucket $prefix $g.runId -}}
{{- else -}}
{{- printf "s3://%s/%s" $g.storage.s3.bucket $g.runId -}}
{{- end -}}
{{- else -}}
{{- printf "file://%s/%s" (trimSuffix "/" $g.storage.filesystem.path) $g.runId -}}
{{- end -}}
{{- end -}}

{{/* toYaml that fails the render instead of writing nothing: Helm's toYaml returns "" when
its YAML writer refuses a value, as it does a string holding U+007F to U+009F, U+FFFE or
U+FFFF; a pod whose config came out empty would run on the defaults. */}}
{{- define "trajflow.mustToYaml" -}}
{{- $yaml := toYaml . -}}
{{- if not $yaml -}}
{{- fail "a value cannot be written as YAML: a string in it holds a character Helm's YAML writer refuses (U+007F to U+009F, U+FFFE or U+FFFF); remove it from the values (the template named above says which part)" -}}
{{- end -}}
{{- $yaml -}}
{{- end -}}
