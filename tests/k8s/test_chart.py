"""charts/prompttrain without installing it: helm lint, helm template, the values schema, what the templates
promise (security, labels, grace periods, migrations, API versions), the files kept in sync with their sources
(CRD, RBAC, monitoring, manifests/prompttrain.yaml, Tiltfile), and a server-side dry run against the cluster.
"""

from __future__ import annotations

import ast
import json
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from lightkube import Client

from tests.helpers import IN_CI, REPO
from tests.k8s.conftest import create_namespace, delete_namespace
from tests.k8s.kube import kubectl

CHART = REPO / "charts" / "prompttrain"
CI_VALUES = CHART / "ci"
EXTERNAL_DATABASE = ["--set", "database.url=postgresql://prompttrain:secret@db.example.com:5432/prompttrain"]
ALL_FEATURES = ["--values", str(CI_VALUES / "all-features-values.yaml")]
EVALUATION = ["--values", str(CI_VALUES / "evaluation-values.yaml")]
RECOMMENDED_LABELS = (
    "app.kubernetes.io/name",
    "app.kubernetes.io/instance",
    "app.kubernetes.io/version",
    "app.kubernetes.io/managed-by",
    "app.kubernetes.io/part-of",
    "helm.sh/chart",
)


@pytest.fixture(scope="session", autouse=True)
def _helm() -> None:
    if shutil.which("helm") is None:
        message = "helm is not installed (sudo ../shared/k8s/tools.sh)"
        if IN_CI:
            pytest.fail(message + " — CI must install it (.ci/run)")
        pytest.skip(message)


