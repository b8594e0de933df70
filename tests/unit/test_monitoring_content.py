"""The shipped monitoring content is consistent: the Grafana dashboard and the alert rules name only metrics that
exist, every metric is on the dashboard, the PrometheusRule equals the plain rule file, every alert is unit-tested.

(The expressions are parsed and evaluated by a real Prometheus in tests/integration/test_metrics_prometheus.py,
and the rules run through `promtool` in tests/integration/test_metrics_rules.py.)
"""

from __future__ import annotations

import re
from typing import Any

import orjson
import yaml
from prometheus_client import REGISTRY

import prompttrain.metrics  # noqa: F401 - registers every metric
from tests.monitoring import MONITORING

METRIC_NAME = re.compile(r"\b(prompttrain_[a-z0-9_]+)\b")


def defined_samples() -> dict[str, str]:
    """Every sample name the code can expose, mapped to its metric family."""
    samples: dict[str, str] = {}
    for family in REGISTRY.collect():
        if not family.name.startswith("prompttrain_"):
            continue
        suffixes = {"counter": ["_total"], "histogram": ["_bucket", "_sum", "_count"]}.get(family.type, [""])
        for suffix in suffixes:
            samples[family.name + suffix] = family.name
    return samples


def dashboard() -> dict[str, Any]:
    return dict(orjson.loads((MONITORING / "grafana-dashboard.json").read_bytes()))


def dashboard_expressions() -> list[str]:
    return [target["expr"] for panel in dashboard()["panels"] for target in panel.get("targets", [])]


def rules() -> dict[str, Any]:
    return dict(yaml.safe_load((MONITORING / "prometheus-rules.yaml").read_text()))


def test_dashboard_and_rules_name_only_metrics_that_exist() -> None:
    samples = defined_samples()
    expressions = dashboard_expressions() + [rule["expr"] for group in rules()["groups"] for rule in group["rules"]]
    assert expressions
    unknown = {name for expr in expressions for name in METRIC_NAME.findall(expr)} - set(samples)
    assert not unknown, f"not exposed by prompttrain.metrics: {sorted(unknown)}"


def test_every_metric_is_on_the_dashboard() -> None:
    samples = defined_samples()
    shown = {samples[name] for expr in dashboard_expressions() for name in METRIC_NAME.findall(expr) if name in samples}
    assert set(samples.values()) - shown == set()


def test_the_dashboard_is_importable() -> None:
    board = dashboard()
    assert board["uid"] and board["title"] and board["schemaVersion"] >= 36
    ids = [panel["id"] for panel in board["panels"]]
    assert len(ids) == len(set(ids))
    variables = {variable["name"] for variable in board["templating"]["list"]}
    assert variables == {"datasource", "train", "account"}
    for panel in board["panels"]:
        if panel["type"] == "row":
            continue
        assert panel["datasource"]["uid"] == "${datasource}", panel["title"]
        assert all(target["refId"] for target in panel["targets"])
        grid = panel["gridPos"]
        assert grid["x"] + grid["w"] <= 24, panel["title"]


def test_the_prometheusrule_carries_exactly_the_plain_rule_file() -> None:
    resource = yaml.safe_load((MONITORING / "prometheusrule.yaml").read_text())
    assert resource["apiVersion"] == "monitoring.coreos.com/v1" and resource["kind"] == "PrometheusRule"
    assert resource["spec"] == rules()


def test_every_alert_has_a_unit_test_in_which_it_fires() -> None:
    alerts = {rule["alert"] for group in rules()["groups"] for rule in group["rules"] if "alert" in rule}
    tests = yaml.safe_load((MONITORING / "prometheus-rules.test.yaml").read_text())
    firing = {
        case["alertname"] for test in tests["tests"] for case in test.get("alert_rule_test", []) if case["exp_alerts"]
    }
    assert alerts - firing == set()
    for group in rules()["groups"]:
        for rule in group["rules"]:
            assert rule["labels"]["severity"] in {"critical", "warning", "info"}, rule["alert"]
            assert {"summary", "description"} <= set(rule["annotations"]), rule["alert"]
