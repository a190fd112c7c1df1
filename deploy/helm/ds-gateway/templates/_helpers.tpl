{{/* Names and labels shared by every object of the release. */}}

{{- define "dsgw.fullname" -}}
{{- if contains .Chart.Name .Release.Name -}}
{{- .Release.Name | trunc 50 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-%s" .Release.Name .Chart.Name | trunc 50 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}

{{- define "dsgw.labels" -}}
app.kubernetes.io/name: {{ .Chart.Name }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version }}
{{- end -}}

{{/* Selector labels of one component: gateway, sink, source, migrate. */}}
{{- define "dsgw.selector" -}}
app.kubernetes.io/name: {{ .root.Chart.Name }}
app.kubernetes.io/instance: {{ .root.Release.Name }}
app.kubernetes.io/component: {{ .component }}
{{- end -}}

{{- define "dsgw.image" -}}
{{ .Values.image.repository }}:{{ .Values.image.tag | default .Chart.AppVersion }}
{{- end -}}

{{- define "dsgw.secretName" -}}
{{- .Values.existingSecret | default (printf "%s-secrets" (include "dsgw.fullname" .)) -}}
{{- end -}}

{{/* The environment every container gets: the ConfigMap and the Secret. */}}
{{- define "dsgw.envFrom" -}}
envFrom:
  - configMapRef:
      name: {{ include "dsgw.fullname" . }}-config
  - secretRef:
      name: {{ include "dsgw.secretName" . }}
{{- end -}}

{{/* Pod-level settings every pod shares. */}}
{{- define "dsgw.podSpec" -}}
securityContext:
  {{- toYaml .Values.podSecurityContext | nindent 2 }}
{{- with .Values.imagePullSecrets }}
imagePullSecrets:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- with .Values.nodeSelector }}
nodeSelector:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- with .Values.tolerations }}
tolerations:
  {{- toYaml . | nindent 2 }}
{{- end }}
volumes:
  # The root filesystem is read-only; temp files go here.
  - name: tmp
    emptyDir: {}
{{- end -}}

{{/* Container-level settings every container shares. */}}
{{- define "dsgw.container" -}}
image: {{ include "dsgw.image" . }}
imagePullPolicy: {{ .Values.image.pullPolicy }}
securityContext:
  {{- toYaml .Values.containerSecurityContext | nindent 2 }}
volumeMounts:
  - name: tmp
    mountPath: /tmp
{{ include "dsgw.envFrom" . }}
{{- end -}}
