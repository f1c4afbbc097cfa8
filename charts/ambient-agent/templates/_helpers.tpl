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

{{/* The schema already refuses an empty image.repository; this catches --skip-schema-validation. */}}
{{- define "ambient-agent.image" -}}
{{- $repo := required "image.repository must be set: the registry path of an image built from this repository's Dockerfile (there is no public image)" .Values.image.repository -}}
{{- printf "%s:%s" $repo (default .Chart.AppVersion .Values.image.tag) -}}
{{- end -}}

{{/* Name of the agent DaemonSet: its pods are <name>-xxxxx (istioCompatibility.daemonSetName). */}}
{{- define "ambient-agent.daemonSetName" -}}
{{- default (include "ambient-agent.fullname" .) .Values.istioCompatibility.daemonSetName | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{- define "ambient-agent.cniName" -}}
{{- printf "%s-cni" (include "ambient-agent.fullname" .) | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{- define "ambient-agent.cniServiceAccount" -}}
{{- if .Values.serviceAccount.cni.create -}}
{{- default (include "ambient-agent.cniName" .) .Values.serviceAccount.cni.name -}}
{{- else -}}
{{- required "serviceAccount.cni.name must name an existing service account when serviceAccount.cni.create is false" .Values.serviceAccount.cni.name -}}
{{- end -}}
{{- end -}}

{{/* The Secret holding the CNI plugin's service-account token. */}}
{{- define "ambient-agent.cniTokenSecret" -}}
{{- printf "%s-token" (include "ambient-agent.cniServiceAccount" .) | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{/*
Labels of a pod template, as one map so that no key appears twice (kustomize
and Flux reject duplicate keys). Later sources win: user podLabels, then the
Istio-compatibility labels, then what the chart relies on (the selector and
`istio.io/dataplane-mode: none`: the chart's own pods are never in the mesh).
Call with (dict "root" $ "selector" <selector yaml> "extra" <map> "istio" <map>).
*/}}
{{- define "ambient-agent.podLabels" -}}
{{- $root := .root -}}
{{- $labels := include "ambient-agent.labels" $root | fromYaml -}}
{{- $labels = mergeOverwrite $labels (.extra | default dict) (.istio | default dict) (.selector | fromYaml) (dict "istio.io/dataplane-mode" "none") -}}
{{- toYaml $labels -}}
{{- end -}}

{{/* Namespaces neither the agent nor the plugin enrols: excludeNamespaces (+ the release's). */}}
{{- define "ambient-agent.excludeNamespaces" -}}
{{- $ns := .Values.agent.excludeNamespaces | default list -}}
{{- if .Values.agent.excludeReleaseNamespace -}}
{{- $ns = append $ns .Release.Namespace -}}
{{- end -}}
{{- toJson (uniq $ns) -}}
{{- end -}}

{{- define "ambient-agent.cniBinDir" -}}
{{- if and (eq .Values.platform "gke") (eq .Values.installCni.cniBinDir "/opt/cni/bin") -}}
/home/kubernetes/bin
{{- else -}}
{{- .Values.installCni.cniBinDir -}}
{{- end -}}
{{- end -}}

{{/* "true" when the system-node-critical ResourceQuota is rendered. */}}
{{- define "ambient-agent.resourceQuotaEnabled" -}}
{{- if kindIs "invalid" .Values.resourceQuotas.enabled -}}
{{- and (eq .Values.platform "gke") (ne .Release.Namespace "kube-system") -}}
{{- else -}}
{{- .Values.resourceQuotas.enabled -}}
{{- end -}}
{{- end -}}

{{/*
allowPrivilegeEscalation of the agent container: a privileged container, or
one with SYS_ADMIN, can always escalate (the Kubernetes docs call `false`
with either contradictory, and the API refuses it with privileged), so it is
true then and false otherwise.
*/}}
{{- define "ambient-agent.agentAllowPrivilegeEscalation" -}}
{{- or .Values.agent.privileged (has "SYS_ADMIN" .Values.agent.capabilities) -}}
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
