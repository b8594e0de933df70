{{/*
Names and labels follow `helm create`: prompttrain.name, prompttrain.fullname, prompttrain.chart,
prompttrain.labels and prompttrain.selectorLabels; the component variants add app.kubernetes.io/component.
*/}}
{{- define "prompttrain.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{- define "prompttrain.fullname" -}}
{{- if .Values.fullnameOverride }}
{{- .Values.fullnameOverride | trunc 63 | trimSuffix "-" }}
{{- else }}
{{- $name := default .Chart.Name .Values.nameOverride }}
{{- if contains $name .Release.Name }}
{{- .Release.Name | trunc 63 | trimSuffix "-" }}
{{- else }}
{{- printf "%s-%s" .Release.Name $name | trunc 63 | trimSuffix "-" }}
{{- end }}
{{- end }}
{{- end }}

{{- define "prompttrain.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{- end }}

{{- define "prompttrain.labels" -}}
helm.sh/chart: {{ include "prompttrain.chart" . }}
{{ include "prompttrain.selectorLabels" . }}
{{- if .Chart.AppVersion }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
{{- end }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/part-of: prompttrain
{{- with .Values.commonLabels }}
{{ toYaml . }}
{{- end }}
{{- end }}

{{- define "prompttrain.selectorLabels" -}}
app.kubernetes.io/name: {{ include "prompttrain.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end }}

{{/* Usage: include "prompttrain.componentLabels" (dict "context" $ "component" "proxy") */}}
{{- define "prompttrain.componentLabels" -}}
{{ include "prompttrain.labels" .context }}
app.kubernetes.io/component: {{ .component }}
{{- end }}

{{- define "prompttrain.componentSelectorLabels" -}}
{{ include "prompttrain.selectorLabels" .context }}
app.kubernetes.io/component: {{ .component }}
{{- end }}

{{/* <fullname>-<component>, within the 63 characters of a DNS label. */}}
{{- define "prompttrain.componentName" -}}
{{- printf "%s-%s" (include "prompttrain.fullname" .context) .component | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* The ServiceAccount of a component: (dict "context" $ "component" "proxy" "serviceAccount" .Values.proxy.serviceAccount) */}}
{{- define "prompttrain.serviceAccountName" -}}
{{- if .serviceAccount.create }}
{{- default (include "prompttrain.componentName" .) .serviceAccount.name }}
{{- else }}
{{- default "default" .serviceAccount.name }}
{{- end }}
{{- end }}

{{/* An image reference: (dict "context" $ "image" .Values.proxy.image) */}}
{{- define "prompttrain.image" -}}
{{- $tag := .image.tag | default .context.Values.image.tag | default .context.Chart.AppVersion }}
{{- printf "%s:%s" .image.repository (toString $tag) }}
{{- end }}

{{- define "prompttrain.pullPolicy" -}}
{{- .image.pullPolicy | default .context.Values.image.pullPolicy }}
{{- end }}

{{/* The chart's own Secret: database URL, dashboard API key and encryption key where none is given. */}}
{{- define "prompttrain.secretName" -}}
{{- include "prompttrain.fullname" . }}
{{- end }}

{{- define "prompttrain.postgresql.fullname" -}}
{{- include "prompttrain.componentName" (dict "context" . "component" "postgresql") }}
{{- end }}

{{- define "prompttrain.postgresql.secretName" -}}
{{- .Values.postgresql.auth.existingSecret | default (include "prompttrain.postgresql.fullname" .) }}
{{- end }}

{{- define "prompttrain.postgresql.secretKey" -}}
{{- if .Values.postgresql.auth.existingSecret }}{{ .Values.postgresql.auth.existingSecretKey }}{{ else }}password{{ end }}
{{- end }}

{{/* Whether the chart stores the database URL in its own Secret. */}}
{{- define "prompttrain.database.inChartSecret" -}}
{{- if and (not .Values.postgresql.enabled) (not .Values.database.existingSecret) .Values.database.url }}true{{ end }}
{{- end }}

{{/* "hook" or "initContainer": how migrations run (see values.yaml migrations.strategy). */}}
{{- define "prompttrain.migrations.strategy" -}}
{{- if eq .Values.migrations.strategy "auto" }}
{{- if .Values.postgresql.enabled }}initContainer{{ else }}hook{{ end }}
{{- else }}
{{- .Values.migrations.strategy }}
{{- end }}
{{- end }}

{{/*
DATABASE_URL for a container. The evaluation PostgreSQL's URL is assembled by Kubernetes from the password
Secret ($(POSTGRES_PASSWORD) expands the variable defined just before it), so the password lives in one Secret.
Usage: include "prompttrain.databaseEnv" (dict "context" $ "secretName" "<override for the hook>")
*/}}
{{- define "prompttrain.databaseEnv" -}}
{{- $ := .context }}
{{- if $.Values.postgresql.enabled }}
- name: POSTGRES_PASSWORD
  valueFrom:
    secretKeyRef:
      name: {{ include "prompttrain.postgresql.secretName" $ }}
      key: {{ include "prompttrain.postgresql.secretKey" $ }}
- name: DATABASE_URL
  value: {{ printf "postgresql://%s:$(POSTGRES_PASSWORD)@%s:5432/%s" $.Values.postgresql.auth.username (include "prompttrain.postgresql.fullname" $) $.Values.postgresql.auth.database | quote }}
{{- else if $.Values.database.existingSecret }}
- name: DATABASE_URL
  valueFrom:
    secretKeyRef:
      name: {{ $.Values.database.existingSecret }}
      key: {{ $.Values.database.existingSecretKey }}
{{- else }}
- name: DATABASE_URL
  valueFrom:
    secretKeyRef:
      name: {{ .secretName | default (include "prompttrain.secretName" $) }}
      key: database-url
{{- end }}
{{- end }}

{{/* Whether the chart stores a dashboard API key: not open, no existing Secret, and not header-only access. */}}
{{- define "prompttrain.dashboard.keyInChartSecret" -}}
{{- $auth := .Values.dashboard.auth }}
{{- if and .Values.dashboard.enabled (not $auth.open) (not $auth.existingSecret) (or $auth.apiKey (not $auth.trustedHeader)) }}true{{ end }}
{{- end }}

{{/* The migration container: `prompttrain migrate` from the dashboard image (hook Job and init containers). */}}
{{- define "prompttrain.migrateContainer" -}}
- name: migrate
  image: {{ include "prompttrain.image" (dict "context" .context "image" .context.Values.dashboard.image) }}
  imagePullPolicy: {{ include "prompttrain.pullPolicy" (dict "context" .context "image" .context.Values.dashboard.image) }}
  args: ["migrate", "--wait", {{ .context.Values.migrations.waitSeconds | quote }}]
  env:
    {{- include "prompttrain.databaseEnv" . | nindent 4 }}
    - name: LOG_LEVEL
      value: {{ .context.Values.config.logLevel | quote }}
  securityContext:
    {{- toYaml .context.Values.securityContext | nindent 4 }}
  resources:
    {{- toYaml .context.Values.migrations.resources | nindent 4 }}
  volumeMounts:
    - name: tmp
      mountPath: /tmp
{{- end }}

{{/* Checks that stop an install with a clear message instead of pods that cannot start. */}}
{{- define "prompttrain.validate" -}}
{{- $sources := 0 }}
{{- if .Values.database.url }}{{ $sources = add1 $sources }}{{ end }}
{{- if .Values.database.existingSecret }}{{ $sources = add1 $sources }}{{ end }}
{{- if .Values.postgresql.enabled }}{{ $sources = add1 $sources }}{{ end }}
{{- if eq $sources 0 }}
{{- fail "\n\nprompttrain needs PostgreSQL: set database.url, database.existingSecret (a Secret with the postgresql:// URL), or postgresql.enabled=true for an evaluation database in the cluster." }}
{{- end }}
{{- if gt $sources 1 }}
{{- fail "\n\nprompttrain: choose one database: database.url, database.existingSecret or postgresql.enabled." }}
{{- end }}
{{- if and .Values.postgresql.enabled (eq .Values.migrations.strategy "hook") }}
{{- fail "\n\nprompttrain: migrations.strategy=hook cannot work with postgresql.enabled: pre-install hooks run before the evaluation PostgreSQL exists. Use auto or initContainer." }}
{{- end }}
{{- $auth := .Values.dashboard.auth }}
{{- if and $auth.open (or $auth.apiKey $auth.existingSecret $auth.trustedHeader) }}
{{- fail "\n\nprompttrain: dashboard.auth.open turns authentication off; it excludes apiKey, existingSecret and trustedHeader." }}
{{- end }}
{{- end }}
