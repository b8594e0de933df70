{{/* Resources that proxy and dashboard share the shape of. */}}

{{/* An Ingress: (dict "context" $ "component" "proxy" "ingress" .Values.proxy.ingress "port" 3000) */}}
{{- define "prompttrain.ingress" -}}
{{- $name := include "prompttrain.componentName" . }}
apiVersion: networking.k8s.io/v1
kind: Ingress
metadata:
  name: {{ $name }}
  namespace: {{ .context.Release.Namespace }}
  labels:
    {{- include "prompttrain.componentLabels" . | nindent 4 }}
  {{- with .ingress.annotations }}
  annotations:
    {{- toYaml . | nindent 4 }}
  {{- end }}
spec:
  {{- with .ingress.className }}
  ingressClassName: {{ . }}
  {{- end }}
  {{- with .ingress.tls }}
  tls:
    {{- range . }}
    - hosts:
        {{- range .hosts }}
        - {{ . | quote }}
        {{- end }}
      secretName: {{ .secretName }}
    {{- end }}
  {{- end }}
  rules:
    {{- range .ingress.hosts }}
    - host: {{ .host | quote }}
      http:
        paths:
          {{- range .paths }}
          - path: {{ .path }}
            pathType: {{ .pathType }}
            backend:
              service:
                name: {{ $name }}
                port:
                  name: http
          {{- end }}
    {{- end }}
{{- end }}

{{/* A ServiceMonitor scraping /metrics of a component's Service, on its port "http" unless "port" names another:
(dict "context" $ "component" "proxy"), (dict "context" $ "component" "operator" "port" "metrics") */}}
{{- define "prompttrain.serviceMonitor" -}}
apiVersion: monitoring.coreos.com/v1
kind: ServiceMonitor
metadata:
  name: {{ include "prompttrain.componentName" . }}
  namespace: {{ .context.Release.Namespace }}
  labels:
    {{- include "prompttrain.componentLabels" . | nindent 4 }}
    {{- with .context.Values.metrics.serviceMonitor.labels }}
    {{- toYaml . | nindent 4 }}
    {{- end }}
spec:
  selector:
    matchLabels:
      {{- include "prompttrain.componentSelectorLabels" . | nindent 6 }}
  namespaceSelector:
    matchNames: [{{ .context.Release.Namespace }}]
  endpoints:
    - port: {{ .port | default "http" }}
      path: /metrics
      interval: {{ .context.Values.metrics.serviceMonitor.interval }}
{{- end }}
