{{/* Names and labels shared by every object of the release. */}}
{{- define "ukgpu.fullname" -}}
{{- printf "%s-ukgpu" .Release.Name | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{- define "ukgpu.selectorLabels" -}}
app.kubernetes.io/name: ukgpu
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end -}}

{{- define "ukgpu.labels" -}}
{{ include "ukgpu.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version }}
{{- end -}}

{{/* repo@digest: the exported image exactly, never a moving tag. */}}
{{- define "ukgpu.bootImage" -}}
{{- $repo := required "repository.boot: the registry repository the boot image was pushed to" .Values.repository.boot -}}
{{- $digest := required "images.boot: the boot image's digest (pass -f DIR/kernel-args.json from `ukgpu image export --oci DIR`)" .Values.images.boot -}}
{{- printf "%s@%s" $repo $digest -}}
{{- end -}}

{{- define "ukgpu.rootImage" -}}
{{- $repo := required "repository.rootDisk: the registry repository the root-disk image was pushed to" .Values.repository.rootDisk -}}
{{- $digest := required "images.root-disk: the root-disk image's digest (from kernel-args.json)" (index .Values.images "root-disk") -}}
{{- printf "%s@%s" $repo $digest -}}
{{- end -}}

{{- define "ukgpu.modelImage" -}}
{{- $repo := required "repository.modelDisk: the registry repository the model-disk image was pushed to" .Values.repository.modelDisk -}}
{{- $digest := required "images.model-disk: the model-disk image's digest (from kernel-args.json)" (index .Values.images "model-disk") -}}
{{- printf "%s@%s" $repo $digest -}}
{{- end -}}

{{- define "ukgpu.kernelArgs" -}}
{{- $args := required "kernelArgs: the guest's command line (from DIR/kernel-args.json of `ukgpu image export`)" .Values.kernelArgs -}}
{{- if not (contains "ukgpu.manifest=" $args) -}}
{{- fail "kernelArgs has no ukgpu.manifest=: take it from kernel-args.json, the guest checks its files against it" -}}
{{- end -}}
{{- join " " (prepend .Values.extraKernelArgs $args) -}}
{{- end -}}

{{- define "ukgpu.pickerName" -}}
{{- default (printf "%s-epp" (include "ukgpu.fullname" .)) .Values.inferencePool.picker.name | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{- define "ukgpu.probe" -}}
httpGet:
  path: {{ .probes.path }}
  port: {{ .probes.port }}
  httpHeaders:
    - name: Host
      value: {{ .probes.hostHeader | quote }}
initialDelaySeconds: {{ .probe.initialDelaySeconds }}
periodSeconds: {{ .probe.periodSeconds }}
failureThreshold: {{ .probe.failureThreshold }}
timeoutSeconds: {{ .probe.timeoutSeconds }}
{{- end -}}
