"""The Grafana dashboard: the checked-in JSON is what its code writes; and, for real, a real
Prometheus (Debian's) scrapes a worker carrying MPTCP traffic, every panel query of the
dashboard returns data through Prometheus' HTTP API, and the alerting rules load and evaluate."""
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
from netlab import KERNEL, MB, fetch

DEPLOY = Path(__file__).resolve().parents[1] / "deploy"
sys.path.insert(0, str(DEPLOY / "grafana"))
API = """import sys, urllib.parse, urllib.request
url = "http://127.0.0.1:9090/api/v1/" + sys.argv[1] + "?" + urllib.parse.urlencode(dict(zip(*[iter(sys.argv[2:])] * 2)))
print(urllib.request.urlopen(url, timeout=5).read().decode())"""


def api(topo, path, role="lb", **parameters):
    out = topo.exec(role, sys.executable, "-c", API, path, *[x for kv in parameters.items() for x in kv],
                    capture_output=True).stdout
    return json.loads(out)


def query(topo, expr, role="lb"):
    return api(topo, "query", role, query=expr)


def test_the_checked_in_dashboard_is_what_its_code_writes():
    import dashboard

    assert (DEPLOY / "grafana" / "mplb-nfq.json").read_text() == dashboard.render(), \
        "stale: run python deploy/grafana/dashboard.py"
    panels = json.loads(dashboard.render())["panels"]
    assert len({(p["gridPos"]["x"], p["gridPos"]["y"]) for p in panels}) == len(panels)  # none on another


def on_the_kernel(test):
    for mark in KERNEL:
        test = mark(test)
    return test


CLUSTER = "Cluster:"  # the panels of the cluster's row: tests/test_cluster.py checks them on a cluster


def dashboard_queries(cluster: bool) -> set[tuple[str, str]]:
    """(panel title, query) of the dashboard's panels: the cluster's row, or all the others."""
    panels = json.loads((DEPLOY / "grafana" / "mplb-nfq.json").read_text())["panels"]
    return {(panel["title"], target["expr"].replace("$__rate_interval", "30s"))
            for panel in panels if panel.get("targets") and panel["title"].startswith(CLUSTER) == cluster
            for target in panel["targets"]}


def assert_panels_answer(topo, role, tmp_path, queries, traffic):
    """A real Prometheus in namespace `role` scrapes the worker there (deploy/prometheus's config)
    while `traffic()` runs, until every query returns data through its HTTP API."""
    if not shutil.which("prometheus"):
        pytest.skip("Debian's prometheus package is needed (./dev installs it)")
    scrape = (DEPLOY / "prometheus" / "prometheus.yml").read_text().replace("15s", "1s")
    (tmp_path / "prometheus.yml").write_text(scrape)
    shutil.copy(DEPLOY / "prometheus" / "alerts.yml", tmp_path / "alerts.yml")
    prometheus = topo.popen(role, "prometheus", f"--config.file={tmp_path / 'prometheus.yml'}",
                            f"--storage.tsdb.path={tmp_path / 'tsdb'}", "--web.listen-address=127.0.0.1:9090",
                            stdout=subprocess.DEVNULL, stderr=open(tmp_path / "prometheus.log", "w"))
    try:
        for _ in range(150):  # Prometheus starts scraping a few seconds after it answers
            try:
                if query(topo, 'up{job="mplb-nfq"}', role)["data"]["result"]:
                    break
            except (json.JSONDecodeError, RuntimeError, KeyError):
                pass
            time.sleep(0.2)
        empty = queries
        for _ in range(20):  # traffic between scrapes, until every rate has two samples to work on
            traffic()
            time.sleep(1.0)
            answers = {q: query(topo, q[1], role) for q in empty}
            assert all(a["status"] == "success" for a in answers.values()), answers
            empty = {q for q, a in answers.items() if not a["data"]["result"]}
            if not empty:
                break
        assert not empty, f"panels with no data: {sorted(title for title, _ in empty)}"
        # scraped (a scrape may time out now and then on two loaded cores: its interval is 1 s)
        up = query(topo, 'max_over_time(up{job="mplb-nfq"}[10s])', role)["data"]["result"]
        assert up and up[0]["value"][1] == "1"
        rules = [rule for group in api(topo, "rules", role)["data"]["groups"] for rule in group["rules"]]
        assert len(rules) >= 10 and all(r["health"] == "ok" and r["type"] == "alerting" for r in rules), rules
    finally:
        prometheus.terminate()
        prometheus.wait(timeout=10)


@on_the_kernel
def test_every_dashboard_panel_returns_data_from_a_real_prometheus(topo, worker, tmp_path):
    worker("mplb", kernel="conntrack_interval = 0.5", metrics="127.0.0.1:9842")
    queries = dashboard_queries(cluster=False)
    assert len(queries) >= 10

    def traffic():
        assert [r["received"] for r in fetch(topo, 2 * MB, 2 * MB)] == [2 * MB] * 2

    assert_panels_answer(topo, "lb", tmp_path, queries, traffic)
