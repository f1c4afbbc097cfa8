{{/* Chart name. */}}
{{- define "ambient-agent.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{/* Full name: release-chart unless the release already contains the chart name. */}}
{{- define "ambient-agent.fullname" -}}
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

{{- define "ambient-agent.caName" -}}
{{- printf "%s-ca" (include "ambient-agent.fullname" .) | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{- define "ambient-agent.labels" -}}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
app.kubernetes.io/name: {{ include "ambient-agent.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/part-of: ambient-agent
{{- end -}}

{{- define "ambient-agent.agentSelector" -}}
app.kubernetes.io/name: {{ include "ambient-agent.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/component: node-agent
{{- end -}}

{{- define "ambient-agent.caSelector" -}}
app.kubernetes.io/name: {{ include "ambient-agent.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/component: ca
{{- end -}}

{{- define "ambient-agent.agentServiceAccount" -}}
{{- if .Values.serviceAccount.agent.create -}}
{{- default (include "ambient-agent.fullname" .) .Values.serviceAccount.agent.name -}}
{{- else -}}
{{- default "default" .Values.serviceAccount.agent.name -}}
{{- end -}}
{{- end -}}

{{- define "ambient-agent.caServiceAccount" -}}
{{- if .Values.serviceAccount.ca.create -}}
{{- default (include "ambient-agent.caName" .) .Values.serviceAccount.ca.name -}}
{{- else -}}
{{- default "default" .Values.serviceAccount.ca.name -}}
{{- end -}}
{{- end -}}

{{- define "ambient-agent.image" -}}
{{- printf "%s:%s" .Values.image.repository (default .Chart.AppVersion .Values.image.tag) -}}
{{- end -}}

{{/* host:port of the CA the agents use. */}}
{{- define "ambient-agent.caAddress" -}}
{{- if .Values.caAddress -}}
{{- .Values.caAddress -}}
{{- else -}}
{{- printf "%s.%s.svc:%d" (include "ambient-agent.caName" .) .Release.Namespace (int .Values.ca.port) -}}
{{- end -}}
{{- end -}}

{{/*
Drain window on SIGTERM: agent.drainSeconds, or the termination grace period
minus 5 seconds (at least 1).
*/}}
{{- define "ambient-agent.drainSeconds" -}}
{{- if kindIs "invalid" .Values.agent.drainSeconds -}}
{{- max 1 (sub (int .Values.agent.terminationGracePeriodSeconds) 5) -}}
{{- else -}}
{{- .Values.agent.drainSeconds -}}
{{- end -}}
{{- end -}}
