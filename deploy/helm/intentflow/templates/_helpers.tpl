{{/*
Names and labels.
*/}}
{{- define "intentflow.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{- define "intentflow.fullname" -}}
{{- if .Values.fullnameOverride -}}
{{- .Values.fullnameOverride | trunc 63 | trimSuffix "-" -}}
{{- else -}}
{{- $name := default .Chart.Name .Values.nameOverride -}}
{{- if contains $name .Release.Name -}}
{{- .Release.Name | trunc 63 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-%s" .Release.Name $name | trunc 63 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}
{{- end -}}

{{- define "intentflow.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{- define "intentflow.selectorLabels" -}}
app.kubernetes.io/name: {{ include "intentflow.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end -}}

{{- define "intentflow.labels" -}}
helm.sh/chart: {{ include "intentflow.chart" . }}
{{ include "intentflow.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/component: operator
{{- end -}}

{{- define "intentflow.serviceAccountName" -}}
{{- if .Values.serviceAccount.create -}}
{{- default (include "intentflow.fullname" .) .Values.serviceAccount.name -}}
{{- else -}}
{{- default "default" .Values.serviceAccount.name -}}
{{- end -}}
{{- end -}}

{{- define "intentflow.image" -}}
{{- printf "%s:%s" .Values.image.repository (default .Chart.AppVersion .Values.image.tag) -}}
{{- end -}}

{{/*
Paths inside the pod.
*/}}
{{- define "intentflow.configPath" -}}/etc/intentflow/intentflow.toml{{- end -}}
{{- define "intentflow.stateDir" -}}/var/lib/intentflow/state{{- end -}}
{{- define "intentflow.modelDir" -}}/var/lib/intentflow/model{{- end -}}

{{/*
The memory budget in MiB (values.yaml, `memory`):
  config.state_cache_mib (default 256) + memory.memtablesMiB (128) + memory.overheadMiB (256)
*/}}
{{- define "intentflow.stateCacheMiB" -}}
{{- $cache := 256 -}}
{{- $cfg := .Values.config | default dict -}}
{{- if and (hasKey $cfg "state_cache_mib") (not (kindIs "invalid" $cfg.state_cache_mib)) -}}
{{- $cache = int $cfg.state_cache_mib -}}
{{- end -}}
{{- $cache -}}
{{- end -}}

{{- define "intentflow.memoryRequestMiB" -}}
{{- add (include "intentflow.stateCacheMiB" . | int) (int .Values.memory.memtablesMiB) (int .Values.memory.overheadMiB) -}}
{{- end -}}

{{- define "intentflow.memoryLimitMiB" -}}
{{- add (include "intentflow.memoryRequestMiB" . | int) (int .Values.memory.limitHeadroomMiB) -}}
{{- end -}}

{{/*
The container's resources: `resources` with the memory of the budget, and the GPU.
*/}}
{{- define "intentflow.resources" -}}
{{- $requests := omit (.Values.resources.requests | default dict) "memory" -}}
{{- $_ := set $requests "memory" (printf "%sMi" (include "intentflow.memoryRequestMiB" .)) -}}
{{- $limits := omit (.Values.resources.limits | default dict) "memory" -}}
{{- $_ := set $limits "memory" (printf "%sMi" (include "intentflow.memoryLimitMiB" .)) -}}
{{- if .Values.gpu.enabled -}}
{{- $_ := set $limits .Values.gpu.resourceName (int .Values.gpu.count) -}}
{{- end -}}
{{- toYaml (dict "requests" $requests "limits" $limits) -}}
{{- end -}}

{{/*
The operator's configuration: `config` with the keys the chart owns.
*/}}
{{- define "intentflow.config" -}}
{{- $cfg := deepCopy (.Values.config | default dict) -}}
{{- if and (hasKey $cfg "instance_id") (not (kindIs "invalid" $cfg.instance_id)) -}}
{{- fail "config.instance_id must not be set: each pod's instance id is its pod name (INTENTFLOW_INSTANCE_ID)" -}}
{{- end -}}
{{- $_ := set $cfg "metrics_addr" (printf "0.0.0.0:%d" (int .Values.metrics.port)) -}}
{{- $_ := set $cfg "state_dir" (include "intentflow.stateDir" .) -}}
{{- $_ := set $cfg "model_dir" (include "intentflow.modelDir" .) -}}
{{- if .Values.gpu.enabled -}}
{{- $_ := set $cfg "device" "cuda" -}}
{{- end -}}
{{- toYaml $cfg -}}
{{- end -}}

{{/*
TOML rendering of a map (Helm's own toToml writes YAML's whole numbers as floats, `256.0`, which
the operator's integer keys refuse). A TOML key: bare when it can be, else quoted.
*/}}
{{- define "intentflow.tomlKey" -}}
{{- if regexMatch "^[A-Za-z0-9_-]+$" . -}}{{ . }}{{- else -}}{{ toJson . }}{{- end -}}
{{- end -}}

{{/* A TOML value: string, boolean, number (whole numbers as integers) or array of those. */}}
{{- define "intentflow.tomlValue" -}}
{{- $v := . -}}
{{- if kindIs "string" $v -}}
{{- toJson $v -}}
{{- else if kindIs "bool" $v -}}
{{- $v -}}
{{- else if or (kindIs "float64" $v) (kindIs "float32" $v) -}}
{{- if eq $v (floor $v) -}}{{- int64 $v -}}{{- else -}}{{- $v -}}{{- end -}}
{{- else if or (kindIs "int" $v) (kindIs "int64" $v) (kindIs "int32" $v) (kindIs "uint64" $v) -}}
{{- $v -}}
{{- else if kindIs "slice" $v -}}
[{{- range $i, $e := $v -}}{{- if $i -}}, {{ end -}}{{- include "intentflow.tomlValue" $e -}}{{- end -}}]
{{- else -}}
{{- fail (printf "config: %v (%s) has no TOML form here" $v (kindOf $v)) -}}
{{- end -}}
{{- end -}}

{{/*
A TOML table: its plain keys, then each sub-table under its own header. Null keys are left out;
a table without plain keys gets no header of its own. Values under [kafka.*] are strings, as
librdkafka properties are (`linger.ms: 5` is "linger.ms" = "5").
Argument: dict "path" (list of header keys) "table" (map).
*/}}
{{- define "intentflow.tomlTable" -}}
{{- $path := .path -}}
{{- $table := .table -}}
{{- $plain := list -}}
{{- range $k := keys $table | sortAlpha -}}
{{- $v := get $table $k -}}
{{- if not (or (kindIs "map" $v) (kindIs "invalid" $v)) -}}
{{- $plain = append $plain $k -}}
{{- end -}}
{{- end -}}
{{- if and $plain $path }}

[{{ join "." $path }}]
{{- end -}}
{{- $strings := and $path (eq (first $path) "kafka") -}}
{{- range $k := $plain }}
{{- $v := get $table $k }}
{{ include "intentflow.tomlKey" $k }} = {{ if and $strings (not (kindIs "string" $v)) }}{{ include "intentflow.tomlValue" $v | toJson }}{{ else }}{{ include "intentflow.tomlValue" $v }}{{ end }}
{{- end -}}
{{- range $k := keys $table | sortAlpha -}}
{{- $v := get $table $k -}}
{{- if kindIs "map" $v -}}
{{- include "intentflow.tomlTable" (dict "path" (append $path (include "intentflow.tomlKey" $k)) "table" $v) -}}
{{- end -}}
{{- end -}}
{{- end -}}

{{/*
The Kafka credentials Secret: the existing one, the one the chart creates, or none.
*/}}
{{- define "intentflow.kafkaSecretName" -}}
{{- if .Values.kafka.existingSecret -}}
{{- .Values.kafka.existingSecret -}}
{{- else if .Values.kafka.secret -}}
{{- printf "%s-kafka" (include "intentflow.fullname" .) -}}
{{- end -}}
{{- end -}}

{{/* The librdkafka properties the Secret holds: secretKeys of an existing one, else the keys of `secret`. */}}
{{- define "intentflow.kafkaSecretKeys" -}}
{{- if .Values.kafka.existingSecret -}}
{{- toJson (.Values.kafka.secretKeys | default list) -}}
{{- else -}}
{{- toJson (keys (.Values.kafka.secret | default dict) | sortAlpha) -}}
{{- end -}}
{{- end -}}

{{/*
The environment variable of the configuration layer for a `[kafka.common]` property:
sasl.password -> INTENTFLOW_KAFKA__COMMON__SASL_PASSWORD (each "." a "_", upper case).
*/}}
{{- define "intentflow.kafkaEnvName" -}}
{{- if not (regexMatch "^[a-z0-9]+(\\.[a-z0-9]+)*$" .) -}}
{{- fail (printf "kafka secret key %q: expected a librdkafka property name such as sasl.password (lower case, dot-separated)" .) -}}
{{- end -}}
{{- printf "INTENTFLOW_KAFKA__COMMON__%s" (. | replace "." "_" | upper) -}}
{{- end -}}
