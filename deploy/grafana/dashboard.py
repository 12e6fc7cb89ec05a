"""The Grafana dashboard as code, with Grafana's own typed builders (grafana-foundation-sdk).

`python deploy/grafana/dashboard.py` writes mplb-nfq.json beside this file, the one operators
import or provision; a test fails when that file is not what this script writes.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

from grafana_foundation_sdk.builders import dashboard, prometheus, stat, timeseries
from grafana_foundation_sdk.cog.encoder import JSONEncoder
from grafana_foundation_sdk.models.dashboard import DataSourceRef

OUT = Path(__file__).resolve().parent / "mplb-nfq.json"
PROMETHEUS = DataSourceRef(type_val="prometheus", uid="${datasource}")


def query(expr: str, legend: str, ref: str = "A") -> prometheus.Dataquery:
    return prometheus.Dataquery().expr(expr).legend_format(legend).ref_id(ref).datasource(PROMETHEUS)


def rate(metric: str, by: str) -> str:
    return f"sum by ({by}) (rate({metric}[$__rate_interval]))"


def series(title: str, unit: str, *queries: prometheus.Dataquery, width: int = 12) -> timeseries.Panel:
    panel = timeseries.Panel().title(title).unit(unit).datasource(PROMETHEUS).height(8).span(width)
    for q in queries:
        panel = panel.with_target(q)
    return panel


def gauge(title: str, expr: str, legend: str) -> stat.Panel:
    return stat.Panel().title(title).unit("short").datasource(PROMETHEUS).height(8).span(8) \
        .with_target(query(expr, legend))


def decision_time() -> timeseries.Panel:
    quantile = "histogram_quantile({q}, sum by (le) (rate(mplb_packet_processing_seconds_bucket[$__rate_interval])))"
    return series("Per-packet decision time (p50, p99)", "s", query(quantile.format(q=0.5), "p50", "A"),
                  query(quantile.format(q=0.99), "p99", "B"))


def build() -> dashboard.Dashboard:
    panels = [
        series("Decided in the kernel /s: SYNs from the scheduler tables, handshakes copied (nflog)", "pps",
               query("sum(rate(mplb_nft_decided_syns_total[$__rate_interval]))", "SYNs decided", "A"),
               query(rate("mplb_nft_copied_packets_total", "packet"), "copied {{packet}}", "B")),
        series("Joins that raced their token /s (held until learned, or expired); copies lost", "ops",
               query(rate("mplb_held_joins_total", "outcome"), "held, {{outcome}}", "A"),
               query('sum(rate(mplb_copies_total{result="lost"}[$__rate_interval]))', "copies lost", "B")),
        series("Handshake packets queued /s, by kind", "pps", query(rate("mplb_queued_packets_total", "kind"), "{{kind}}")),
        series("Diverted by the nft ruleset /s", "pps", query(rate("mplb_nft_queued_packets_total", "rule"), "{{rule}}")),
        series("MP_JOIN token lookups /s", "ops",
               query(rate("mplb_join_lookups_total", "result, path"), "{{path}} {{result}}")),
        series("Verdicts /s", "pps", query(rate("mplb_verdicts_total", "verdict"), "{{verdict}}")),
        series("Active connections per backend", "short",
               query("sum by (backend) (mplb_backend_connections)", "{{backend}}")),
        series("Active subflows (MP_JOIN) per backend", "short",
               query("sum by (backend) (mplb_backend_subflows)", "{{backend}}")),
        gauge("Backend health (1 = up)", "min by (backend) (mplb_backend_up)", "{{backend}}"),
        gauge("Backends draining", "max by (backend) (mplb_backend_draining)", "{{backend}}"),
        gauge("Tokens tracked", "sum(mplb_tokens_tracked)", "tokens"),
        series("NFQUEUE drops /s", "pps", query(rate("mplb_nfqueue_dropped_packets_total", "reason"), "{{reason}}")),
        decision_time(),
        series("Worker errors /s", "pps", query("sum(rate(mplb_worker_errors_total[$__rate_interval]))", "errors")),
        series("Table evictions /s (a full flow or token table: a flood?)", "ops",
               query(rate("mplb_table_evictions_total", "table"), "{{table}}")),
        series("Token map writes /s, by result (error: the kernel map full or refusing)", "ops",
               query(rate("mplb_token_writes_total", "result"), "{{result}}")),
    ]
    cluster = [
        gauge("Cluster: Redis link up, VIPs announced (per balancer)",
              "min by (instance) (mplb_cluster_redis_up) + 2 * min by (instance) (mplb_cluster_announced)",
              "{{instance}} (3 = both)"),
        series("Cluster: tokens from peers installed /s, published /s", "ops",
               query(rate("mplb_cluster_received_total", "peer"), "from {{peer}}", "A"),
               query(rate("mplb_cluster_published_total", "instance"), "{{instance}} published", "B")),
        series("Cluster: propagation delay, a peer's learning to this kernel map (p50, p99)", "s",
               *(query(f"histogram_quantile({q}, sum by (le) (rate(mplb_cluster_propagation_seconds_bucket"
                       f"[$__rate_interval])))", f"p{int(q * 100)}", ref) for q, ref in ((0.5, "A"), (0.99, "B")))),
        series("Cluster: joins /s whose connection came through a peer (crossed), held for a peer's token; "
               "moved subflows", "ops",
               query(rate("mplb_cluster_joins_total", "kind"), "{{kind}}", "A"),
               query("sum(rate(mplb_cluster_moved_subflows_total[$__rate_interval]))", "moved subflows", "B")),
        series("Cluster: Redis outages, entries rejected /s (malformed, unknown backend)", "ops",
               query("sum(rate(mplb_cluster_redis_outages_total[$__rate_interval]))", "outages", "A"),
               query(rate("mplb_cluster_rejected_total", "reason"), "rejected {{reason}}", "B")),
        gauge("Cluster: peers whose config differs", "count(mplb_cluster_peer_config_same == 0) or vector(0)",
              "peers"),
    ]
    board = (dashboard.Dashboard("mplb-nfq: MPTCP-aware load balancer").uid("mplb-nfq").tags(["mplb-nfq", "mptcp"])
             .timezone("browser").refresh("10s").time("now-1h", "now")
             .with_variable(dashboard.DatasourceVariable("datasource").label("Prometheus").type("prometheus")))
    for panel in panels:
        board = board.with_panel(panel)
    board = board.with_row(dashboard.Row("Cluster (balancers behind ECMP sharing tokens through Redis)"))
    for panel in cluster:
        board = board.with_panel(panel)
    return board.build()


def render() -> str:
    return json.dumps(build(), cls=JSONEncoder, indent=2, sort_keys=True) + "\n"


if __name__ == "__main__":
    OUT.write_text(render())
    sys.stdout.write(f"wrote {OUT}\n")
