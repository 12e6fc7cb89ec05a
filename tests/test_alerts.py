"""The alerting rules (deploy/prometheus/alerts.yml): every rule has a `promtool test rules` case
that fires it and one that does not, and they pass (Debian's promtool, from the prometheus package).
The real Prometheus of tests/test_dashboard.py loads the same rules and evaluates them."""
import re
import shutil
import subprocess
from pathlib import Path

import pytest

HERE = Path(__file__).resolve().parent
RULES = HERE.parent / "deploy" / "prometheus" / "alerts.yml"
CASES = HERE / "prometheus" / "alerts_test.yml"
pytestmark = pytest.mark.skipif(not shutil.which("promtool"), reason="Debian's prometheus package is needed (./dev)")


def test_every_alert_rule_has_a_case_that_fires_it_and_one_that_does_not():
    rules = re.findall(r"^\s*- alert: (\w+)$", RULES.read_text(), re.M)
    cases = CASES.read_text()
    assert len(rules) >= 10 and len(set(rules)) == len(rules)
    for rule in rules:
        checks = re.findall(rf"alertname: {rule}\n\s*exp_alerts:( \[\])?", cases)
        assert "" in checks and " []" in checks, f"{rule}: a case that fires it and one that does not"
    assert subprocess.run(["promtool", "check", "rules", str(RULES)], capture_output=True).returncode == 0


def test_the_alert_rules_pass_their_promtool_tests():
    done = subprocess.run(["promtool", "test", "rules", str(CASES)], capture_output=True, text=True)
    assert done.returncode == 0 and "SUCCESS" in done.stdout, done.stdout + done.stderr
