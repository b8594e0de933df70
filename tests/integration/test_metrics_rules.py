"""The shipped alert rules pass `promtool check rules` and their unit tests (`promtool test rules`)."""

from __future__ import annotations

from tests.monitoring import MONITORING, promtool


def test_promtool_checks_the_rule_file() -> None:
    result = promtool("check", "rules", str(MONITORING / "prometheus-rules.yaml"))
    assert result.returncode == 0, result.stdout.decode() + result.stderr.decode()
    assert b"SUCCESS: 11 rules found" in result.stdout


def test_every_alert_fires_and_stays_quiet_as_its_unit_tests_expect() -> None:
    result = promtool("test", "rules", str(MONITORING / "prometheus-rules.test.yaml"))
    assert result.returncode == 0, result.stdout.decode() + result.stderr.decode()
    assert b"SUCCESS" in result.stdout
