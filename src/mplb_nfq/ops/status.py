"""`mplb-nfq status`: the running worker's state, laid out like `ipvsadm -Ln`."""
from __future__ import annotations

from ..core.held import Held


def render_status(status: dict) -> str:
    drops, packets = status["queue_drops"], status["packets"]
    lines = [f"mplb-nfq: handshakes {status['handshakes']}, queue {status['queue']} ({status['queue_mode']}), "
             f"table {status['table_owner']}'s, up {status['uptime_s']:.0f} s",
             f"tokens tracked {status['tokens_tracked']}, flows tracked {status['flows_tracked']}, "
             f"queue drops {drops['queue_full']} (queue full) + {drops['socket_full']} (socket full), "
             f"waiting {drops['waiting']}",
             f"copies read {packets.get('copies', 0)}, lost {packets.get('copies_lost', 0)}; joins that raced their "
             f"token: found {packets.get(Held.FOUND, 0)}, dropped once {packets.get(Held.DROPPED_ONCE, 0)}, given up "
             f"{packets.get(Held.EXPIRED, 0)} (held twice) + {packets.get(Held.PUSHED_OUT, 0)} (pushed out)",
             "Prot VIP:Port                    Scheduler  Flags",
             "  -> Backend        Address                State     Weight  Conns  Subflows"]
    for s in status["services"]:
        flags = [f"SYNs {s['syns_decided_by']}"] + ([f"persistent {s['persistence']}s"] if s["persistence"] else [])
        flags.append(f"unknown-join {s['unknown_join']}")
        if s["join_ports"]:
            flags.append("join ports " + " ".join(f"{name}:{port}" for name, port in s["join_ports"].items()))
        if not s["mptcp_aware"]:
            flags.append("MPTCP-unaware")
        for vip in s["vips"]:
            endpoint = f"[{vip}]" if ":" in vip else vip
            ports = ",".join(str(p) for p in s["ports"])
            lines.append(f"TCP  {endpoint + ':' + ports:28} {s['scheduler']:10} {' '.join(flags)}   ({s['name']})")
        for b in s["backends"]:
            lines.append(_backend_line(b))
    if status["retired"]:
        lines.append("Retired (removed from the config, kept for their connections):")
        lines += [_backend_line(b) for b in status["retired"]]
    cluster = status["packets"].get("cluster")
    if cluster:
        lines += _cluster_lines(cluster, status["backend_view"])
    return "\n".join(lines)


def _cluster_lines(c: dict, view: dict) -> list[str]:
    announced = {True: "announced", False: "withdrawn", None: "not announced by mplb-nfq"}[c["announced"]]
    health = f"the cluster's view ({view['voters']} balancers vote)" if view["source"] == "cluster" else \
        f"OWN CHECKS ONLY ({view['why']})"
    lines = [f"Cluster: this balancer {c['balancer']}, VIPs {announced}, Redis {c['redis']}"
             + (f" ({c['error']})" if c["error"] else "") + f", {c['outages']} outages, {c['resyncs']} catch-ups",
             f"  backends' health: {health}",
             f"  published {c['published']}, peer tokens held {c['peer_tokens']}, joins crossed {c['joins_crossed']}, "
             f"held for a peer's token {c['held_for_peer']} (its token came too late: "
             f"{c['tokens_after_held_joins_gave_up']}), propagation p50 {c['propagation_ms_p50']} ms "
             f"p99 {c['propagation_ms_p99']} ms, rejected {sum(c['rejected'].values())}",
             "  -> Peer           Received  Config      Heartbeat"]
    for name in sorted(set(c["peers"]) | set(c["received"])):
        peer = c["peers"].get(name)
        config = "—" if peer is None else ("same" if peer["fingerprint"] == c["fingerprint"] else "DIFFERS")
        beat = "gone" if peer is None else f"{peer['age_s']} s ago"
        lines.append(f"  -> {name:14} {c['received'].get(name, 0):8}  {config:10}  {beat}")
    return lines


def _backend_line(b: dict) -> str:
    own = "" if b["checked"] == b["healthy"] else f"  (own check: {'up' if b['checked'] else 'down'})"
    return (f"  -> {b['name']:14} {', '.join(b['addresses']):22} {b['state']:9} {b['weight']:6}  "
            f"{b['connections']:5}  {b['subflows']:8}{own}")
