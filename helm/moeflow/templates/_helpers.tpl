{{/* Name prefix of every object: the release name unless fullnameOverride is set. */}}
{{- define "moeflow.fullname" -}}
{{- .Values.fullnameOverride | default .Release.Name | trunc 40 | trimSuffix "-" -}}
{{- end }}

{{/* Labels common to every object. */}}
{{- define "moeflow.labels" -}}
app.kubernetes.io/name: moeflow
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version }}
{{- end }}

{{/* The moeflow job image. */}}
{{- define "moeflow.image" -}}
{{- printf "%s:%s" .Values.image.repository .Values.image.tag -}}
{{- end }}

{{/* Secret holding the S3 (and MLflow client) credentials of jobs, flow runs, MLflow and MinIO. */}}
{{- define "moeflow.credentialsSecret" -}}
{{- .Values.s3.existingSecret | default (printf "%s-credentials" (include "moeflow.fullname" .)) -}}
{{- end }}

{{/* Secret holding the Prefect API credential (key PREFECT_API_AUTH_STRING) of the server and its clients. */}}
{{- define "moeflow.prefectAuthSecret" -}}
{{- .Values.prefect.auth.existingSecret | default (printf "%s-prefect-auth" (include "moeflow.fullname" .)) -}}
{{- end }}

{{/*
One env entry that reads the Prefect API credential from its Secret, never a plain value. Call with
(dict "ctx" $ "name" VARIABLE): PREFECT_SERVER_API_AUTH_STRING on the server, PREFECT_API_AUTH_STRING on clients.
*/}}
{{- define "moeflow.prefectAuthEnv" -}}
- name: {{ .name }}
  valueFrom:
    secretKeyRef:
      name: {{ include "moeflow.prefectAuthSecret" .ctx }}
      key: PREFECT_API_AUTH_STRING
{{- end }}

{{/* A NetworkPolicy peer: the pods of one component of this release. Call with (dict "ctx" $ "component" NAME). */}}
{{- define "moeflow.componentPeer" -}}
- podSelector:
    matchLabels:
      app.kubernetes.io/instance: {{ .ctx.Release.Name }}
      app.kubernetes.io/component: {{ .component }}
{{- end }}

{{/*
A NetworkPolicy peer: the stage Jobs' pods, which the Kubernetes launcher (infra/launch/kubernetes.py) starts
in this namespace labelled name=moeflow, component=stage-job. They never call the Prefect API.
*/}}
{{- define "moeflow.stageJobPeer" -}}
- podSelector:
    matchLabels:
      app.kubernetes.io/name: moeflow
      app.kubernetes.io/component: stage-job
{{- end }}

{{/* The S3 endpoint everyone uses: the external one, else the chart's MinIO, else AWS (empty). */}}
{{- define "moeflow.s3Endpoint" -}}
{{- if .Values.s3.endpoint -}}
{{- .Values.s3.endpoint -}}
{{- else if .Values.minio.enabled -}}
{{- printf "http://%s-minio.%s.svc:9000" (include "moeflow.fullname" .) .Release.Namespace -}}
{{- end -}}
{{- end }}

{{- define "moeflow.postgresHost" -}}
{{- if .Values.postgresql.enabled -}}
{{- printf "%s-postgresql.%s.svc" (include "moeflow.fullname" .) .Release.Namespace -}}
{{- else -}}
{{- required "postgresql.external.host is required when postgresql.enabled is false" .Values.postgresql.external.host -}}
{{- end -}}
{{- end }}

{{/*
A secret value that survives upgrades: the value given in values, else the one already in the cluster's
Secret, else a new random one. Call with (dict "ctx" $ "secret" NAME "key" KEY "value" VALUE).
*/}}
{{- define "moeflow.secretValue" -}}
{{- $existing := (lookup "v1" "Secret" .ctx.Release.Namespace .secret) | default dict -}}
{{- $data := $existing.data | default dict -}}
{{- if .value -}}
{{- .value -}}
{{- else if hasKey $data .key -}}
{{- index $data .key | b64dec -}}
{{- else -}}
{{- randAlphaNum 32 -}}
{{- end -}}
{{- end }}

{{/* Pod security context: the Pod Security Standards "restricted" profile. Call with a uid. */}}
{{- define "moeflow.podSecurity" -}}
runAsNonRoot: true
runAsUser: {{ . }}
runAsGroup: {{ . }}
fsGroup: {{ . }}
seccompProfile:
  type: RuntimeDefault
{{- end }}

{{/* Container security context: restricted, read-only root filesystem. */}}
{{- define "moeflow.containerSecurity" -}}
allowPrivilegeEscalation: false
privileged: false
readOnlyRootFilesystem: true
runAsNonRoot: true
capabilities:
  drop: ["ALL"]
seccompProfile:
  type: RuntimeDefault
{{- end }}

{{/* imagePullSecrets of every pod. */}}
{{- define "moeflow.pullSecrets" -}}
{{- with .Values.imagePullSecrets -}}
imagePullSecrets:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- end }}
