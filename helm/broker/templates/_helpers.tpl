{{/* Names ------------------------------------------------------------------------------- */}}

{{- define "broker.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{- define "broker.fullname" -}}
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

{{/* Used by the dev Redis: "<fullname>-redis", within 63 characters. */}}
{{- define "broker.redisDevName" -}}
{{- printf "%s-redis" (include "broker.fullname" . | trunc 57 | trimSuffix "-") -}}
{{- end -}}

{{- define "broker.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{- define "broker.serviceAccountName" -}}
{{- if .Values.serviceAccount.create -}}
{{- default (include "broker.fullname" .) .Values.serviceAccount.name -}}
{{- else -}}
{{- default "default" .Values.serviceAccount.name -}}
{{- end -}}
{{- end -}}

{{/* Labels ------------------------------------------------------------------------------ */}}

{{- define "broker.selectorLabels" -}}
app.kubernetes.io/name: {{ include "broker.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/component: server
{{- end -}}

{{- define "broker.labels" -}}
helm.sh/chart: {{ include "broker.chart" . }}
app.kubernetes.io/name: {{ include "broker.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/part-of: broker
{{- end -}}

{{- define "broker.redisDevSelectorLabels" -}}
app.kubernetes.io/name: {{ include "broker.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/component: redis-dev
{{- end -}}

{{/* The image ------------------------------------------------------------------------------ */}}

{{- define "broker.image" -}}
{{- if .Values.image.digest -}}
{{- printf "%s@%s" .Values.image.repository .Values.image.digest -}}
{{- else -}}
{{- printf "%s:%s" .Values.image.repository (default .Chart.AppVersion .Values.image.tag) -}}
{{- end -}}
{{- end -}}

{{/* Secrets: which Secret holds what ------------------------------------------------------- */}}

{{/* The Secret mounted at /etc/broker/secrets: yours (existingSecret) or the chart's. */}}
{{- define "broker.secretName" -}}
{{- default (include "broker.fullname" .) .Values.existingSecret -}}
{{- end -}}

{{/* "name key" of the Secret entry holding the Redis URL. */}}
{{- define "broker.redisUrlSecretRef" -}}
{{- if .Values.redis.existingSecret -}}
{{- printf "%s %s" .Values.redis.existingSecret .Values.redis.existingSecretKey -}}
{{- else if .Values.redis.dev.enabled -}}
{{- printf "%s redis-url" (include "broker.redisDevName" .) -}}
{{- else -}}
{{- printf "%s redis-url" (include "broker.secretName" .) -}}
{{- end -}}
{{- end -}}

{{/* True ("true") when no source of a Redis URL is configured at all. */}}
{{- define "broker.redisMissing" -}}
{{- if not (or .Values.redis.url .Values.redis.existingSecret .Values.redis.dev.enabled .Values.existingSecret) -}}true{{- end -}}
{{- end -}}

{{/* True when no source of encryption keys is configured. */}}
{{- define "broker.keysMissing" -}}
{{- if not (or .Values.encryptionKeys .Values.existingSecret) -}}true{{- end -}}
{{- end -}}

{{/* The dev Redis password: given, kept from the installed release, or new. Computed once per
     render and remembered, so the Redis config and the broker's URL always agree. */}}
{{- define "broker.redisDevPassword" -}}
{{- if not (hasKey .Values.redis.dev "_password") -}}
{{- $password := .Values.redis.dev.password -}}
{{- if not $password -}}
{{- $existing := lookup "v1" "Secret" .Release.Namespace (include "broker.redisDevName" .) -}}
{{- if and $existing $existing.data (hasKey $existing.data "password") -}}
{{- $password = index $existing.data "password" | b64dec -}}
{{- else -}}
{{- $password = randAlphaNum 32 -}}
{{- end -}}
{{- end -}}
{{- $_ := set .Values.redis.dev "_password" $password -}}
{{- end -}}
{{- index .Values.redis.dev "_password" -}}
{{- end -}}

{{/* Configuration ------------------------------------------------------------------------ */}}

{{/* public_url: given, or https://<first ingress host>. */}}
{{- define "broker.publicUrl" -}}
{{- if .Values.config.public_url -}}
{{- .Values.config.public_url | trimSuffix "/" -}}
{{- else if and .Values.ingress.enabled .Values.ingress.hosts -}}
{{- printf "https://%s" (first .Values.ingress.hosts) -}}
{{- end -}}
{{- end -}}

{{/* A TOML value from a YAML scalar or list: strings as JSON strings (valid TOML basic
     strings), whole numbers without a fraction (YAML numbers arrive as floats). */}}
{{- define "broker.tomlValue" -}}
{{- $kind := kindOf . -}}
{{- if eq $kind "string" -}}
{{- toJson . -}}
{{- else if eq $kind "bool" -}}
{{- . -}}
{{- else if has $kind (list "float64" "float32" "int" "int64" "int32") -}}
{{- if eq (float64 (int64 .)) (float64 .) -}}{{- int64 . -}}{{- else -}}{{- . -}}{{- end -}}
{{- else if eq $kind "slice" -}}
[{{- range $i, $item := . -}}{{- if $i }}, {{ end -}}{{- include "broker.tomlValue" $item -}}{{- end -}}]
{{- else -}}
{{- fail (printf "broker: cannot write a %s as a TOML value: %v" $kind .) -}}
{{- end -}}
{{- end -}}

{{/* Provider keys that belong to the chart, not to broker.toml. */}}
{{- define "broker.chartProviderKeys" -}}clientSecret public{{- end -}}

{{/* Does provider (dict "name" "p" "provider" {...}) get its secret from the mounted Secret? */}}
{{- define "broker.providerSecretFromFile" -}}
{{- $p := .provider -}}
{{- if not (or $p.public (hasKey $p "client_secret_env") (hasKey $p "client_secret_file")) -}}true{{- end -}}
{{- end -}}

{{/* Webhook keys that belong to the chart, not to broker.toml. */}}
{{- define "broker.chartWebhookKeys" -}}signingSecret{{- end -}}

{{/* broker.toml, without clients (those are in the Secret: clients.toml). */}}
{{- define "broker.toml" -}}
# broker.toml rendered by the {{ include "broker.chart" . }} chart; settings are described
# in docs/configuration.md. The pod appends clients.toml from the Secret at start-up.
host = "0.0.0.0"
port = {{ int .Values.containerPort }}
{{- with include "broker.publicUrl" . }}
public_url = {{ toJson . }}
{{- end }}
encryption_keys_file = "/etc/broker/secrets/encryption-keys"
{{- range $key, $value := .Values.config }}
{{- if and (ne $key "public_url") (not (kindIs "invalid" $value)) }}
{{ $key }} = {{ include "broker.tomlValue" $value }}
{{- end }}
{{- end }}
{{- range $name, $provider := .Values.providers }}

[providers.{{ $name }}]
{{- range $key, $value := $provider }}
{{- if and (not (has $key (splitList " " (include "broker.chartProviderKeys" $)))) (not (kindIs "invalid" $value)) }}
{{ $key }} = {{ include "broker.tomlValue" $value }}
{{- end }}
{{- end }}
{{- if include "broker.providerSecretFromFile" (dict "provider" $provider) }}
client_secret_file = {{ printf "/etc/broker/secrets/provider-%s-client-secret" $name | toJson }}
{{- end }}
{{- end }}
{{- range $hook := .Values.webhooks }}

[[webhooks]]
{{- range $key, $value := $hook }}
{{- if and (not (has $key (splitList " " (include "broker.chartWebhookKeys" $)))) (not (kindIs "invalid" $value)) }}
{{ $key }} = {{ include "broker.tomlValue" $value }}
{{- end }}
{{- end }}
secret_file = {{ printf "/etc/broker/secrets/webhook-%s-secret" $hook.name | toJson }}
{{- end }}
{{- end -}}

{{/* clients.toml: the [[clients]] tables (API key hashes). */}}
{{- define "broker.clientsToml" -}}
# [[clients]] of broker.toml, rendered by the {{ include "broker.chart" . }} chart.
{{- range .Values.clients }}

[[clients]]
name = {{ toJson .name }}
{{- if kindIs "string" .key_sha256 }}
key_sha256 = {{ .key_sha256 | lower | toJson }}
{{- else }}
key_sha256 = {{ include "broker.tomlValue" (.key_sha256 | join " " | lower | splitList " ") }}
{{- end }}
providers = {{ include "broker.tomlValue" .providers }}
permissions = {{ include "broker.tomlValue" .permissions }}
{{- with .user_ids }}
user_ids = {{ include "broker.tomlValue" . }}
{{- end }}
{{- with .rate_limit }}
rate_limit = { requests_per_second = {{ include "broker.tomlValue" .requests_per_second }}, burst = {{ include "broker.tomlValue" .burst }} }
{{- end }}
{{- end }}
{{- end -}}

{{/* Checks of combinations a schema cannot express; each failure names the values to fix. */}}
{{- define "broker.validate" -}}
{{- if and .Values.existingSecret .Values.redis.url -}}
{{- fail "broker: redis.url cannot be combined with existingSecret: put the URL in that Secret under the key redis-url, or name its own Secret in redis.existingSecret" -}}
{{- end -}}
{{- if and .Values.redis.dev.enabled (or .Values.redis.url .Values.redis.existingSecret) -}}
{{- fail "broker: redis.dev.enabled uses the in-chart dev Redis; unset redis.url and redis.existingSecret, or disable redis.dev" -}}
{{- end -}}
{{- if and .Values.existingSecret (or .Values.encryptionKeys .Values.clients) -}}
{{- fail "broker: with existingSecret, encryption keys and clients come from that Secret (keys encryption-keys and clients.toml): unset encryptionKeys and clients" -}}
{{- end -}}
{{- range $hook := .Values.webhooks -}}
{{- if and $.Values.existingSecret $hook.signingSecret -}}
{{- fail (printf "broker: webhooks %s: signingSecret cannot be used with existingSecret: put it in that Secret under webhook-%s-secret" $hook.name $hook.name) -}}
{{- end -}}
{{- if and (not $.Values.existingSecret) (not $hook.signingSecret) -}}
{{- fail (printf "broker: webhooks %s needs signingSecret (whsec_<base64>), or existingSecret" $hook.name) -}}
{{- end -}}
{{- end -}}
{{- range $name, $p := .Values.providers -}}
{{- if and $.Values.existingSecret $p.clientSecret -}}
{{- fail (printf "broker: providers.%s.clientSecret cannot be used with existingSecret: put it in that Secret under provider-%s-client-secret" $name $name) -}}
{{- end -}}
{{- if and (not $.Values.existingSecret) (include "broker.providerSecretFromFile" (dict "provider" $p)) (not $p.clientSecret) -}}
{{- fail (printf "broker: providers.%s needs clientSecret (or public: true for a public client, or existingSecret)" $name) -}}
{{- end -}}
{{- if and $p.public $p.clientSecret -}}
{{- fail (printf "broker: providers.%s is public: true and has a clientSecret; choose one" $name) -}}
{{- end -}}
{{- end -}}
{{- $drain := add (int .Values.preStopSleepSeconds) (int (default 15 .Values.config.shutdown_timeout)) -}}
{{- if lt (int .Values.terminationGracePeriodSeconds) (add $drain 5 | int) -}}
{{- fail (printf "broker: terminationGracePeriodSeconds (%d) must be at least preStopSleepSeconds + config.shutdown_timeout + 5 = %d, or the kubelet kills pods mid-drain" (int .Values.terminationGracePeriodSeconds) (add $drain 5)) -}}
{{- end -}}
{{- if and .Values.ingress.enabled (not .Values.ingress.hosts) -}}
{{- fail "broker: ingress.enabled needs at least one host in ingress.hosts" -}}
{{- end -}}
{{- if and .Values.ingress.enabled (not .Values.providers) -}}
{{- fail "broker: ingress.enabled exposes the OAuth callbacks of the providers, and none is configured" -}}
{{- end -}}
{{- end -}}

{{/* The runbook annotation of an alert: (dict "base" runbookBaseUrl "alert" name). Each alert
     has a section of docs/RUNBOOK.md whose heading is the alert's name. */}}
{{- define "broker.runbook" -}}
{{- if .base -}}
runbook_url: {{ printf "%s#%s" (.base | trimSuffix "/") (lower .alert) | quote }}
{{- else -}}
runbook: {{ printf "docs/RUNBOOK.md#%s" (lower .alert) | quote }}
{{- end -}}
{{- end -}}
