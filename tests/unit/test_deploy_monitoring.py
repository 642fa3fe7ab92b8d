"""Monitoring (deploy/monitoring): Prometheus configs, rules, their promtool unit tests, the dashboards,
and the metric-name reading the scrape test relies on."""

import json

import pytest
import yaml

from tools.deploy_check import monitoring
from tools.deploy_check.promql import metric_names


def test_configs_rules_tests_and_dashboards_pass():
    assert monitoring.check_all() == {name: [] for name in monitoring.check_all()}


@pytest.mark.parametrize(
    ("expr", "names"),
    [
        (
            'histogram_quantile(0.95, sum by (le, rpc_method) (rate(rpc_server_duration_milliseconds_bucket'
            '{job="gateway", rpc_method=~".*Chat"}[$__rate_interval])))',
            {"rpc_server_duration_milliseconds_bucket"},
        ),
        ("sophia:cost_usd_per_day:projected_1h > on () group_left sophia:daily_budget_usd",
         {"sophia:cost_usd_per_day:projected_1h", "sophia:daily_budget_usd"}),
        ("sum(rate(a_total[1h])) * 86400 / 1e6 > bool 0.5 unless b offset 5m", {"a_total", "b"}),
        ('up{job=~"gateway|router"} == 0', {"up"}),
        ('label_replace(vector(1), "x", "y", "", "")', set()),
        ('count without (instance) (c{le="+Inf"}) or on (job) d', {"c", "d"}),
    ],
)  # fmt: skip
def test_metric_names_are_read_from_promql(expr, names):
    assert metric_names(expr) == names


def test_every_alert_is_named_in_the_runbook():
    runbook = (monitoring.DEPLOY / "README.md").read_text()
    for alert in monitoring.alert_names():
        assert f"### {alert}" in runbook, alert


def test_an_alert_without_a_firing_test_is_reported(tmp_path):
    rules = yaml.safe_load(monitoring.RULES[0].read_text())
    rules["groups"][-1]["rules"].append({"alert": "SophiaNeverTested", "expr": "vector(1)"})
    path = tmp_path / "rules.yml"
    path.write_text(yaml.safe_dump(rules))
    assert monitoring.untested_alerts([path]) == [
        "alert SophiaNeverTested has no promtool test that makes it fire"
    ]


def test_the_promtool_tests_fail_when_an_alert_threshold_drifts(tmp_path):
    rules_dir, tests_dir = tmp_path / "rules", tmp_path / "tests"
    rules_dir.mkdir()
    tests_dir.mkdir()
    rules = monitoring.RULES[0].read_text().replace("rate5m) > 0.05", "rate5m) > 0.5")
    assert rules != monitoring.RULES[0].read_text()
    (rules_dir / monitoring.RULES[0].name).write_text(rules)
    test = tests_dir / "sophia.test.yml"
    test.write_text(monitoring.RULE_TESTS[0].read_text())
    failures = monitoring._promtool("test", "rules", str(test))
    assert any("SophiaHighErrorRate" in line for line in failures), failures


def _dashboard_with(tmp_path, edit):
    source = monitoring.DASHBOARDS[0]
    dashboard = json.loads(source.read_text())
    panel = next(p for p in dashboard["panels"] if p["type"] != "row")
    edit(panel)
    path = tmp_path / source.name
    path.write_text(json.dumps(dashboard))
    return monitoring.dashboard_problems([path]), panel["title"]


def test_a_dashboard_query_that_is_not_promql_is_reported_with_its_panel(tmp_path):
    problems, title = _dashboard_with(tmp_path, lambda p: p["targets"][0].update(expr="sum(rate(x[5m])"))
    assert any(title in problem for problem in problems), problems


def test_a_panel_without_the_datasource_variable_is_reported(tmp_path):
    problems, title = _dashboard_with(tmp_path, lambda p: p.update(datasource={"uid": "abc"}))
    assert any(f"panel {title!r}: must use the $datasource variable" in problem for problem in problems)


def test_the_names_used_cover_rules_dashboards_and_the_adapter():
    uses, recorded = monitoring.metric_uses()
    assert "sophia:daily_budget_usd" in recorded
    assert any("SophiaServiceDown" in where for where in uses["up"])
    assert any(where.startswith("sophia-cost.json") for where in uses["sophia_gateway_cost_u_total"])
    assert any("prometheus-adapter" in where for where in uses["rpc_server_duration_milliseconds_count"])


def test_a_threshold_that_drifts_from_the_config_is_reported(tmp_path):
    assert monitoring.config_threshold_problems() == []
    rules = monitoring.RULES[0].read_text().replace("vector(100000)", "vector(5000)")
    assert rules != monitoring.RULES[0].read_text()
    path = tmp_path / "rules.yml"
    path.write_text(rules)
    problems = monitoring.config_threshold_problems([path])
    assert len(problems) == 1 and "sophia:cache_max_entries_per_tenant" in problems[0], problems
