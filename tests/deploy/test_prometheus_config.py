"""deploy/prometheus with promtool: the configuration and rules are valid, the alert unit tests in
deploy/prometheus/tests pass, and every alert an operator needs is there."""

from __future__ import annotations

import re
import subprocess

import pytest
import yaml
from deploy_support import REPO

from server.config import Settings

PROMETHEUS = REPO / "deploy/prometheus"
RULES = yaml.safe_load((PROMETHEUS / "rules/cbam-serve.yml").read_text(encoding="utf-8"))
ALERTS = {r["alert"]: r for g in RULES["groups"] for r in g["rules"] if "alert" in r}


@pytest.fixture(scope="module")
def promtool(require_binary) -> str:
    return require_binary("promtool")


@pytest.mark.parametrize(
    "command",
    [
        ["check", "config", "prometheus.yml"],  # also checks every rule file it names
        [
            "check",
            "rules",
            *sorted(str(p.relative_to(PROMETHEUS)) for p in (PROMETHEUS / "rules").glob("*.yml")),
        ],
        [
            "test",
            "rules",
            *sorted(str(p.relative_to(PROMETHEUS)) for p in (PROMETHEUS / "tests").glob("*.yml")),
        ],
    ],
    ids=["check-config", "check-rules", "test-rules"],
)
def test_promtool_accepts(promtool, command):
    done = subprocess.run([promtool, *command], cwd=PROMETHEUS, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "SUCCESS" in done.stdout + done.stderr


def test_the_alerts_an_operator_needs_are_there():
    assert set(ALERTS) == {
        "CbamServeInstanceDown",
        "CbamServeHighErrorRatio",
        "CbamServeGrpcServerErrors",
        "CbamServeHighLatencyP99",
        "CbamServeQueueSaturated",
        "CbamServeShedding",
        "CbamServeWorkerRestarted",
    }
    for name, rule in ALERTS.items():
        assert rule["labels"]["severity"] in ("critical", "warning"), name
        assert {"summary", "description"} <= set(rule["annotations"]), name
        assert "for" in rule, f"{name} would fire on a single bad evaluation"


def test_every_alert_has_a_unit_test():
    tested = set()
    for path in (PROMETHEUS / "tests").glob("*.yml"):
        for test in yaml.safe_load(path.read_text(encoding="utf-8"))["tests"]:
            tested |= {case["alertname"] for case in test.get("alert_rule_test", []) if case["exp_alerts"]}
    assert tested == set(ALERTS), f"alerts never shown firing in a test: {sorted(set(ALERTS) - tested)}"


def test_queue_saturation_threshold_follows_max_queue():
    threshold = float(re.search(r">\s*([\d.]+)", ALERTS["CbamServeQueueSaturated"]["expr"]).group(1))
    assert threshold == int(0.8 * Settings.model_construct().batching.max_queue)
