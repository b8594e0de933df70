#!/bin/sh
# Render the chart into plain manifests: manifests/prompttrain.yaml (or the file named by $1).
# tests/k8s/test_chart.py runs this and fails when the committed file differs: re-run it after changing the chart.
set -eu
cd "$(dirname "$0")/.."
out="${1:-manifests/prompttrain.yaml}"
version=$(sed -n 's/^version: *//p' charts/prompttrain/Chart.yaml)
{
  cat <<HEADER
# Agent Prompt Train as plain manifests: charts/prompttrain $version rendered by manifests/render.sh with
# manifests/prompttrain.values.yaml (generated; do not edit: change the chart or the values and re-render).
#
# Kubernetes >= 1.21 (policy/v1 PodDisruptionBudget). Namespace "prompttrain"; images prompttrain-proxy:<appVersion>
# and prompttrain-dashboard:<appVersion> (build them, push them to your registry and edit the image: lines, or use
# the Helm chart with proxy.image.repository / dashboard.image.repository). First create the namespace and the one
# Secret everything reads:
#
#   kubectl create namespace prompttrain
#   kubectl -n prompttrain create secret generic prompttrain-secrets \\
#     --from-literal=database-url='postgresql://USER:PASSWORD@HOST:5432/DB' \\
#     --from-literal=credentials-encryption-key="\$(head -c 32 /dev/urandom | base64)" \\
#     --from-literal=dashboard-api-key="\$(head -c 24 /dev/urandom | base64)"
#   kubectl apply -f manifests/prompttrain.yaml
#
HEADER
  helm template prompttrain charts/prompttrain --namespace prompttrain --include-crds \
    --values manifests/prompttrain.values.yaml
} > "$out.tmp"
mv "$out.tmp" "$out"
