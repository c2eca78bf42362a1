{{/*
Base name of the resources: "appconn" unless overridden.
*/}}
{{- define "appconn.name" -}}
{{- default "appconn" .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/*
Full name: fullnameOverride, else the release name when it already says "appconn" (so the usual
`helm install appconn ...` gives resources named plainly "appconn"), else "<release>-appconn".
*/}}
{{- define "appconn.fullname" -}}
{{- if .Values.fullnameOverride }}
{{- .Values.fullnameOverride | trunc 63 | trimSuffix "-" }}
{{- else }}
{{- $name := include "appconn.name" . }}
{{- if contains $name .Release.Name }}
{{- .Release.Name | trunc 63 | trimSuffix "-" }}
{{- else }}
{{- printf "%s-%s" .Release.Name $name | trunc 63 | trimSuffix "-" }}
{{- end }}
{{- end }}
{{- end }}

{{/*
Labels on every object. helm.sh/chart changes with every chart version, so it is not in the
selector labels (a Deployment's selector is immutable).
*/}}
{{- define "appconn.labels" -}}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{ include "appconn.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/part-of: appconn
app.kubernetes.io/managed-by: {{ .Release.Service }}
{{- end }}

{{- define "appconn.selectorLabels" -}}
app.kubernetes.io/name: {{ include "appconn.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end }}

{{- define "appconn.serviceAccountName" -}}
{{- if .Values.serviceAccount.create }}
{{- default (include "appconn.fullname" .) .Values.serviceAccount.name }}
{{- else }}
{{- required "serviceAccount.name is required when serviceAccount.create is false" .Values.serviceAccount.name }}
{{- end }}
{{- end }}

{{- define "appconn.image" -}}
{{- $tag := default .Chart.AppVersion .Values.image.tag }}
{{- if .Values.image.digest }}
{{- printf "%s:%s@%s" .Values.image.repository $tag .Values.image.digest }}
{{- else }}
{{- printf "%s:%s" .Values.image.repository $tag }}
{{- end }}
{{- end }}

{{/*
Leader election is on exactly when more than one replica runs: with one replica a Lease would
only add API writes, with more it is what keeps two pods from reconciling the same object.
*/}}
{{- define "appconn.leaderElect" -}}
{{- if gt (int .Values.replicaCount) 1 }}true{{ end }}
{{- end }}

{{- define "appconn.pvcName" -}}
{{- default (printf "%s-store" (include "appconn.fullname" .)) .Values.persistence.existingClaim }}
{{- end }}

{{/*
The kubernetes.io/tls Secret the store read API's certificate comes from.
*/}}
{{- define "appconn.storeApiTlsSecret" -}}
{{- default (printf "%s-store-api-tls" (include "appconn.fullname" .)) .Values.storeApi.tls.secretName }}
{{- end }}