def helm(*args: str, check: bool = True, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    result = subprocess.run(["helm", *args], capture_output=True, text=True, timeout=timeout, check=False, cwd=REPO)
    if check and result.returncode != 0:
        raise AssertionError(f"helm {' '.join(args)} failed ({result.returncode}):\n{result.stderr}")
    return result


def render(*args: str, release: str = "prompttrain", namespace: str = "prompttrain") -> list[dict[str, Any]]:
    out = helm("template", release, str(CHART), "--namespace", namespace, *args).stdout
    return [document for document in yaml.safe_load_all(out) if document]


def by_kind(documents: list[dict[str, Any]], kind: str) -> dict[str, dict[str, Any]]:
    return {document["metadata"]["name"]: document for document in documents if document["kind"] == kind}


def pod_specs(documents: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    specs = {}
    for document in documents:
        if document["kind"] in ("Deployment", "StatefulSet", "Job"):
            specs[f"{document['kind']}/{document['metadata']['name']}"] = document["spec"]["template"]["spec"]
        elif document["kind"] == "Pod":
            specs[f"Pod/{document['metadata']['name']}"] = document["spec"]
    return specs


def env_of(container: dict[str, Any]) -> dict[str, Any]:
    return {item["name"]: item.get("value", item.get("valueFrom")) for item in container.get("env", [])}


# --- lint, template, schema -------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "values",
    [EXTERNAL_DATABASE, ALL_FEATURES, EVALUATION, ["--values", str(CI_VALUES / "external-database-values.yaml")]],
    ids=["defaults+database.url", "all-features", "evaluation", "ci-external-database"],
)
def test_helm_lint_is_clean(values: list[str]) -> None:
    result = helm("lint", "--strict", str(CHART), *values)
    assert "0 chart(s) failed" in result.stdout, result.stdout


def test_default_values_ask_for_a_database() -> None:
    """Without a database the chart stops with instructions instead of installing pods that cannot start."""
    result = helm("template", "prompttrain", str(CHART), check=False)
    assert result.returncode != 0
    for hint in ("database.url", "database.existingSecret", "postgresql.enabled=true"):
        assert hint in result.stderr


@pytest.mark.parametrize(
    ("setting", "message"),
    [
        ("proxy.replicaCont=3", "Additional property replicaCont is not allowed"),
        ("postgres.enabled=true", "Additional property postgres is not allowed"),
        ("dashboard.auth.apikey=x", "Additional property apikey is not allowed"),
        ("migrations.strategy=never", "migrations.strategy"),
        ("proxy.credentials.source=files", "proxy.credentials.source"),
        ("proxy.service.port=70000", "proxy.service.port"),
        ("database.url=mysql://x", "database.url"),
    ],
)
def test_schema_rejects_typos_and_wrong_values(setting: str, message: str) -> None:
    result = helm("template", "prompttrain", str(CHART), *EXTERNAL_DATABASE, "--set", setting, check=False)
    assert result.returncode != 0, f"{setting} was accepted"
    assert "values don't meet the specifications of the schema" in result.stderr
    assert message in result.stderr, result.stderr


def test_conflicting_choices_fail_with_a_reason() -> None:
    both = helm("template", "p", str(CHART), *EXTERNAL_DATABASE, "--set", "postgresql.enabled=true", check=False)
    assert "choose one database" in both.stderr
    hook = helm("template", "p", str(CHART), *EVALUATION, "--set", "migrations.strategy=hook", check=False)
    assert "pre-install hooks run before the evaluation PostgreSQL exists" in hook.stderr
    open_with_key = helm(
        "template", "p", str(CHART), *EXTERNAL_DATABASE, "--set", "dashboard.auth.open=true",
        "--set", "dashboard.auth.apiKey=k", check=False,
    )  # fmt: skip
    assert "excludes apiKey" in open_with_key.stderr


def _leaves(values: dict[str, Any], schema: dict[str, Any], prefix: str = "") -> Iterator[tuple[str, dict[str, Any]]]:
    """(path, schema node) of every documented value; free-form maps (resources, labels, security contexts) are
    documented as one value."""
    for key, value in values.items():
        path, node = f"{prefix}{key}", schema["properties"][key]
        if isinstance(value, dict) and value and "properties" in node and key != "resources":
            yield from _leaves(value, node, path + ".")
        else:
            yield path, node


def test_every_value_is_described_in_the_schema_and_the_readme() -> None:
    values = yaml.safe_load((CHART / "values.yaml").read_text())
    schema = json.loads((CHART / "values.schema.json").read_text())
    readme = (CHART / "README.md").read_text()
    undocumented = []
    for path, node in _leaves(values, schema):
        if not node.get("description"):
            undocumented.append(f"{path}: no description in values.schema.json")
        if f"`{path}`" not in readme:
            undocumented.append(f"{path}: not in charts/prompttrain/README.md")

    def closed(node: dict[str, Any], path: str) -> None:
        if node.get("type") == "object" and "properties" in node:
            assert node.get("additionalProperties") is False, f"{path or 'values'} accepts unknown keys"
            for key, child in node["properties"].items():
                closed(child, f"{path}.{key}".lstrip("."))

    closed(schema, "")
    assert not undocumented, "\n".join(undocumented)


# --- what the templates promise ---------------------------------------------------------------------------------


@pytest.mark.parametrize("values", [ALL_FEATURES, EVALUATION], ids=["all-features", "evaluation"])
def test_every_workload_is_locked_down_and_sized(values: list[str]) -> None:
    documents = render(*values)
    specs = pod_specs(documents)
    assert {
        "Deployment/prompttrain-proxy",
        "Deployment/prompttrain-dashboard",
        "Deployment/prompttrain-operator",
    } <= set(specs)
    for name, spec in specs.items():
        pod = spec.get("securityContext", {})
        assert pod.get("runAsNonRoot") is True, name
        assert pod.get("seccompProfile") == {"type": "RuntimeDefault"}, name
        for container in spec.get("initContainers", []) + spec["containers"]:
            where = f"{name}/{container['name']}"
            security = container["securityContext"]
            assert security["readOnlyRootFilesystem"] is True, where
            assert security["allowPrivilegeEscalation"] is False, where
            assert security["capabilities"]["drop"] == ["ALL"], where
            assert container["resources"]["requests"] and container["resources"]["limits"], where
            mounts = {mount["mountPath"] for mount in container.get("volumeMounts", [])}
            assert "/tmp" in mounts, f"{where}: no writable /tmp"
    for document in documents:
        labels = document["metadata"].get("labels", {})
        missing = [label for label in RECOMMENDED_LABELS if label not in labels]
        assert not missing, f"{document['kind']}/{document['metadata']['name']} lacks {missing}"
        assert document["metadata"].get("namespace") == "prompttrain", document["metadata"]["name"]


def test_proxy_grace_period_outlasts_streams_and_its_pre_stop_sleep() -> None:
    proxy = by_kind(render(*EXTERNAL_DATABASE), "Deployment")["prompttrain-proxy"]["spec"]["template"]["spec"]
    container = proxy["containers"][0]
    sleep = int(container["lifecycle"]["preStop"]["exec"]["command"][1])
    grace = int(env_of(container)["SHUTDOWN_GRACE_SECONDS"])
    assert grace >= 600
    assert proxy["terminationGracePeriodSeconds"] >= grace + sleep + 30
    assert container["readinessProbe"]["httpGet"]["path"] == "/health/ready"
    assert container["livenessProbe"]["httpGet"]["path"] == "/health/live"
    assert env_of(container)["CREDENTIALS_SOURCE"] == "kubernetes"
    assert proxy["serviceAccountName"] == "prompttrain-proxy"


def test_migrations_hook_for_an_external_database_init_containers_for_the_evaluation_one() -> None:
    external = render(*EXTERNAL_DATABASE)
    job = by_kind(external, "Job")["prompttrain-migrate"]
    assert job["metadata"]["annotations"]["helm.sh/hook"] == "pre-install,pre-upgrade"
    hook_secret = by_kind(external, "Secret")["prompttrain-migrate"]
    # The URL the Job reads exists before it: a hook Secret with a lower weight.
    assert int(hook_secret["metadata"]["annotations"]["helm.sh/hook-weight"]) < int(
        job["metadata"]["annotations"]["helm.sh/hook-weight"]
    )
    migrate = job["spec"]["template"]["spec"]["containers"][0]
    assert migrate["args"][:2] == ["migrate", "--wait"]
    assert migrate["env"][0]["valueFrom"]["secretKeyRef"]["name"] == "prompttrain-migrate"
    assert job["spec"]["backoffLimit"] <= 1
    for name, spec in pod_specs(external).items():
        assert "initContainers" not in spec, name

    evaluation = render(*EVALUATION)
    assert "Job" not in {document["kind"] for document in evaluation}
    for name in ("Deployment/prompttrain-proxy", "Deployment/prompttrain-dashboard"):
        init = pod_specs(evaluation)[name]["initContainers"]
        assert [container["args"][0] for container in init] == ["migrate"], name

    existing = render("--set", "database.existingSecret=db", "--set", "database.existingSecretKey=uri")
    reference = by_kind(existing, "Job")["prompttrain-migrate"]["spec"]["template"]["spec"]["containers"][0]["env"][0]
    assert reference["valueFrom"]["secretKeyRef"] == {"name": "db", "key": "uri"}
    assert "prompttrain-migrate" not in by_kind(existing, "Secret")


def test_existing_secrets_replace_every_generated_one() -> None:
    documents = render(*ALL_FEATURES)
    assert by_kind(documents, "Secret") == {}, "no chart Secret when every secret is an existing one"
    generated = by_kind(render(*EXTERNAL_DATABASE), "Secret")["prompttrain"]["data"]
    assert set(generated) == {"database-url", "dashboard-api-key", "credentials-encryption-key"}
    dashboard = by_kind(documents, "Deployment")["prompttrain-dashboard"]["spec"]["template"]["spec"]["containers"][0]
    assert env_of(dashboard)["DASHBOARD_API_KEY"]["secretKeyRef"]["name"] == "prompttrain-dashboard"
    assert env_of(dashboard)["DASHBOARD_TRUSTED_HEADER"] == "X-Auth-Request-Email"


def test_pdb_and_hpa_use_the_newest_api_the_cluster_offers() -> None:
    documents = render(*ALL_FEATURES)
    assert by_kind(documents, "PodDisruptionBudget")["prompttrain-proxy"]["apiVersion"] == "policy/v1"
    assert by_kind(documents, "HorizontalPodAutoscaler")["prompttrain-proxy"]["apiVersion"] == "autoscaling/v2"
    assert "replicas" not in by_kind(documents, "Deployment")["prompttrain-proxy"]["spec"], "the HPA owns replicas"


def test_cluster_dependent_features_are_off_by_default() -> None:
    kinds = {document["kind"] for document in render(*EXTERNAL_DATABASE)}
    for kind in ("ServiceMonitor", "PrometheusRule", "Ingress", "NetworkPolicy", "HorizontalPodAutoscaler"):
        assert kind not in kinds
    assert "StatefulSet" not in kinds, "the evaluation PostgreSQL is opt-in"


# --- files kept identical to their sources ----------------------------------------------------------------------


def test_chart_crd_is_the_operators_crd() -> None:
    chart_crd = (CHART / "crds" / "trains.prompttrain.io.yaml").read_text()
    assert chart_crd == (REPO / "operator" / "crd.yaml").read_text(), (
        "charts/prompttrain/crds/ differs from operator/crd.yaml: "
        "cp operator/crd.yaml charts/prompttrain/crds/trains.prompttrain.io.yaml"
    )


def test_chart_roles_grant_what_operator_rbac_grants() -> None:
    roles = by_kind(render(*EXTERNAL_DATABASE), "Role")
    for component in ("operator", "proxy"):
        source = [
            document
            for document in yaml.safe_load_all((REPO / "operator" / "rbac" / f"{component}.yaml").read_text())
            if document and document["kind"] == "Role"
        ]
        assert roles[f"prompttrain-{component}"]["rules"] == source[0]["rules"], component
    bindings = by_kind(render(*EXTERNAL_DATABASE), "RoleBinding")
    assert bindings["prompttrain-proxy"]["subjects"] == [
        {"kind": "ServiceAccount", "name": "prompttrain-proxy", "namespace": "prompttrain"}
    ]


def test_monitoring_content_is_the_one_in_manifests_monitoring() -> None:
    monitoring = REPO / "manifests" / "monitoring"
    for name in ("grafana-dashboard.json", "prometheus-rules.yaml"):
        assert (CHART / "files" / name).read_text() == (monitoring / name).read_text(), (
            f"cp manifests/monitoring/{name} charts/prompttrain/files/{name}"
        )
    documents = render(*ALL_FEATURES)
    rule = by_kind(documents, "PrometheusRule")["prompttrain"]
    assert rule["spec"] == yaml.safe_load((monitoring / "prometheus-rules.yaml").read_text())
    assert "{{ $labels.train }}" in json.dumps(rule["spec"]), "alert templates survive helm rendering"
    dashboard = by_kind(documents, "ConfigMap")["prompttrain-grafana-dashboard"]
    assert dashboard["metadata"]["labels"]["grafana_dashboard"] == "1"
    assert json.loads(dashboard["data"]["prompttrain.json"]) == json.loads(
        (monitoring / "grafana-dashboard.json").read_text()
    )
    monitors = by_kind(documents, "ServiceMonitor")
    assert set(monitors) == {"prompttrain-proxy", "prompttrain-dashboard", "prompttrain-operator"}


def test_service_monitors_scrape_the_port_each_component_serves_metrics_on() -> None:
    documents = render(*ALL_FEATURES)
    services, deployments = by_kind(documents, "Service"), by_kind(documents, "Deployment")
    for name, monitor in by_kind(documents, "ServiceMonitor").items():
        selected = [
            service
            for service in services.values()
            if monitor["spec"]["selector"]["matchLabels"].items() <= service["metadata"]["labels"].items()
        ]
        assert [service["metadata"]["name"] for service in selected] == [name]
        ports = {port["name"]: port for port in selected[0]["spec"]["ports"]}
        pod = deployments[name]["spec"]["template"]
        assert selected[0]["spec"]["selector"].items() <= pod["metadata"]["labels"].items()
        container_ports = {port["name"]: port["containerPort"] for port in pod["spec"]["containers"][0]["ports"]}
        for endpoint in monitor["spec"]["endpoints"]:
            assert endpoint["path"] == "/metrics"
            assert ports[endpoint["port"]]["targetPort"] in container_ports, (name, endpoint)
    operator = deployments["prompttrain-operator"]["spec"]["template"]["spec"]["containers"][0]
    metrics_port = operator["args"][operator["args"].index("--metrics-port") + 1]
    assert {"name": "metrics", "containerPort": int(metrics_port), "protocol": "TCP"} in operator["ports"]


def test_rendered_alert_rules_pass_promtool(tmp_path: Path) -> None:
    if shutil.which("promtool") is None:
        if IN_CI:
            pytest.fail("promtool is missing: .ci/run installs prometheus")
        pytest.skip("promtool is not installed (apt-get install prometheus)")
    rule = by_kind(render(*ALL_FEATURES), "PrometheusRule")["prompttrain"]
    rules = tmp_path / "rules.yaml"
    rules.write_text(yaml.safe_dump(rule["spec"]))
    result = subprocess.run(["promtool", "check", "rules", str(rules)], capture_output=True, text=True, check=False)
    assert result.returncode == 0, result.stdout + result.stderr


def test_plain_manifests_are_the_chart_rendered(tmp_path: Path) -> None:
    rendered = tmp_path / "prompttrain.yaml"
    subprocess.run(["sh", str(REPO / "manifests" / "render.sh"), str(rendered)], check=True, cwd=REPO, timeout=120)
    assert rendered.read_text() == (REPO / "manifests" / "prompttrain.yaml").read_text(), (
        "manifests/prompttrain.yaml is stale: run manifests/render.sh"
    )
    kinds = {document["kind"] for document in yaml.safe_load_all(rendered.read_text()) if document}
    assert {"CustomResourceDefinition", "Deployment", "Service", "Role", "RoleBinding", "ServiceAccount"} <= kinds
    assert not kinds & {"Secret", "Job", "Pod"}, "plain manifests read one existing Secret and use no hooks"


def _calls(tree: ast.AST, name: str) -> list[ast.Call]:
    return [
        node
        for node in ast.walk(tree)
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id == name
    ]


def _constants(tree: ast.Module) -> dict[str, Any]:
    """Top-level NAME = <literal or NAME + literal> assignments of the Tiltfile."""
    found: dict[str, Any] = {}
    for node in tree.body:
        if isinstance(node, ast.Assign) and isinstance(node.targets[0], ast.Name):
            try:
                found[node.targets[0].id] = eval(  # noqa: S307 - literal arithmetic over constants only
                    compile(ast.Expression(node.value), "Tiltfile", "eval"), {"__builtins__": {}}, dict(found)
                )
            except Exception:  # noqa: BLE001, S112 - calls (os.getenv, local) are not constants
                continue
    return found


def test_tiltfile_names_files_and_resources_that_exist() -> None:
    tree = ast.parse((REPO / "Tiltfile").read_text(), filename="Tiltfile")  # Starlark is a Python subset
    constants = _constants(tree)
    for name in ("KIND_CONFIG", "CHART", "DEV_VALUES", "FAKE_UPSTREAM", "CRD", "DEV_NAMESPACE"):
        assert (REPO / constants[name]).exists(), f"Tiltfile {name} = {constants[name]} does not exist"
    kind_config = yaml.safe_load((REPO / constants["KIND_CONFIG"]).read_text())
    assert kind_config["name"] == constants["KIND_CLUSTER"]

    builds = {}
    for call in _calls(tree, "docker_build_with_restart"):
        ref = ast.literal_eval(call.args[0])
        keywords = {keyword.arg: keyword.value for keyword in call.keywords}
        builds[ref] = ast.literal_eval(keywords["dockerfile"])
        assert (REPO / builds[ref]).exists()
    assert builds == {"prompttrain-proxy": "Dockerfile.proxy", "prompttrain-dashboard": "Dockerfile.dashboard"}

    # The workloads Tilt names are the ones the chart renders with the dev values.
    dev = render("--values", str(REPO / constants["DEV_VALUES"]), release=constants["RELEASE"])
    workloads = {document["metadata"]["name"] for document in dev if document["kind"] in ("Deployment", "StatefulSet")}
    workloads |= {
        document["metadata"]["name"]
        for document in yaml.safe_load_all((REPO / constants["FAKE_UPSTREAM"]).read_text())
        if document
    }
    forwards = {}
    for call in _calls(tree, "k8s_resource"):
        workload = ast.literal_eval(call.args[0])
        assert workload in workloads, f"Tiltfile names {workload}, which the chart does not render"
        keywords = {keyword.arg: keyword.value for keyword in call.keywords}
        if "port_forwards" in keywords:
            forwards[workload] = ast.literal_eval(keywords["port_forwards"])
    assert forwards == {"prompttrain-proxy": ["3000:3000"], "prompttrain-dashboard": ["3001:3001"]}
    images = {
        container["image"]
        for document in dev
        if document["kind"] == "Deployment"
        for container in document["spec"]["template"]["spec"]["containers"]
    }
    assert images == {"prompttrain-proxy:dev", "prompttrain-dashboard:dev"}, "Tilt replaces these references"
    dashboard = by_kind(dev, "Deployment")["prompttrain-dashboard"]["spec"]["template"]["spec"]["containers"][0]
    assert env_of(dashboard)["DASHBOARD_OPEN"] == "true"
    assert by_kind(dev, "StatefulSet"), "dev values run the evaluation PostgreSQL"


# --- against the cluster ----------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def dry_run_namespace(kube: Client) -> Iterator[str]:
    name = create_namespace(kube, "pt-chart-dry")
    yield name
    delete_namespace(kube, name)


@pytest.mark.parametrize("values", [EXTERNAL_DATABASE, ALL_FEATURES, EVALUATION], ids=["defaults", "all", "eval"])
def test_rendered_chart_is_accepted_by_the_api_server(dry_run_namespace: str, values: list[str]) -> None:
    """`helm template --validate` renders with the cluster's own API versions (policy/v1beta1 and
    autoscaling/v2beta2 on Kubernetes 1.20); `kubectl apply --dry-run=server` runs admission and schema checks.
    ServiceMonitor and PrometheusRule are left out here when the cluster lacks the monitoring.coreos.com CRDs."""
    served = set(kubectl("api-versions").stdout.split())
    extra: list[str] = []
    if "monitoring.coreos.com/v1" not in served:
        extra = ["--set", "metrics.serviceMonitor.enabled=false", "--set", "metrics.prometheusRule.enabled=false"]
    out = helm(
        "template", "prompttrain", str(CHART), "--namespace", dry_run_namespace, "--validate", *values, *extra
    ).stdout
    documents = [document for document in yaml.safe_load_all(out) if document]
    for document in documents:
        version = document["apiVersion"]
        assert version in served, f"{document['kind']} uses {version}, which the cluster does not serve"
    result = kubectl("apply", "--dry-run=server", "-n", dry_run_namespace, "-f", "-", stdin=out)
    applied = [line for line in result.stdout.splitlines() if "(server dry run)" in line]
    assert len(applied) == len(documents), result.stdout
    if "policy/v1" not in served:
        assert by_kind(documents, "PodDisruptionBudget")["prompttrain-proxy"]["apiVersion"] == "policy/v1beta1"
    if values is ALL_FEATURES and "autoscaling/v2" not in served:
        assert by_kind(documents, "HorizontalPodAutoscaler")["prompttrain-proxy"]["apiVersion"] == (
            "autoscaling/v2beta2"
        )
